"""A pod's container as a host process: its files, environment and command line (what executor.py runs).

There are no images and no isolation. The command runs in the executor's own Python environment, which stands in
for the trainer image: the ENV (but PATH), WORKDIR, ENTRYPOINT and CMD of trainer-image/Dockerfile apply. Each
volume is a directory under the pod's directory (a PersistentVolumeClaim is the host path of its bound hostPath
volume), and the container paths are mapped there: every absolute path under a mount that appears in the command,
its arguments or an env value is rewritten to the host path, and so are the working directory and the
termination-message path.
The DNS name of a pod behind a headless Service (`<hostname>.<service>[.<namespace>.svc.cluster.local]`) given
as a whole env value or argument becomes 127.0.0.1: every executor pod shares the host's loopback.

Everything here is plain data in, files and a `HostProcess` out; executor.py reads the objects from the API.
"""

from __future__ import annotations

import base64
import json
import os
import re
import shlex
import shutil
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[2]
TRAINER_DOCKERFILE = REPO_ROOT / "trainer-image" / "Dockerfile"
DEFAULT_TERMINATION_MESSAGE_PATH = "/dev/termination-log"
# The trainer's own override of /dev/termination-log: its default is a constant in code, which no argument or env
# value carries, so no path mapping could reach it.
TERMINATION_LOG_ENV = "FINETUNE_TERMINATION_LOG"
LOOPBACK = "127.0.0.1"
DEFAULT_FILE_MODE = 0o644
_ENV_NAME = re.compile(r"^[-._a-zA-Z][-._a-zA-Z0-9]*$")
_REFERENCE = re.compile(r"\$\$|\$\(([-._a-zA-Z][-._a-zA-Z0-9]*)\)")
_METADATA_KEY = re.compile(r"^metadata\.(labels|annotations)\['(.+)'\]$")
_DNS_LABEL = r"[a-z0-9]([-a-z0-9]*[a-z0-9])?"


class StartError(Exception):
    """The container cannot start: a missing ConfigMap, Secret, key or executable, or an unsupported field."""


# ------------------------------------------------------------------------------------------------ the image


@dataclass(frozen=True)
class Image:
    """What an image would add to a container: its environment, working directory, entrypoint and command."""

    env: Mapping[str, str] = field(default_factory=dict)
    workdir: str | None = None
    entrypoint: Sequence[str] = ()
    cmd: Sequence[str] = ()


def read_dockerfile(path: Path) -> Image:
    """ENV, WORKDIR, ENTRYPOINT and CMD of a Dockerfile's last stage."""
    text = re.sub(r"\\\n", " ", path.read_text())
    env: dict[str, str] = {}
    workdir: str | None = None
    entrypoint: list[str] = []
    cmd: list[str] = []
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        instruction, _, rest = line.partition(" ")
        instruction, rest = instruction.upper(), rest.strip()
        if instruction == "FROM":
            env, workdir, entrypoint, cmd = {}, None, [], []
        elif instruction == "ENV":
            words = shlex.split(rest)
            if words and "=" not in words[0]:  # the legacy `ENV NAME value` form
                env[words[0]] = " ".join(words[1:])
            else:
                for word in words:
                    name, _, value = word.partition("=")
                    env[name] = value
        elif instruction == "WORKDIR":
            workdir = os.path.join(workdir or "/", rest)
        elif instruction in ("ENTRYPOINT", "CMD"):
            words = json.loads(rest) if rest.startswith("[") else ["/bin/sh", "-c", rest]
            if instruction == "ENTRYPOINT":
                entrypoint, cmd = words, []  # a new ENTRYPOINT clears the CMD of the stages before
            else:
                cmd = words
    return Image(env=env, workdir=workdir, entrypoint=entrypoint, cmd=cmd)


# ------------------------------------------------------------------------------------------------ objects


@dataclass(frozen=True)
class References:
    """The ConfigMaps, Secrets and claims a pod's volumes and environment name, and whether it mounts a
    ServiceAccount token."""

    config_maps: frozenset[str]
    secrets: frozenset[str]
    claims: frozenset[str]
    service_account_token: bool


def references(pod: Mapping[str, Any]) -> References:
    config_maps: set[str] = set()
    secrets: set[str] = set()
    claims: set[str] = set()
    token = False
    spec = pod["spec"]
    for volume in spec.get("volumes") or []:
        if "configMap" in volume:
            config_maps.add(volume["configMap"]["name"])
        if "secret" in volume:
            secrets.add(volume["secret"]["secretName"])
        if "persistentVolumeClaim" in volume:
            claims.add(volume["persistentVolumeClaim"]["claimName"])
        for source in (volume.get("projected") or {}).get("sources") or []:
            if "configMap" in source:
                config_maps.add(source["configMap"]["name"])
            if "secret" in source:
                secrets.add(source["secret"]["name"])
            token = token or "serviceAccountToken" in source
    for container in spec.get("containers") or []:
        for source in container.get("envFrom") or []:
            if "configMapRef" in source:
                config_maps.add(source["configMapRef"]["name"])
            if "secretRef" in source:
                secrets.add(source["secretRef"]["name"])
        for variable in container.get("env") or []:
            value_from = variable.get("valueFrom") or {}
            if "configMapKeyRef" in value_from:
                config_maps.add(value_from["configMapKeyRef"]["name"])
            if "secretKeyRef" in value_from:
                secrets.add(value_from["secretKeyRef"]["name"])
    return References(frozenset(config_maps), frozenset(secrets), frozenset(claims), token)


@dataclass(frozen=True)
class ClusterObjects:
    """The objects a pod refers to, as the executor read them (missing ones are absent)."""

    config_maps: Mapping[str, Mapping[str, bytes]] = field(default_factory=dict)
    secrets: Mapping[str, Mapping[str, bytes]] = field(default_factory=dict)
    # claim name -> the host directory of the hostPath PersistentVolume it is bound to
    claim_paths: Mapping[str, Path] = field(default_factory=dict)
    headless_services: frozenset[str] = frozenset()
    # a token of the pod's ServiceAccount, bound to the pod (TokenRequest), when a projected volume asks for one
    service_account_token: str | None = None


def config_map_contents(config_map: Mapping[str, Any]) -> dict[str, bytes]:
    """A ConfigMap's keys and contents (`data` as UTF-8, `binaryData` decoded)."""
    contents = {key: value.encode() for key, value in (config_map.get("data") or {}).items()}
    contents.update({key: base64.b64decode(value) for key, value in (config_map.get("binaryData") or {}).items()})
    return contents


def secret_contents(secret: Mapping[str, Any]) -> dict[str, bytes]:
    return {key: base64.b64decode(value) for key, value in (secret.get("data") or {}).items()}


# ------------------------------------------------------------------------------------------------ the process


@dataclass(frozen=True)
class HostProcess:
    """A container as the executor starts it."""

    argv: list[str]
    env: dict[str, str]
    cwd: Path
    termination_log: Path
    fallback_to_logs: bool


@dataclass(frozen=True)
class PodDirectory:
    """Where one pod's files live on the host."""

    root: Path

    def volume(self, name: str) -> Path:
        return self.root / "volumes" / name

    @property
    def home(self) -> Path:
        return self.root / "home"

    @property
    def workdir(self) -> Path:
        return self.root / "workdir"

    def termination_log(self, container: str) -> Path:
        return self.root / "containers" / container / "termination-log"


class MountTable:
    """Container paths -> host paths: the longest mount that holds a path decides."""

    def __init__(self, mounts: Mapping[str, Path]) -> None:
        self.mounts = {path.rstrip("/"): host for path, host in mounts.items() if path.rstrip("/")}
        ordered = sorted(self.mounts, key=len, reverse=True)
        # A mount path counts where it starts a path (nothing path-like before it) and ends at a separator.
        alternatives = "|".join(re.escape(path) for path in ordered)
        self._pattern = re.compile(rf"(?<![\w.~/-])({alternatives})(?=/|$|[^\w.-])") if ordered else None

    def host_path(self, container_path: str) -> Path | None:
        for path in sorted(self.mounts, key=len, reverse=True):
            if container_path == path or container_path.startswith(path + "/"):
                return self.mounts[path] / container_path[len(path) :].lstrip("/")
        return None

    def rewrite(self, text: str) -> str:
        """`text` with every absolute container path under a mount replaced by its host path."""
        if self._pattern is None:
            return text
        return self._pattern.sub(lambda match: str(self.mounts[match.group(1)]), text)


def prepare(
    pod: Mapping[str, Any],
    objects: ClusterObjects,
    directory: PodDirectory,
    image: Image,
    host_env: Mapping[str, str],
) -> HostProcess:
    """Write the pod's volumes under `directory` and return the process that runs its container.

    Raises StartError for what a kubelet would refuse, or what the executor cannot do.
    """
    spec = pod["spec"]
    containers = spec.get("containers") or []
    if len(containers) != 1 or spec.get("initContainers"):
        raise StartError("the executor runs pods of exactly one container and no init containers")
    container = containers[0]
    mounts = _mounts(pod, container, objects, directory)
    termination_path = container.get("terminationMessagePath") or DEFAULT_TERMINATION_MESSAGE_PATH
    termination_log = directory.termination_log(container["name"])
    termination_log.parent.mkdir(parents=True, exist_ok=True)
    termination_log.write_bytes(b"")
    table = MountTable({**mounts, termination_path: termination_log})
    namespace = pod["metadata"]["namespace"]

    env = _environment(pod, container, objects, image)
    env = {name: table.rewrite(_pod_address(value, namespace, objects)) for name, value in env.items()}
    command = container.get("command") or list(image.entrypoint)
    args = (
        container.get("args") if container.get("args") is not None else ([] if container.get("command") else image.cmd)
    )
    argv = [table.rewrite(_pod_address(expand(word, env), namespace, objects)) for word in [*command, *args]]
    if not argv:
        raise StartError("the container has no command and the image none either")

    directory.home.mkdir(parents=True, exist_ok=True)
    defaults = {
        "PATH": os.pathsep.join((str(Path(sys.executable).parent), "/usr/local/bin", "/usr/bin", "/bin")),
        "HOME": str(directory.home),
        "HOSTNAME": spec.get("hostname") or pod["metadata"]["name"],
        TERMINATION_LOG_ENV: str(termination_log),
    }
    if "PYTHONPATH" in host_env:
        defaults["PYTHONPATH"] = host_env["PYTHONPATH"]
    if "/tmp" in mounts:
        defaults["TMPDIR"] = str(mounts["/tmp"])
    env = {**defaults, **env}

    executable = argv[0] if "/" in argv[0] else shutil.which(argv[0], path=env["PATH"])
    if executable is None or not os.access(executable, os.X_OK):
        raise StartError(f'exec: "{argv[0]}": executable file not found in $PATH')
    working_dir = container.get("workingDir") or image.workdir
    cwd = (table.host_path(working_dir) if working_dir else None) or directory.workdir
    cwd.mkdir(parents=True, exist_ok=True)
    return HostProcess(
        argv=[executable, *argv[1:]],
        env=env,
        cwd=cwd,
        termination_log=termination_log,
        fallback_to_logs=container.get("terminationMessagePolicy") == "FallbackToLogsOnError",
    )


def expand(text: str, env: Mapping[str, str]) -> str:
    """Kubernetes' `$(VAR)` references: defined ones replaced, others kept as written; `$$` is a literal `$`."""
    return _REFERENCE.sub(lambda m: "$" if m.group(0) == "$$" else env.get(m.group(1), m.group(0)), text)


def _pod_address(value: str, namespace: str, objects: ClusterObjects) -> str:
    """127.0.0.1 for the DNS name of a pod behind a headless Service of the namespace, else the value."""
    suffix = rf"(\.{re.escape(namespace)}(\.svc(\.cluster\.local)?)?)?"
    match = re.fullmatch(rf"{_DNS_LABEL}\.({_DNS_LABEL}){suffix}", value)
    if match is not None and match.group(2) in objects.headless_services:
        return LOOPBACK
    return value


# ------------------------------------------------------------------------------------------------ volumes


def _mounts(
    pod: Mapping[str, Any], container: Mapping[str, Any], objects: ClusterObjects, directory: PodDirectory
) -> dict[str, Path]:
    spec = pod["spec"]
    volumes = {volume["name"]: _volume(volume, objects, directory, pod) for volume in spec.get("volumes") or []}
    mounts: dict[str, Path] = {}
    for mount in container.get("volumeMounts") or []:
        if mount["name"] not in volumes:
            raise StartError(f"volumeMount {mount['name']!r} names no volume of the pod")
        host = volumes[mount["name"]]
        if mount.get("subPath"):
            host = host / mount["subPath"]
            host.mkdir(parents=True, exist_ok=True)
        mounts[mount["mountPath"]] = host
    return mounts


def _volume(
    volume: Mapping[str, Any], objects: ClusterObjects, directory: PodDirectory, pod: Mapping[str, Any]
) -> Path:
    name = volume["name"]
    target = directory.volume(name)
    if "emptyDir" in volume:
        target.mkdir(parents=True, exist_ok=True)
        return target
    if "configMap" in volume:
        source = volume["configMap"]
        contents = _source(objects.config_maps, "configmap", source["name"], source.get("optional"))
        _write_files(target, contents, source)
        return target
    if "secret" in volume:
        source = volume["secret"]
        contents = _source(objects.secrets, "secret", source["secretName"], source.get("optional"))
        _write_files(target, contents, source)
        return target
    if "projected" in volume or "downwardAPI" in volume:
        _write_projection(target, volume, objects, pod)
        return target
    if "persistentVolumeClaim" in volume:
        claim = volume["persistentVolumeClaim"]["claimName"]
        if claim not in objects.claim_paths:
            raise StartError(f'persistentvolumeclaim "{claim}" is not bound to a hostPath PersistentVolume')
        return objects.claim_paths[claim]
    if "hostPath" in volume:
        host = Path(volume["hostPath"]["path"])
        if volume["hostPath"].get("type") in ("DirectoryOrCreate", None, ""):
            host.mkdir(parents=True, exist_ok=True)
        return host
    kinds = sorted(set(volume) - {"name"})
    raise StartError(f"volume {name!r}: {', '.join(kinds)} volumes are not supported by the executor")


def _write_projection(target: Path, volume: Mapping[str, Any], objects: ClusterObjects, pod: Mapping[str, Any]) -> None:
    """A projected volume (ConfigMaps, Secrets, downward API, a ServiceAccount token) or a downwardAPI one."""
    projected = volume.get("projected") or {}
    sources = projected.get("sources") or [{"downwardAPI": volume["downwardAPI"]}]
    default_mode = projected.get("defaultMode", (volume.get("downwardAPI") or {}).get("defaultMode"))
    mode = {} if default_mode is None else {"defaultMode": default_mode}
    target.mkdir(parents=True, exist_ok=True)
    for source in sources:
        if "configMap" in source or "secret" in source:
            kind = "configMap" if "configMap" in source else "secret"
            ref = source[kind]
            found = objects.config_maps if kind == "configMap" else objects.secrets
            _write_files(target, _source(found, kind.lower(), ref["name"], ref.get("optional")), {**ref, **mode})
        elif "downwardAPI" in source:
            values = {
                item["path"]: _downward_value(pod, item).encode() for item in source["downwardAPI"].get("items") or []
            }
            _write_files(target, values, {"items": [{"key": path, "path": path} for path in values], **mode})
        elif "serviceAccountToken" in source:
            if objects.service_account_token is None:
                raise StartError("no ServiceAccount token for the pod")
            item = {"key": "token", "path": source["serviceAccountToken"]["path"]}
            _write_files(target, {"token": objects.service_account_token.encode()}, {"items": [item], **mode})
        else:
            raise StartError(f"volume {volume['name']!r}: projected {sorted(source)} is not supported by the executor")


def _downward_value(pod: Mapping[str, Any], item: Mapping[str, Any]) -> str:
    if "fieldRef" not in item:
        raise StartError(f"downward API item {item['path']!r}: only fieldRef is supported by the executor")
    return field_value(pod, item["fieldRef"]["fieldPath"])


def _source(
    found: Mapping[str, Mapping[str, bytes]], kind: str, name: str, optional: bool | None
) -> Mapping[str, bytes]:
    if name in found:
        return found[name]
    if optional:
        return {}
    raise StartError(f'{kind} "{name}" not found')


def _write_files(target: Path, contents: Mapping[str, bytes], source: Mapping[str, Any]) -> None:
    target.mkdir(parents=True, exist_ok=True)
    default_mode = source.get("defaultMode", DEFAULT_FILE_MODE)
    items = source.get("items") or [{"key": key, "path": key} for key in sorted(contents)]
    for item in items:
        if item["key"] not in contents:
            raise StartError(f"couldn't find key {item['key']} in {source.get('name') or source.get('secretName')}")
        path = target / item["path"]
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(contents[item["key"]])
        path.chmod(item.get("mode", default_mode))


# ------------------------------------------------------------------------------------------------ environment


def _environment(
    pod: Mapping[str, Any], container: Mapping[str, Any], objects: ClusterObjects, image: Image
) -> dict[str, str]:
    """The image's env, then envFrom, then env (each `$(VAR)`-expanded against what came before), as a kubelet
    resolves them."""
    # The image's PATH names directories of the image's file system; the executor's own PATH stands in for it.
    env = {name: value for name, value in image.env.items() if name != "PATH"}
    for source in container.get("envFrom") or []:
        prefix = source.get("prefix") or ""
        if "configMapRef" in source:
            ref = source["configMapRef"]
            contents = _source(objects.config_maps, "configmap", ref["name"], ref.get("optional"))
        else:
            ref = source["secretRef"]
            contents = _source(objects.secrets, "secret", ref["name"], ref.get("optional"))
        env.update({prefix + key: value.decode() for key, value in contents.items() if _ENV_NAME.match(prefix + key)})
    for variable in container.get("env") or []:
        name = variable["name"]
        if "valueFrom" in variable:
            value = _value_from(pod, variable["valueFrom"], objects)
            if value is not None:
                env[name] = value
        else:
            env[name] = expand(variable.get("value") or "", env)
    return env


def _value_from(pod: Mapping[str, Any], source: Mapping[str, Any], objects: ClusterObjects) -> str | None:
    if "fieldRef" in source:
        return field_value(pod, source["fieldRef"]["fieldPath"])
    for kind, found, label in (
        ("configMapKeyRef", objects.config_maps, "configmap"),
        ("secretKeyRef", objects.secrets, "secret"),
    ):
        if kind in source:
            ref = source[kind]
            contents = _source(found, label, ref["name"], ref.get("optional"))
            if ref["key"] in contents:
                return contents[ref["key"]].decode()
            if ref.get("optional"):
                return None
            raise StartError(f"couldn't find key {ref['key']} in {label} {pod['metadata']['namespace']}/{ref['name']}")
    raise StartError(f"env valueFrom {sorted(source)} is not supported by the executor")


def field_value(pod: Mapping[str, Any], path: str) -> str:
    """A downward-API `fieldRef` value of the pod."""
    metadata, spec, status = pod["metadata"], pod["spec"], pod.get("status") or {}
    simple = {
        "metadata.name": metadata.get("name"),
        "metadata.namespace": metadata.get("namespace"),
        "metadata.uid": metadata.get("uid"),
        "spec.nodeName": spec.get("nodeName"),
        "spec.serviceAccountName": spec.get("serviceAccountName"),
        "status.podIP": status.get("podIP"),
        "status.hostIP": status.get("hostIP"),
    }
    if path in simple:
        return str(simple[path] or "")
    match = _METADATA_KEY.match(path)
    if match is not None:
        return str((metadata.get(match.group(1)) or {}).get(match.group(2), ""))
    raise StartError(f"fieldRef {path!r} is not supported by the executor")
