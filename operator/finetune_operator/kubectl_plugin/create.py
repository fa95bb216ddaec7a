"""`kubectl ftj create`: check local data with the trainer's rules, upload it under the job's prefix, create the job.

Nothing is created or uploaded before every check has passed: the local rows (line numbers in errors), the
manifest (the field named), then the API server's own checks by a server-side dry run (schema, CEL rules, the name
being free, permission to create). Uploaded files are named by their content (`train_data-<sha256[:16]>.jsonl`), so
an upload never overwrites other data and a repeated `create` uploads nothing new; when creating the job fails
after all, the files this run uploaded are removed again.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kubernetes.client.exceptions import ApiException

from finetune_contract.training_data import DataFormat, InvalidTrainingData, describe, parse_rows
from finetune_operator.kubectl_plugin import objectstore
from finetune_operator.kubectl_plugin.kubeapi import Cluster
from finetune_operator.kubectl_plugin.manifest import build_manifest

# The ConfigMap the Helm chart publishes for clients (readable by every authenticated user).
CLIENT_CONFIG_MAP = "kubectl-ftj"
DATA_LOCATION_KEY = "dataLocation"
DEFAULT_OPERATOR_NAMESPACE = "finetune-system"


class CreateError(Exception):
    """Why nothing was created; the message names the file and line, the field, or the setting."""


@dataclass(frozen=True)
class LocalData:
    field: str  # train_data, validation_data
    path: Path
    sha256: str
    size: int
    rows: int
    format: DataFormat

    def uri(self, location: str, namespace: str, name: str) -> str:
        return objectstore.join(location, namespace, name, f"{self.field}-{self.sha256[:16]}.jsonl")


@dataclass(frozen=True)
class CreateRequest:
    name: str
    data: Mapping[str, str]  # input field -> local path or URI
    base: Mapping[str, Any] | None = None
    assignments: Sequence[str] = ()
    data_location: str | None = None
    operator_namespace: str = DEFAULT_OPERATOR_NAMESPACE


Uploader = Callable[[LocalData, str], None]


def is_uri(value: str) -> bool:
    return "://" in value


def check_local_data(field: str, path: Path) -> LocalData:
    """Every row of the local JSONL file, checked as the trainer checks it."""
    try:
        content = path.read_bytes()
    except OSError as error:
        raise CreateError(f"{field}: cannot read {path}: {error.strerror}") from None
    try:
        rows = parse_rows(content, field)
    except InvalidTrainingData as error:
        raise CreateError(f"{path}: {error}") from None
    return LocalData(field, path, hashlib.sha256(content).hexdigest(), len(content), len(rows.rows), rows.format)


def data_location(cluster: Cluster, request: CreateRequest) -> str:
    location = request.data_location
    if not location:
        published = cluster.config_map(request.operator_namespace, CLIENT_CONFIG_MAP) or {}
        location = published.get(DATA_LOCATION_KEY)
    if not location:
        raise CreateError(
            "no data location to upload to: pass --data-location s3://bucket/prefix (or set FTJ_DATA_LOCATION), "
            f"or have the operator's Helm chart publish client.dataLocation (ConfigMap {CLIENT_CONFIG_MAP} in "
            f"namespace {request.operator_namespace}, see --operator-namespace)"
        )
    if objectstore.scheme(location) not in objectstore.UPLOAD_SCHEMES:
        raise CreateError(f"data location {location!r}: must be an s3:// or gs:// URI")
    return location.rstrip("/")


def plan(cluster: Cluster, request: CreateRequest) -> tuple[dict[str, Any], list[tuple[LocalData, str]]]:
    """The manifest and the uploads it needs, after the local checks; touches nothing."""
    local = [check_local_data(field, Path(value)) for field, value in request.data.items() if not is_uri(value)]
    if len({data.format for data in local}) > 1:
        train, validation = local
        raise CreateError(
            f"validation_data has {describe(validation.format)} rows but train_data has {describe(train.format)} rows"
        )
    uris = {field: value for field, value in request.data.items() if is_uri(value)}
    uploads: list[tuple[LocalData, str]] = []
    if local:
        location = data_location(cluster, request)
        uploads = [(data, data.uri(location, cluster.namespace, request.name)) for data in local]
        uris.update({data.field: uri for data, uri in uploads})
    try:
        manifest = build_manifest(request.name, cluster.namespace, request.base, request.assignments, uris)
    except ValueError as error:
        raise CreateError(str(error)) from None
    return manifest, uploads


def prepare(cluster: Cluster, request: CreateRequest) -> tuple[dict[str, Any], list[tuple[LocalData, str]]]:
    """`plan`, then the API server's own checks of the manifest by a dry run; touches nothing."""
    manifest, uploads = plan(cluster, request)
    try:
        cluster.create(manifest, dry_run=True)
    except ApiException as error:
        raise CreateError(api_error(error)) from None
    return manifest, uploads


def upload_and_create(
    cluster: Cluster, manifest: dict[str, Any], uploads: Sequence[tuple[LocalData, str]], upload: Uploader
) -> dict[str, Any]:
    """Upload what is not there yet, then create the FineTuneJob; returns it as created."""
    uploaded: list[str] = []
    try:
        for data, uri in uploads:
            if _already_there(uri, data):
                continue
            upload(data, uri)
            uploaded.append(uri)
        return cluster.create(manifest)
    except ApiException as error:
        _remove(uploaded)
        raise CreateError(api_error(error)) from None
    except BaseException:
        _remove(uploaded)
        raise


def _already_there(uri: str, data: LocalData) -> bool:
    """The object is named by the content's sha256: one of the same size is this file, uploaded before."""
    fs = objectstore.filesystem(uri)
    return bool(fs.exists(uri)) and int(fs.size(uri)) == data.size


def _remove(uris: Sequence[str]) -> None:
    for uri in uris:
        objectstore.remove(uri)


def api_error(error: ApiException) -> str:
    """The API server's own message (it names the field), not the HTTP envelope."""
    try:
        message = str(json.loads(error.body or "{}").get("message") or "")
    except ValueError:
        message = ""
    return message or f"{error.status} {error.reason}"
