"""The few Kubernetes API calls the operator makes, returning objects as the API server sends them (camelCase).

Every call has a timeout, and every call is counted by verb and result code. Writes that must not land on a
re-created namesake are tied to what they were computed for: status patches to the FineTuneJob's
resourceVersion or UID, deletes to the object's UID (delete preconditions).
"""

from __future__ import annotations

import base64
import contextlib
import json
import logging
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import partial
from typing import Any, TypeVar

import kubernetes
import urllib3
from kubernetes.client import ApiClient, BatchV1Api, CoreV1Api, CustomObjectsApi
from kubernetes.client.exceptions import ApiException

from finetune_operator import metrics
from finetune_operator.api import GROUP, KIND, PLURAL, VERSION
from finetune_operator.conventions import MANAGER_NAME

log = logging.getLogger(__name__)
Obj = dict[str, Any]
T = TypeVar("T")

# The field manager each writer sends (it is in the request URI, so the API server's audit log tells them apart).
STATE_MACHINE_MANAGER = MANAGER_NAME
LOG_FOLLOWER_MANAGER = f"{MANAGER_NAME}-log"
WEBHOOK_MANAGER = f"{MANAGER_NAME}-webhooks"


class ApiUnavailable(Exception):
    """The API server answered that it cannot serve now (429, 5xx): try again later."""


# What an API server outage looks like to a client: retried by the work queue, never a bug.
TRANSIENT_API_ERRORS: tuple[type[BaseException], ...] = (
    ApiUnavailable,
    urllib3.exceptions.HTTPError,
    ConnectionError,
    TimeoutError,
)
_UNAVAILABLE = frozenset((429, 502, 503, 504))


class Conflict(Exception):
    """The object changed (or was re-created) since it was read: compute again from a fresh read."""


class Rejected(Exception):
    """The API server refused a child for good (422 Invalid, 403 Forbidden by quota or admission policy)."""

    def __init__(self, kind: str, name: str, status: int, message: str) -> None:
        super().__init__(f"{kind} {name}: {message}")
        self.kind = kind
        self.name = name
        self.status = status
        self.message = message


@dataclass(frozen=True)
class Created:
    """The child the API server holds under the name: the one just created, or one that existed already."""

    object: Obj
    existed: bool


def load_client(pool_size: int = 16) -> ApiClient:
    """In-cluster credentials when running in a pod, else the current KUBECONFIG context."""
    configuration = kubernetes.client.Configuration()
    try:
        kubernetes.config.load_incluster_config(client_configuration=configuration)
    except kubernetes.config.ConfigException:
        kubernetes.config.load_kube_config(client_configuration=configuration)
    configuration.connection_pool_maxsize = pool_size
    return ApiClient(configuration)


def _status_message(error: ApiException) -> str:
    try:
        body = json.loads(error.body or "{}")
    except ValueError:
        return str(error.reason or error.status)
    return str(body.get("message") or error.reason or error.status)


@dataclass
class RequestCount:
    count: int = 0


class KubeApi:
    def __init__(self, client: ApiClient, timeout: float = 30.0) -> None:
        self.client = client
        self.core = CoreV1Api(client)
        self.batch = BatchV1Api(client)
        self.custom = CustomObjectsApi(client)
        self._timeout = timeout
        self._local = threading.local()

    @contextlib.contextmanager
    def counting(self) -> Iterator[RequestCount]:
        """Counts the requests this thread makes inside the block (a reconcile runs on one thread)."""
        counter = RequestCount()
        self._local.counter = counter
        try:
            yield counter
        finally:
            self._local.counter = None

    def _call(self, verb: str, resource: str, call: Callable[[], T]) -> T:
        counter: RequestCount | None = getattr(self._local, "counter", None)
        if counter is not None:
            counter.count += 1
        try:
            result = call()
        except ApiException as error:
            metrics.API_REQUESTS.labels(verb=verb, resource=resource, code=str(error.status)).inc()
            if error.status in _UNAVAILABLE:
                raise ApiUnavailable(f"{verb} {resource}: {error.status} {error.reason}") from error
            raise
        except Exception:
            metrics.API_REQUESTS.labels(verb=verb, resource=resource, code="error").inc()
            raise
        metrics.API_REQUESTS.labels(verb=verb, resource=resource, code="200").inc()
        return result

    # --- FineTuneJobs ------------------------------------------------------------------------------------

    def patch_finetunejob_status(
        self, namespace: str, name: str, status: Mapping[str, Any], resource_version: str
    ) -> Obj:
        """Merge `status` into the FineTuneJob as read at `resource_version`; Conflict if it changed since."""
        body = {"metadata": {"resourceVersion": resource_version}, "status": status}
        patch = partial(self.custom.patch_namespaced_custom_object_status, GROUP, VERSION, namespace, PLURAL, name)
        result: Obj = self._patch(
            "finetunejobs/status",
            patch,
            body,
            STATE_MACHINE_MANAGER,
            content_type="application/merge-patch+json",
            conflict=(frozenset((404, 409)), f"{namespace}/{name} changed since it was read"),
        )
        return result

    def patch_log_fields(self, namespace: str, name: str, uid: str, fields: Mapping[str, Any]) -> None:
        """Set the log follower's status fields, only on the FineTuneJob with `uid`."""
        self._patch_status_fields(namespace, name, uid, fields, LOG_FOLLOWER_MANAGER)

    def patch_webhook_state(self, namespace: str, name: str, uid: str, fields: Mapping[str, Any]) -> None:
        """Set the webhook dispatcher's status field, only on the FineTuneJob with `uid`."""
        self._patch_status_fields(namespace, name, uid, fields, WEBHOOK_MANAGER)

    def _patch_status_fields(
        self, namespace: str, name: str, uid: str, fields: Mapping[str, Any], manager: str
    ) -> None:
        """A JSON patch that first tests the UID: a write for a deleted FineTuneJob never lands on a namesake."""
        operations: list[dict[str, Any]] = [{"op": "test", "path": "/metadata/uid", "value": uid}]
        operations += [{"op": "add", "path": f"/status/{key}", "value": value} for key, value in fields.items()]
        patch = partial(self.custom.patch_namespaced_custom_object_status, GROUP, VERSION, namespace, PLURAL, name)
        self._json_patch("finetunejobs/status", patch, operations, manager)

    def _json_patch(
        self, resource: str, patch: Callable[..., Any], operations: list[dict[str, Any]], manager: str
    ) -> None:
        """Apply `operations`, whose first tests the object's UID; Conflict when it is gone or is a namesake."""
        # 404: deleted. 422 (or 500 from older servers): the test failed, a namesake holds the name now.
        codes = frozenset((404, 409, 422, 500))
        uid = operations[0]["value"]
        conflict = (codes, f"{resource}: no object with UID {uid} (deleted, or a namesake)")
        self._patch(resource, patch, operations, manager, content_type="application/json-patch+json", conflict=conflict)

    def _patch(
        self,
        resource: str,
        patch: Callable[..., Any],
        body: Any,
        manager: str,
        *,
        content_type: str,
        conflict: tuple[frozenset[int], str],
    ) -> Any:
        """`patch(body)` as `manager`; the codes of `conflict` raise Conflict with its message."""
        codes, message = conflict
        try:
            return self._call(
                "patch",
                resource,
                lambda: patch(body, field_manager=manager, _content_type=content_type, _request_timeout=self._timeout),
            )
        except ApiException as error:
            if error.status in codes:
                raise Conflict(message) from error
            raise

    def delete_finetunejob(self, namespace: str, name: str, uid: str) -> None:
        self._delete(
            "finetunejobs",
            lambda options: self.custom.delete_namespaced_custom_object(
                GROUP, VERSION, namespace, PLURAL, name, body=options, _request_timeout=self._timeout
            ),
            uid,
        )

    def list_finetunejobs(self) -> list[Obj]:
        result: Obj = self._call(
            "list",
            "finetunejobs",
            lambda: self.custom.list_cluster_custom_object(GROUP, VERSION, PLURAL, _request_timeout=self._timeout),
        )
        items: list[Obj] = result.get("items", [])
        return items

    # --- children ----------------------------------------------------------------------------------------

    def create(self, manifest: Mapping[str, Any]) -> Created:
        """Create a child, or return the object that already holds its name (for the caller to check its owner).

        Raises Rejected when the API server refuses it for good (invalid, forbidden by quota or policy).
        """
        namespace = manifest["metadata"]["namespace"]
        name = manifest["metadata"]["name"]
        kind = manifest["kind"]
        creators: dict[str, Callable[..., Any]] = {
            "ConfigMap": self.core.create_namespaced_config_map,
            "Service": self.core.create_namespaced_service,
            "Job": self.batch.create_namespaced_job,
        }
        readers: dict[str, Callable[..., Any]] = {
            "ConfigMap": self.core.read_namespaced_config_map,
            "Service": self.core.read_namespaced_service,
            "Job": self.batch.read_namespaced_job,
        }
        resource = f"{kind.lower()}s"
        for _ in range(3):  # a namesake collected between our create and our read: create again
            try:
                response = self._call(
                    "create",
                    resource,
                    lambda: creators[kind](namespace, manifest, _preload_content=False, _request_timeout=self._timeout),
                )
            except ApiException as error:
                if error.status in (403, 422):
                    raise Rejected(kind, name, error.status, _status_message(error)) from error
                if error.status != 409:
                    raise
            else:
                return Created(_json(response), existed=False)
            try:
                existing = self._call(
                    "get",
                    resource,
                    lambda: readers[kind](name, namespace, _preload_content=False, _request_timeout=self._timeout),
                )
            except ApiException as error:
                if error.status != 404:
                    raise
            else:
                return Created(_json(existing), existed=True)
        raise Conflict(f"{kind} {namespace}/{name} keeps appearing and disappearing")

    def set_job_suspend(self, namespace: str, name: str, uid: str, suspend: bool) -> None:
        """Suspend or resume the Job with `uid` (a JSON patch `test`: never a namesake)."""
        operations: list[dict[str, Any]] = [
            {"op": "test", "path": "/metadata/uid", "value": uid},
            {"op": "replace", "path": "/spec/suspend", "value": suspend},
        ]
        with contextlib.suppress(Conflict):
            self._json_patch(
                "jobs", partial(self.batch.patch_namespaced_job, name, namespace), operations, STATE_MACHINE_MANAGER
            )

    def delete_job(self, namespace: str, name: str, uid: str, foreground: bool = False) -> None:
        """Delete the Job with `uid`; `foreground`: it stays (with a deletionTimestamp) until its pods are gone."""
        self._delete(
            "jobs",
            lambda options: self.batch.delete_namespaced_job(
                name, namespace, body=options, _request_timeout=self._timeout
            ),
            uid,
            propagation="Foreground" if foreground else "Background",
        )

    def patch_pod_status(self, namespace: str, name: str, operations: list[dict[str, Any]]) -> None:
        """Apply a JSON patch (which tests the pod's UID) to a pod's status; a pod gone or re-created is left alone."""
        patch = partial(self.core.patch_namespaced_pod_status, name, namespace)
        with contextlib.suppress(Conflict):
            self._json_patch("pods/status", patch, operations, STATE_MACHINE_MANAGER)

    def force_delete_pod(self, namespace: str, name: str, uid: str) -> None:
        """Remove a pod whose kubelet will never confirm its end (its node stopped reporting)."""
        self._delete(
            "pods",
            lambda options: self.core.delete_namespaced_pod(
                name, namespace, body=options, _request_timeout=self._timeout
            ),
            uid,
            grace_period_seconds=0,
        )

    def delete_child(self, kind: str, namespace: str, name: str, uid: str) -> None:
        """Delete the ConfigMap or Service with `uid`."""
        deleters: dict[str, Callable[..., Any]] = {
            "ConfigMap": self.core.delete_namespaced_config_map,
            "Service": self.core.delete_namespaced_service,
        }
        self._delete(
            f"{kind.lower()}s",
            lambda options: deleters[kind](name, namespace, body=options, _request_timeout=self._timeout),
            uid,
        )

    def _delete(
        self,
        resource: str,
        call: Callable[[Any], Any],
        uid: str,
        propagation: str = "Background",
        grace_period_seconds: int | None = None,
    ) -> None:
        """Delete the object with `uid` only: a re-created namesake fails the precondition and stays."""
        options = kubernetes.client.V1DeleteOptions(
            propagation_policy=propagation,
            grace_period_seconds=grace_period_seconds,
            preconditions=kubernetes.client.V1Preconditions(uid=uid),
        )
        try:
            self._call("delete", resource, lambda: call(options))
        except ApiException as error:
            if error.status not in (404, 409):
                raise

    def list_children(self, selector: str) -> tuple[list[Obj], list[Obj]]:
        """Every Job and pod with the label `selector`, across namespaces."""
        jobs = self._call(
            "list",
            "jobs",
            lambda: self.batch.list_job_for_all_namespaces(
                label_selector=selector, _preload_content=False, _request_timeout=self._timeout
            ),
        )
        pods = self._call(
            "list",
            "pods",
            lambda: self.core.list_pod_for_all_namespaces(
                label_selector=selector, _preload_content=False, _request_timeout=self._timeout
            ),
        )
        return _items(jobs), _items(pods)

    def get_child(self, kind: str, namespace: str, name: str) -> Obj | None:
        """A ConfigMap or Service by name, or None (to check whose it is before deleting it)."""
        readers: dict[str, Callable[..., Any]] = {
            "ConfigMap": self.core.read_namespaced_config_map,
            "Service": self.core.read_namespaced_service,
        }
        try:
            response = self._call(
                "get",
                f"{kind.lower()}s",
                lambda: readers[kind](name, namespace, _preload_content=False, _request_timeout=self._timeout),
            )
        except ApiException as error:
            if error.status == 404:
                return None
            raise
        return _json(response)

    def read_secret_key(self, namespace: str, name: str, key: str) -> str:
        """One key of a Secret, decoded (the webhook signing key: the chart lets the operator read one name)."""
        try:
            secret = self._call(
                "get",
                "secrets",
                lambda: self.core.read_namespaced_secret(name, namespace, _request_timeout=self._timeout),
            )
        except ApiException as error:
            raise LookupError(f"cannot read it ({error.status} {error.reason})") from None
        value = (secret.data or {}).get(key)
        if value is None:
            raise LookupError("it has no such key")
        return base64.b64decode(value).decode()

    # --- Events ------------------------------------------------------------------------------------------

    def record_event(self, finetunejob: Mapping[str, Any], type_: str, reason: str, message: str) -> None:
        metadata = finetunejob["metadata"]
        now = datetime.now(UTC)
        event = {
            "metadata": {"generateName": f"{metadata['name']}.", "namespace": metadata["namespace"]},
            "involvedObject": {
                "apiVersion": f"{GROUP}/{VERSION}",
                "kind": KIND,
                "name": metadata["name"],
                "namespace": metadata["namespace"],
                "uid": metadata["uid"],
            },
            "type": type_,
            "reason": reason,
            "message": message[:1024],
            "firstTimestamp": now.isoformat(),
            "lastTimestamp": now.isoformat(),
            "count": 1,
            "source": {"component": MANAGER_NAME},
            "reportingComponent": MANAGER_NAME,
        }
        try:
            self._call(
                "create",
                "events",
                lambda: self.core.create_namespaced_event(metadata["namespace"], event, _request_timeout=self._timeout),
            )
        except Exception as error:
            # An event is a courtesy: never let it fail a reconcile.
            log.warning("could not record event %s on %s: %s", reason, metadata["name"], error)


def _json(response: Any) -> Obj:
    data: Obj = json.loads(response.data)
    return data


def _items(response: Any) -> list[Obj]:
    items: Sequence[Obj] = _json(response).get("items", [])
    return list(items)
