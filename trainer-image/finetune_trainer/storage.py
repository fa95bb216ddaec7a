"""Where files live: local paths, `pvc://claim/path` (a mounted claim), and s3://, gs://, https:// via fsspec.

S3-compatible storage (MinIO, Ceph, R2, ...): set `AWS_ENDPOINT_URL_S3` (or `AWS_ENDPOINT_URL`) in the pod's env,
with credentials in `AWS_ACCESS_KEY_ID`/`AWS_SECRET_ACCESS_KEY` from a Secret; GCS uses the pod's workload identity
or `GOOGLE_APPLICATION_CREDENTIALS`.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from finetune_contract.uris import pvc_local_path

REMOTE_SCHEMES = ("s3", "gs", "https", "http")


def scheme(uri: str) -> str:
    return urlsplit(uri).scheme if "://" in uri else ""


def local_path(uri: str) -> Path | None:
    """The path on this machine for a local or pvc:// URI, None for remote storage."""
    kind = scheme(uri)
    if kind == "pvc":
        return Path(pvc_local_path(uri))
    if kind == "file":
        return Path(urlsplit(uri).path)
    if kind == "":
        return Path(uri)
    return None


def _storage_options(kind: str) -> dict[str, Any]:
    if kind == "s3":
        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        if endpoint:
            return {"endpoint_url": endpoint}
    return {}


def filesystem(uri: str) -> Any:
    import fsspec

    kind = scheme(uri)
    return fsspec.filesystem(kind, **_storage_options(kind))


def _hf_repo(uri: str) -> str:
    """hf://meta-llama/Llama-2-7b-hf -> meta-llama/Llama-2-7b-hf (the hub token comes from HF_TOKEN)."""
    parts = urlsplit(uri)
    return f"{parts.netloc}/{parts.path.strip('/')}".strip("/")


def join(uri: str, *parts: str) -> str:
    return "/".join([uri.rstrip("/"), *(part.strip("/") for part in parts)])


def read_bytes(uri: str) -> bytes:
    """The whole content of a file; FileNotFoundError when it is not there."""
    path = local_path(uri)
    if path is not None:
        return path.read_bytes()
    with filesystem(uri).open(uri, "rb") as handle:
        data: bytes = handle.read()
    return data


def exists(uri: str) -> bool:
    path = local_path(uri)
    if path is not None:
        return path.exists()
    return bool(filesystem(uri).exists(uri))


def list_names(uri: str) -> list[str]:
    """Names directly under a directory URI (empty when it does not exist)."""
    path = local_path(uri)
    if path is not None:
        return sorted(child.name for child in path.iterdir()) if path.is_dir() else []
    fs = filesystem(uri)
    try:
        entries = fs.ls(uri, detail=False, refresh=True)
    except FileNotFoundError:
        return []
    return sorted(str(entry).rstrip("/").rsplit("/", 1)[-1] for entry in entries)


def write_bytes(uri: str, data: bytes) -> None:
    path = local_path(uri)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        return
    with filesystem(uri).open(uri, "wb") as handle:
        handle.write(data)


def upload_dir(source: Path, uri: str) -> None:
    """Copy the files under `source` to the directory `uri` (created if needed)."""
    path = local_path(uri)
    if path is not None:
        shutil.copytree(source, path, dirs_exist_ok=True)
        return
    fs = filesystem(uri)
    for file in sorted(source.rglob("*")):
        if file.is_file():
            fs.put_file(str(file), join(uri, file.relative_to(source).as_posix()))


def download_dir(uri: str, target: Path) -> Path:
    """The directory `uri` as a local directory: itself when it is local, else a copy under `target`."""
    path = local_path(uri)
    if path is not None:
        if not path.is_dir():
            raise FileNotFoundError(f"{uri}: no such directory")
        return path
    if scheme(uri) == "hf":
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_id=_hf_repo(uri), local_dir=str(target)))
    fs = filesystem(uri)
    if not fs.isdir(uri):
        raise FileNotFoundError(f"{uri}: no such directory")
    target.mkdir(parents=True, exist_ok=True)
    root = uri.rstrip("/")
    for remote in fs.find(root):
        relative = str(remote)[len(fs._strip_protocol(root)) :].lstrip("/")
        destination = target / relative
        destination.parent.mkdir(parents=True, exist_ok=True)
        fs.get_file(remote, str(destination))
    return target


def download_tokenizer(uri: str, names: tuple[str, ...]) -> Path:
    """A local directory with the tokenizer files of the weights at `uri` (the weights themselves stay put)."""
    path = local_path(uri)
    if path is not None:
        return path
    import tempfile

    target = Path(tempfile.mkdtemp(prefix="tokenizer-"))
    if scheme(uri) == "hf":
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_id=_hf_repo(uri), local_dir=str(target), allow_patterns=list(names)))
    fs = filesystem(uri)
    for name in names:
        remote = join(uri, name)
        if fs.exists(remote):
            fs.get_file(remote, str(target / name))
    return target


def download_once(uri: str, target: Path) -> Path:
    """Like download_dir, into `target` through a temporary name, so a half-done copy is never taken as done."""
    if local_path(uri) is not None:
        return download_dir(uri, target)
    if target.is_dir():
        return target
    partial = target.with_name(target.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    download_dir(uri, partial)
    partial.rename(target)
    return target


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
