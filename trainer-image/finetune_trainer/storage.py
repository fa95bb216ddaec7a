"""Where files live, through fsspec: every URI becomes one filesystem and a path on it, in `locate`.

`pvc://claim/path` is the claim the operator mounts at `/mnt/pvc/claim`, read as a local path; a plain path (or
`file://`) is itself; every other scheme is fsspec's filesystem for it: s3 (s3fs), gs (gcsfs), https (HTTP),
hf (huggingface_hub's HfFileSystem, token from `HF_TOKEN`). A new scheme is an fsspec protocol, plus an entry in
`_OPTIONS` when it needs settings from the env.

S3-compatible storage (MinIO, Ceph, R2, ...): set `AWS_ENDPOINT_URL_S3` (or `AWS_ENDPOINT_URL`) in the pod's env,
with credentials in `AWS_ACCESS_KEY_ID`/`AWS_SECRET_ACCESS_KEY` from a Secret; GCS uses the pod's workload identity
or `GOOGLE_APPLICATION_CREDENTIALS`.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any
from urllib.parse import urlsplit

from finetune_contract.uris import pvc_local_path


def _s3_options() -> dict[str, Any]:
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    return {"endpoint_url": endpoint} if endpoint else {}


# Per-scheme filesystem settings that come from the env; schemes without an entry take fsspec's defaults.
_OPTIONS: dict[str, Callable[[], dict[str, Any]]] = {"s3": _s3_options}


@dataclass(frozen=True)
class Location:
    """A URI resolved: the filesystem that holds it and the path on that filesystem."""

    fs: Any  # fsspec.AbstractFileSystem
    path: str

    @property
    def is_local(self) -> bool:
        return "file" in _protocols(self.fs)

    def child(self, name: str) -> Location:
        return Location(self.fs, f"{self.path.rstrip('/')}/{name.strip('/')}")


def _protocols(fs: Any) -> tuple[str, ...]:
    protocol = fs.protocol
    return (protocol,) if isinstance(protocol, str) else tuple(protocol)


def locate(uri: str) -> Location:
    import fsspec

    scheme = urlsplit(uri).scheme if "://" in uri else "file"
    if scheme == "pvc":
        return Location(fsspec.filesystem("file", auto_mkdir=True), pvc_local_path(uri))
    if scheme == "file":
        return Location(fsspec.filesystem("file", auto_mkdir=True), str(Path(urlsplit(uri).path or uri).resolve()))
    fs = fsspec.filesystem(scheme, **_OPTIONS.get(scheme, dict)())
    return Location(fs, fs._strip_protocol(uri))


def join(uri: str, *parts: str) -> str:
    return "/".join([uri.rstrip("/"), *(part.strip("/") for part in parts)])


@contextmanager
def open_binary(uri: str) -> Iterator[IO[bytes]]:
    """The file for streaming reads; FileNotFoundError when it is not there."""
    where = locate(uri)
    try:
        handle = where.fs.open(where.path, "rb")
    except FileNotFoundError as error:
        # fsspec's https filesystem reports any failure to open a file (TLS, DNS, 403) as not found: only 404 is.
        cause, status = error.__cause__, getattr(error.__cause__, "status", None)
        if status in (401, 403):
            raise PermissionError(f"{uri}: HTTP {status}") from cause
        if cause is not None and not isinstance(cause, FileNotFoundError) and status != 404:
            raise ConnectionError(f"cannot read {uri}: {cause}") from cause
        raise
    with handle:
        yield handle


def read_bytes(uri: str) -> bytes:
    where = locate(uri)
    data: bytes = where.fs.cat_file(where.path)
    return data


def exists(uri: str) -> bool:
    where = locate(uri)
    return bool(where.fs.exists(where.path))


def list_names(uri: str) -> list[str]:
    """Names directly under a directory URI (empty when it does not exist)."""
    where = locate(uri)
    try:
        entries = where.fs.ls(where.path, detail=False, refresh=True)
    except (FileNotFoundError, NotADirectoryError):
        return []
    return sorted(str(entry).rstrip("/").rsplit("/", 1)[-1] for entry in entries)


def write_bytes(uri: str, data: bytes) -> None:
    where = locate(uri)
    where.fs.pipe_file(where.path, data)


def delete(uri: str) -> None:
    where = locate(uri)
    where.fs.rm_file(where.path)


def upload_dir(source: Path, uri: str) -> None:
    """Copy the files under `source` to the directory `uri` (created if needed)."""
    where = locate(uri)
    for file in sorted(source.rglob("*")):
        if file.is_file():
            where.fs.put_file(str(file), where.child(file.relative_to(source).as_posix()).path)


def download_dir(uri: str, target: Path, names: tuple[str, ...] | None = None) -> Path:
    """The directory `uri` as a local directory: itself when it is local, else a copy in `target`.

    With `names`, only those of its files that exist are copied.
    """
    where = locate(uri)
    if not where.fs.isdir(where.path):
        raise FileNotFoundError(f"{uri}: no such directory")
    if where.is_local:
        return Path(where.path)
    if names is None:
        root = where.path.rstrip("/")
        remotes = [(str(remote), str(remote)[len(root) :].lstrip("/")) for remote in where.fs.find(root)]
    else:
        remotes = [(where.child(name).path, name) for name in names if where.fs.exists(where.child(name).path)]
    for remote, relative in remotes:
        destination = target / relative
        destination.parent.mkdir(parents=True, exist_ok=True)
        where.fs.get_file(remote, str(destination))
    return target


def download_once(uri: str, target: Path) -> Path:
    """Like download_dir, into `target` through a temporary name, so a half-done copy is never taken as done."""
    if locate(uri).is_local:
        return download_dir(uri, target)
    if target.is_dir():
        return target
    partial = target.with_name(target.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    download_dir(uri, partial)
    partial.rename(target)
    return target


def download_files(uri: str, names: tuple[str, ...]) -> Path:
    """A local directory with the files `names` of the directory `uri` (the tokenizer, without the weights)."""
    where = locate(uri)
    target = Path(where.path) if where.is_local else Path(tempfile.mkdtemp(prefix="files-"))
    return download_dir(uri, target, names)


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
