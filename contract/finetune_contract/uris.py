"""URI fields: which schemes each field accepts, checked by the CRD (CEL) and again by the operator."""

from __future__ import annotations

import ipaddress
from typing import Annotated, Any
from urllib.parse import urlsplit

from pydantic import Field, JsonValue

DATA_SCHEMES = ("https", "s3", "gs", "pvc")
WEIGHTS_SCHEMES = ("hf", "https", "s3", "gs", "pvc")
DESTINATION_SCHEMES = ("s3", "gs", "pvc")
# Cloud metadata endpoints: a data URI pointing there would hand the pod's cloud credentials to the log.
_METADATA_HOSTS = frozenset(("metadata.google.internal", "metadata", "instance-data"))
# Bounded so that the API server's cost estimate of the CEL rules on these fields stays within its budget.
MAX_URI_LENGTH = 2048


def scheme_list(schemes: tuple[str, ...]) -> str:
    names = [f"{scheme}://" for scheme in schemes]
    return ", ".join(names[:-1]) + " or " + names[-1] if len(names) > 1 else names[0]


def _scheme_rule(schemes: tuple[str, ...]) -> dict[str, JsonValue]:
    return {
        "rule": "self.matches('^(" + "|".join(schemes) + ")://[^/].*$')",
        "message": f"must be a {scheme_list(schemes)} URI",
    }


def check_uri(value: str, schemes: tuple[str, ...]) -> str:
    parts = urlsplit(value)
    if parts.scheme not in schemes or not parts.netloc:
        raise ValueError(f"must be a {scheme_list(schemes)} URI, got {value!r}")
    if parts.scheme == "pvc" and not parts.path.strip("/"):
        raise ValueError(f"a pvc:// URI names a claim and a path inside it (pvc://claim/path), got {value!r}")
    if parts.scheme == "https":
        host = (parts.hostname or "").lower()
        if host in _METADATA_HOSTS or host.endswith(".internal") or _is_link_local(host):
            raise ValueError(f"link-local and cloud metadata addresses are not allowed, got {value!r}")
    return value


def _is_link_local(host: str) -> bool:
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    return address.is_link_local or address.is_loopback or address.is_unspecified


# The CRD enforces the schemes at `kubectl apply`; `check_uri` repeats that (plus the address rules CEL cannot
# express) in the operator. The trainer also takes local paths, so the model type itself stays a plain string.
def _uri_field(schemes: tuple[str, ...]) -> Any:
    return Field(max_length=MAX_URI_LENGTH, json_schema_extra={"x-kubernetes-validations": [_scheme_rule(schemes)]})


DataURI = Annotated[str, _uri_field(DATA_SCHEMES)]
WeightsURI = Annotated[str, _uri_field(WEIGHTS_SCHEMES)]
DestinationURI = Annotated[str, _uri_field(DESTINATION_SCHEMES)]

# Where the trainer finds a pvc://claim/path URI: the operator mounts each claim the spec names at
# PVC_MOUNT_ROOT/<claim>.
PVC_MOUNT_ROOT = "/mnt/pvc"


def pvc_claim(uri: str) -> str | None:
    parts = urlsplit(uri)
    return parts.netloc if parts.scheme == "pvc" else None


def pvc_local_path(uri: str) -> str:
    parts = urlsplit(uri)
    return f"{PVC_MOUNT_ROOT}/{parts.netloc}/{parts.path.lstrip('/')}"
