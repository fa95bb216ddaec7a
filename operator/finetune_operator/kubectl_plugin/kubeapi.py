"""The Kubernetes API calls `kubectl ftj` makes, with kubectl's own kubeconfig, context and namespace rules."""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from typing import Any

import kubernetes
from kubernetes.client import ApiClient, Configuration, CoreV1Api, CustomObjectsApi
from kubernetes.client.exceptions import ApiException
from urllib3.exceptions import ReadTimeoutError

from finetune_operator.api import GROUP, PLURAL, VERSION

Obj = dict[str, Any]
TRAINING_COMPONENT = "training"
VALIDATION_COMPONENT = "validation"
_JOB_NAME_LABEL = "finetune.dev/job-name"
_COMPONENT_LABEL = "app.kubernetes.io/component"
_COMPLETION_INDEX = "batch.kubernetes.io/job-completion-index"


class NotFound(LookupError):
    pass


class Cluster:
    """One kubeconfig context: `kubeconfig` and `context` as kubectl's flags, else $KUBECONFIG's current context."""

    def __init__(self, kubeconfig: str | None = None, context: str | None = None, namespace: str | None = None):
        configuration = Configuration()
        kubernetes.config.load_kube_config(config_file=kubeconfig, context=context, client_configuration=configuration)
        self.api = ApiClient(configuration)
        self.namespace = namespace or _context_namespace(kubeconfig, context)
        self.core = CoreV1Api(self.api)
        self.custom = CustomObjectsApi(self.api)

    # FineTuneJobs
    def get(self, name: str) -> Obj:
        try:
            found: Obj = self.custom.get_namespaced_custom_object(GROUP, VERSION, self.namespace, PLURAL, name)
        except ApiException as error:
            if error.status == 404:
                raise NotFound(f'finetunejob "{name}" not found in namespace "{self.namespace}"') from None
            raise
        return found

    def finetunejobs(self, all_namespaces: bool = False) -> list[Obj]:
        if all_namespaces:
            found = self.custom.list_cluster_custom_object(GROUP, VERSION, PLURAL)
        else:
            found = self.custom.list_namespaced_custom_object(GROUP, VERSION, self.namespace, PLURAL)
        items: list[Obj] = found.get("items", [])
        return sorted(items, key=lambda item: (item["metadata"]["namespace"], item["metadata"]["name"]))

    def create(self, manifest: Mapping[str, Any], dry_run: bool = False) -> Obj:
        """Create the FineTuneJob; `dry_run` has the API server check it (schema, CEL rules, name) and keep nothing."""
        extra = {"dry_run": "All"} if dry_run else {}
        created: Obj = self.custom.create_namespaced_custom_object(
            GROUP, VERSION, self.namespace, PLURAL, dict(manifest), **extra
        )
        return created

    def patch_spec(self, name: str, changes: Mapping[str, Any]) -> None:
        self.get(name)
        self.custom.patch_namespaced_custom_object(GROUP, VERSION, self.namespace, PLURAL, name, {"spec": changes})

    def watch(self, name: str, timeout_seconds: int = 300) -> Iterator[Obj]:
        """The FineTuneJob now, then each new version of it, for as long as the caller reads."""
        current = self.get(name)
        yield current
        version = current["metadata"]["resourceVersion"]
        while True:
            stream = kubernetes.watch.Watch().stream(
                self.custom.list_namespaced_custom_object,
                GROUP,
                VERSION,
                self.namespace,
                PLURAL,
                field_selector=f"metadata.name={name}",
                resource_version=version,
                timeout_seconds=timeout_seconds,
            )
            try:
                for event in stream:
                    obj: Obj = event["object"]
                    if event["type"] == "DELETED":
                        raise NotFound(f'finetunejob "{name}" was deleted')
                    if event["type"] in ("ADDED", "MODIFIED"):
                        version = obj["metadata"]["resourceVersion"]
                        yield obj
            except ApiException as error:
                if error.status != 410:  # Gone: the version is too old; read the object afresh
                    raise
                current = self.get(name)
                version = current["metadata"]["resourceVersion"]
                yield current

    # Pods and logs
    def trainer_pod(self, name: str, rank: int) -> Obj | None:
        """The newest pod of the training Job with completion index `rank`; for rank 0 before training starts,
        the validation pod."""
        pods = self._pods(name, TRAINING_COMPONENT)
        ranked = [pod for pod in pods if pod["metadata"].get("annotations", {}).get(_COMPLETION_INDEX) == str(rank)]
        if not ranked and rank == 0:
            ranked = self._pods(name, VALIDATION_COMPONENT)
        return max(ranked, key=lambda pod: pod["metadata"]["creationTimestamp"], default=None)

    def _pods(self, name: str, component: str) -> list[Obj]:
        selector = f"{_JOB_NAME_LABEL}={name},{_COMPONENT_LABEL}={component}"
        response = self.core.list_namespaced_pod(self.namespace, label_selector=selector, _preload_content=False)
        items: list[Obj] = json.loads(response.data).get("items", [])
        return items

    def log(self, pod: str, container: str, follow: bool, idle_seconds: float = 30.0) -> Iterator[str]:
        """The container's log, line by line; with `follow`, new lines as they come until the container stops.

        A follow stream that stays quiet for `idle_seconds` is opened again (some kubelets keep it open after the
        container stopped); the lines read before are not repeated.
        """
        shown = 0
        while True:
            response = self.core.read_namespaced_pod_log(
                pod,
                self.namespace,
                container=container,
                follow=follow,
                _preload_content=False,
                _request_timeout=(10, idle_seconds) if follow else None,
            )
            lines = _lines(response)
            try:
                for number, line in enumerate(lines):
                    if number >= shown:
                        shown += 1
                        yield line
            except ReadTimeoutError:
                pass
            finally:
                response.release_conn()
            if not follow or self._terminated(pod, container):
                return

    def _terminated(self, pod: str, container: str) -> bool:
        try:
            found = self.core.read_namespaced_pod(pod, self.namespace, _preload_content=False)
        except ApiException as error:
            if error.status == 404:
                return True
            raise
        status = json.loads(found.data).get("status", {})
        for container_status in status.get("containerStatuses", []) or []:
            if container_status.get("name") == container:
                return "terminated" in (container_status.get("state") or {})
        return status.get("phase") in ("Succeeded", "Failed")

    def config_map(self, namespace: str, name: str) -> dict[str, str] | None:
        try:
            found = self.core.read_namespaced_config_map(name, namespace)
        except ApiException as error:
            if error.status in (403, 404):
                return None
            raise
        data: dict[str, str] = found.data or {}
        return data


def _lines(response: Any) -> Iterator[str]:
    pending = b""
    for chunk in response.stream(4096, decode_content=True):
        pending += chunk
        *lines, pending = pending.split(b"\n")
        yield from (line.decode("utf-8", errors="replace") for line in lines)
    if pending:
        yield pending.decode("utf-8", errors="replace")


def _context_namespace(kubeconfig: str | None, context: str | None) -> str:
    contexts, active = kubernetes.config.list_kube_config_contexts(config_file=kubeconfig)
    chosen = next((c for c in contexts if c["name"] == context), active) if context else active
    namespace: str = (chosen or {}).get("context", {}).get("namespace") or "default"
    return namespace
