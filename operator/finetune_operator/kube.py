"""The few Kubernetes API calls the operator makes, returning objects as the API server sends them (camelCase)."""

from __future__ import annotations

import base64
import json
import logging
from collections.abc import Iterator, Mapping
from datetime import UTC, datetime
from typing import Any

import kubernetes
from kubernetes.client import ApiClient, BatchV1Api, CoreV1Api, CustomObjectsApi
from kubernetes.client.exceptions import ApiException
from urllib3.exceptions import ReadTimeoutError

from finetune_operator.api import GROUP, KIND, PLURAL, VERSION

log = logging.getLogger(__name__)
Obj = dict[str, Any]


def load_client() -> ApiClient:
    """In-cluster credentials when running in a pod, else the current KUBECONFIG context."""
    try:
        kubernetes.config.load_incluster_config()
    except kubernetes.config.ConfigException:
        kubernetes.config.load_kube_config()
    return ApiClient()


class KubeApi:
    def __init__(self, client: ApiClient) -> None:
        self.core = CoreV1Api(client)
        self.batch = BatchV1Api(client)
        self.custom = CustomObjectsApi(client)

    # FineTuneJobs
    def get_finetunejob(self, namespace: str, name: str) -> Obj | None:
        return _or_none(lambda: self.custom.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name))

    def patch_finetunejob_status(self, namespace: str, name: str, status: Mapping[str, Any]) -> None:
        try:
            self.custom.patch_namespaced_custom_object_status(
                GROUP, VERSION, namespace, PLURAL, name, {"status": status}
            )
        except ApiException as error:
            if error.status != 404:
                raise

    def delete_finetunejob(self, namespace: str, name: str) -> None:
        _ignore_missing(lambda: self.custom.delete_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name))

    # Children
    def get_job(self, namespace: str, name: str) -> Obj | None:
        return _or_none(lambda: _json(self.batch.read_namespaced_job(name, namespace, _preload_content=False)))

    def list_pods(self, namespace: str, selector: str) -> list[Obj]:
        response = self.core.list_namespaced_pod(namespace, label_selector=selector, _preload_content=False)
        items: list[Obj] = _json(response).get("items", [])
        return items

    def container_terminated(self, namespace: str, pod: str, container: str) -> bool:
        """Whether the container has stopped for good (or its pod is gone)."""
        found = _or_none(lambda: _json(self.core.read_namespaced_pod(pod, namespace, _preload_content=False)))
        if found is None:
            return True
        for status in found.get("status", {}).get("containerStatuses", []) or []:
            if status.get("name") == container:
                return "terminated" in (status.get("state") or {})
        return found.get("status", {}).get("phase") in ("Succeeded", "Failed")

    def create(self, manifest: Mapping[str, Any]) -> None:
        """Create a child; one that already exists is left as it is, so a restarted operator makes no twin."""
        namespace = manifest["metadata"]["namespace"]
        kind = manifest["kind"]
        creators = {
            "ConfigMap": self.core.create_namespaced_config_map,
            "Service": self.core.create_namespaced_service,
            "Job": self.batch.create_namespaced_job,
        }
        try:
            creators[kind](namespace, manifest)
        except ApiException as error:
            if error.status != 409:
                raise

    def set_job_suspend(self, namespace: str, name: str, suspend: bool) -> None:
        _ignore_missing(lambda: self.batch.patch_namespaced_job(name, namespace, {"spec": {"suspend": suspend}}))

    def delete_children(self, namespace: str, jobs: list[str], services: list[str], config_maps: list[str]) -> None:
        background = kubernetes.client.V1DeleteOptions(propagation_policy="Background")
        for job in jobs:
            _ignore_missing(lambda job=job: self.batch.delete_namespaced_job(job, namespace, body=background))
        for service in services:
            _ignore_missing(lambda service=service: self.core.delete_namespaced_service(service, namespace))
        for config_map in config_maps:
            _ignore_missing(lambda cm=config_map: self.core.delete_namespaced_config_map(cm, namespace))

    def read_secret_key(self, namespace: str, name: str, key: str) -> str:
        """One key of a Secret, decoded (the webhook signing key: the chart lets the operator read one name)."""
        try:
            secret = self.core.read_namespaced_secret(name, namespace)
        except ApiException as error:
            raise LookupError(f"cannot read it ({error.status} {error.reason})") from None
        value = (secret.data or {}).get(key)
        if value is None:
            raise LookupError("it has no such key")
        return base64.b64decode(value).decode()

    # Events and logs
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
            "source": {"component": "finetune-operator"},
            "reportingComponent": "finetune-operator",
        }
        try:
            self.core.create_namespaced_event(metadata["namespace"], event)
        except ApiException as error:
            # An event is a courtesy: never let it fail a reconcile.
            log.warning("could not record event %s on %s: %s", reason, metadata["name"], error.reason)

    def follow_log(self, namespace: str, pod: str, container: str, idle_timeout: float) -> Iterator[str]:
        """The container's log from its start, then new lines as they come, until the container stops.

        Also ends when no byte arrives for `idle_timeout` seconds: the caller decides whether to follow again.
        """
        response = self.core.read_namespaced_pod_log(
            pod,
            namespace,
            container=container,
            follow=True,
            _preload_content=False,
            _request_timeout=(10, idle_timeout),
        )
        pending = b""
        try:
            for chunk in response.stream(4096, decode_content=True):
                pending += chunk
                *lines, pending = pending.split(b"\n")
                for line in lines:
                    yield line.decode("utf-8", errors="replace")
        except ReadTimeoutError:
            return
        finally:
            response.release_conn()
        if pending:
            yield pending.decode("utf-8", errors="replace")


def _json(response: Any) -> Obj:
    data: Obj = json.loads(response.data)
    return data


def _or_none(call: Any) -> Obj | None:
    try:
        result: Obj = call()
        return result
    except ApiException as error:
        if error.status == 404:
            return None
        raise


def _ignore_missing(call: Any) -> None:
    try:
        call()
    except ApiException as error:
        if error.status != 404:
            raise
