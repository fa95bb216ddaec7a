"""Files in the object store (s3://, gs://) through fsspec, with progress and sha256.

S3-compatible stores (MinIO, Ceph, R2, ...) take `AWS_ENDPOINT_URL_S3` (or `AWS_ENDPOINT_URL`), as the trainer
does; credentials come from the usual AWS and Google Cloud environment and configuration files.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import fsspec

UPLOAD_SCHEMES = ("s3", "gs")
DOWNLOAD_SCHEMES = ("s3", "gs", "https")
BLOCK = 1 << 20
Progress = Callable[[int], None]


def scheme(uri: str) -> str:
    return urlsplit(uri).scheme


def join(uri: str, *parts: str) -> str:
    return "/".join([uri.rstrip("/"), *(part.strip("/") for part in parts)])


def filesystem(uri: str) -> Any:
    kind = scheme(uri)
    options: dict[str, Any] = {}
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    if kind == "s3" and endpoint:
        options["endpoint_url"] = endpoint
    return fsspec.filesystem(kind, skip_instance_cache=True, **options)


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(BLOCK), b""):
            digest.update(block)
    return digest.hexdigest()


def upload(path: Path, uri: str, advance: Progress) -> None:
    """Copy the local file to `uri`, calling `advance(bytes)` as it goes."""
    with path.open("rb") as source, filesystem(uri).open(uri, "wb") as target:
        for block in iter(lambda: source.read(BLOCK), b""):
            target.write(block)
            advance(len(block))


def remove(uri: str) -> None:
    filesystem(uri).rm_file(uri)


def download(uri: str, target: Path, advance: Progress) -> str:
    """Copy `uri` to the local file `target`; returns the sha256 of what was copied."""
    digest = hashlib.sha256()
    target.parent.mkdir(parents=True, exist_ok=True)
    with filesystem(uri).open(uri, "rb") as source, target.open("wb") as sink:
        for block in iter(lambda: source.read(BLOCK), b""):
            sink.write(block)
            digest.update(block)
            advance(len(block))
    return digest.hexdigest()
