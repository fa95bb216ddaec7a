"""The FineTuneJob calls the API server makes on a caller's behalf, once the caller is authorized."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from kubernetes.client import ApiClient, CustomObjectsApi
from kubernetes.client.exceptions import ApiException

from finetune_operator.api import GROUP, PLURAL, VERSION
from finetune_operator.replicate_api.mapping import InvalidField, InvalidTraining, request_field

Obj = dict[str, Any]


class AlreadyExists(Exception):
    """A FineTuneJob of that name exists."""


class KubernetesUnavailable(RuntimeError):
    """The API server refused or failed a call that a valid request should not fail."""


class FineTuneJobs:
    def __init__(self, client: ApiClient, namespaces: Sequence[str] = ()) -> None:
        self._custom = CustomObjectsApi(client)
        self._namespaces = tuple(namespaces)

    def create(self, manifest: Obj) -> Obj:
        namespace = manifest["metadata"]["namespace"]
        try:
            created: Obj = self._custom.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, manifest)
        except ApiException as error:
            if error.status == 409:
                raise AlreadyExists(manifest["metadata"]["name"]) from None
            if error.status == 404:
                raise InvalidTraining.of("destination", f"there is no namespace {namespace}") from None
            if error.status in (400, 422):
                raise _invalid(error) from None
            raise _unavailable("create a FineTuneJob", error) from None
        return created

    def get(self, namespace: str, name: str) -> Obj | None:
        try:
            found: Obj = self._custom.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)
        except ApiException as error:
            if error.status == 404:
                return None
            raise _unavailable("read a FineTuneJob", error) from None
        return found

    def list(self) -> list[Obj]:
        """Every FineTuneJob of the namespaces served (of all namespaces when none were named)."""
        try:
            if not self._namespaces:
                return list(self._custom.list_cluster_custom_object(GROUP, VERSION, PLURAL)["items"])
            items: list[Obj] = []
            for namespace in self._namespaces:
                items += self._custom.list_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL)["items"]
            return items
        except ApiException as error:
            raise _unavailable("list FineTuneJobs", error) from None

    def cancel(self, namespace: str, name: str) -> Obj | None:
        try:
            patched: Obj = self._custom.patch_namespaced_custom_object(
                GROUP, VERSION, namespace, PLURAL, name, {"spec": {"cancel": True}}
            )
        except ApiException as error:
            if error.status == 404:
                return None
            raise _unavailable("cancel a FineTuneJob", error) from None
        return patched


def _invalid(error: ApiException) -> InvalidTraining:
    """The API server's own validation (CRD schema and CEL), in the request's field names."""
    try:
        status = json.loads(error.body)
    except (TypeError, ValueError):
        status = {}
    causes = (status.get("details") or {}).get("causes") or []
    problems = [InvalidField(request_field(c.get("field", "spec")), c.get("message", "")) for c in causes]
    return InvalidTraining(problems or [InvalidField("body", str(status.get("message", error.reason)))])


def _unavailable(action: str, error: ApiException) -> KubernetesUnavailable:
    return KubernetesUnavailable(
        f"the Kubernetes API server did not let the operator {action} ({error.status} {error.reason})"
    )
