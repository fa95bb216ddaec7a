"""The local control plane behaves like a cluster: scheduling, Jobs, GC, RBAC, CRDs and pod logs."""

from __future__ import annotations

import queue
import subprocess
import sys
import threading
import uuid
from typing import Any

import devcluster as dc
import pytest
from kubernetes import client
from kubernetes.client.exceptions import ApiException
from kwokpods import (
    GPU_RESOURCE,
    PodLogsFactory,
    gpu_pod_manifest,
    gpu_pod_spec,
    register_namespace_logs,
    terminate_pod,
    termination_annotations,
    wait_for,
    wait_for_pod_log,
    wait_for_pod_phase,
)
from testcluster import DEVCLUSTER_SCRIPT, DevCluster

pytestmark = pytest.mark.integration


def _core(devcluster: DevCluster) -> Any:
    """The CoreV1Api, untyped: the kubernetes package's typed models would only add None checks here."""
    return client.CoreV1Api(devcluster.api)


def _cpu_pod(name: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name},
        "spec": {
            "restartPolicy": "Never",
            "nodeSelector": {"type": "kwok"},
            "containers": [{"name": "main", "image": "registry.example/busybox:test"}],
        },
    }


def _job(name: str, *, completions: int, annotations: dict[str, str] | None = None, **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": name},
        "spec": {
            "completions": completions,
            "parallelism": completions,
            "completionMode": "Indexed",
            "backoffLimit": 3,
            "template": {
                "metadata": {"annotations": annotations or {}},
                "spec": gpu_pod_spec(gpus=1),
            },
            **spec,
        },
    }


def _job_condition(batch: Any, namespace: str, name: str, kind: str) -> Any:
    job = batch.read_namespaced_job(name, namespace)
    for condition in job.status.conditions or []:
        if condition.type == kind and condition.status == "True":
            return condition
    return None


def test_pod_requesting_eight_a40s_is_scheduled_and_running(devcluster: DevCluster, namespace: str) -> None:
    core: Any = client.CoreV1Api(devcluster.api)
    core.create_namespaced_pod(namespace, gpu_pod_manifest("trainer", gpus=8))

    pod = wait_for_pod_phase(devcluster.api, namespace, "trainer", ["Running"])

    assert pod.spec.node_name.startswith("gpu-node-")
    assert all(status.ready and status.state.running for status in pod.status.container_statuses)
    node = core.read_node(pod.spec.node_name)
    assert node.status.allocatable[GPU_RESOURCE] == "8"
    assert node.metadata.labels["nvidia.com/gpu.product"] == "NVIDIA-A40"


def test_pod_requesting_sixteen_gpus_stays_pending_with_a_failed_scheduling_event(
    devcluster: DevCluster, namespace: str
) -> None:
    core: Any = client.CoreV1Api(devcluster.api)
    core.create_namespaced_pod(namespace, gpu_pod_manifest("too-big", gpus=16))

    def failed_scheduling() -> Any:
        events = core.list_namespaced_event(namespace, field_selector="involvedObject.name=too-big").items
        return next((e for e in events if e.reason == "FailedScheduling"), None)

    event = wait_for(failed_scheduling, timeout=90, description="a FailedScheduling event")

    assert GPU_RESOURCE in event.message
    pod = core.read_namespaced_pod("too-big", namespace)
    assert pod.status.phase == "Pending"
    assert not pod.spec.node_name


def test_indexed_job_gets_pods_with_indexes_zero_and_one_and_completes(devcluster: DevCluster, namespace: str) -> None:
    core: Any = client.CoreV1Api(devcluster.api)
    batch: Any = client.BatchV1Api(devcluster.api)
    batch.create_namespaced_job(namespace, _job("indexed", completions=2))

    def running_pods() -> list[Any] | None:
        pods = core.list_namespaced_pod(namespace, label_selector="job-name=indexed").items
        running = [p for p in pods if p.status.phase == "Running"]
        return running if len(running) == 2 else None

    pods = wait_for(running_pods, timeout=90, description="two Running pods of the Job")
    indexes = sorted(p.metadata.annotations["batch.kubernetes.io/job-completion-index"] for p in pods)
    assert indexes == ["0", "1"]

    for pod in pods:
        terminate_pod(devcluster.api, namespace, pod.metadata.name, 0)

    wait_for(lambda: _job_condition(batch, namespace, "indexed", "Complete"), timeout=90, description="Complete")
    job = batch.read_namespaced_job("indexed", namespace)
    assert job.status.succeeded == 2
    assert job.status.completed_indexes == "0,1"


def test_container_exit_code_fails_the_job_under_its_pod_failure_policy(devcluster: DevCluster, namespace: str) -> None:
    batch: Any = client.BatchV1Api(devcluster.api)
    policy = {"rules": [{"action": "FailJob", "onExitCodes": {"operator": "In", "values": [42]}}]}
    batch.create_namespaced_job(
        namespace,
        _job(
            "doomed",
            completions=1,
            annotations=termination_annotations(42, reason="Error", message="CUDA out of memory"),
            podFailurePolicy=policy,
        ),
    )

    failed = wait_for(
        lambda: _job_condition(batch, namespace, "doomed", "Failed"),
        timeout=90,
        description="the Job to fail",
    )

    assert failed.reason == "PodFailurePolicy"
    assert "42" in failed.message


def test_terminated_container_reports_the_chosen_exit_code_reason_and_message(
    devcluster: DevCluster, namespace: str
) -> None:
    core: Any = client.CoreV1Api(devcluster.api)
    core.create_namespaced_pod(namespace, _cpu_pod("worker"))
    wait_for_pod_phase(devcluster.api, namespace, "worker", ["Running"])

    terminate_pod(devcluster.api, namespace, "worker", 3, reason="OOMKilled", message="out of memory")

    pod = wait_for_pod_phase(devcluster.api, namespace, "worker", ["Failed"])
    terminated = pod.status.container_statuses[0].state.terminated
    assert (terminated.exit_code, terminated.reason, terminated.message) == (3, "OOMKilled", "out of memory")


def test_garbage_collector_removes_objects_whose_owner_is_deleted(devcluster: DevCluster, namespace: str) -> None:
    core: Any = client.CoreV1Api(devcluster.api)
    owner = core.create_namespaced_config_map(namespace, {"metadata": {"name": "owner"}})
    reference = {"apiVersion": "v1", "kind": "ConfigMap", "name": "owner", "uid": owner.metadata.uid}
    core.create_namespaced_config_map(namespace, {"metadata": {"name": "dependent", "ownerReferences": [reference]}})

    core.delete_namespaced_config_map("owner", namespace, propagation_policy="Background")

    def dependent_gone() -> bool:
        try:
            core.read_namespaced_config_map("dependent", namespace)
        except ApiException as error:
            if error.status == 404:
                return True
            raise
        return False

    wait_for(dependent_gone, timeout=90, description="the garbage collector to delete the dependent")


def test_service_account_without_rights_is_forbidden(devcluster: DevCluster, namespace: str) -> None:
    core: Any = client.CoreV1Api(devcluster.api)
    rbac: Any = client.RbacAuthorizationV1Api(devcluster.api)
    core.create_namespaced_service_account(namespace, {"metadata": {"name": "nobody"}})
    token = core.create_namespaced_service_account_token(
        "nobody", namespace, {"spec": {"expirationSeconds": 600}}
    ).status.token
    configuration = client.Configuration()
    configuration.host = devcluster.server
    configuration.ssl_ca_cert = devcluster.api.configuration.ssl_ca_cert
    as_nobody: Any = client.ApiClient(configuration, header_name="Authorization", header_value=f"Bearer {token}")
    try:
        with pytest.raises(ApiException) as denied:
            client.CoreV1Api(as_nobody).list_namespaced_pod(namespace)
        assert denied.value.status == 403

        # The same token works once a Role grants the right: authentication is fine, RBAC decides.
        rbac.create_namespaced_role(
            namespace,
            {
                "metadata": {"name": "pod-reader"},
                "rules": [{"apiGroups": [""], "resources": ["pods"], "verbs": ["list"]}],
            },
        )
        rbac.create_namespaced_role_binding(
            namespace,
            {
                "metadata": {"name": "nobody-reads-pods"},
                "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "pod-reader"},
                "subjects": [{"kind": "ServiceAccount", "name": "nobody", "namespace": namespace}],
            },
        )

        def allowed() -> bool:
            try:
                client.CoreV1Api(as_nobody).list_namespaced_pod(namespace)
            except ApiException as error:
                if error.status == 403:  # the authorizer's cache has not seen the RoleBinding yet
                    return False
                raise
            return True

        wait_for(allowed, timeout=30, description="the RoleBinding to take effect")
    finally:
        as_nobody.close()


def test_custom_resource_is_created_and_its_status_subresource_patched(devcluster: DevCluster, namespace: str) -> None:
    extensions: Any = client.ApiextensionsV1Api(devcluster.api)
    custom: Any = client.CustomObjectsApi(devcluster.api)
    group = f"t{uuid.uuid4().hex[:8]}.devcluster.finetune.dev"
    schema = {
        "type": "object",
        "properties": {
            "spec": {"type": "object", "properties": {"size": {"type": "integer"}}},
            "status": {"type": "object", "properties": {"phase": {"type": "string"}}},
        },
    }
    crd = {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"widgets.{group}"},
        "spec": {
            "group": group,
            "scope": "Namespaced",
            "names": {"plural": "widgets", "singular": "widget", "kind": "Widget"},
            "versions": [
                {
                    "name": "v1",
                    "served": True,
                    "storage": True,
                    "schema": {"openAPIV3Schema": schema},
                    "subresources": {"status": {}},
                }
            ],
        },
    }
    extensions.create_custom_resource_definition(crd)
    try:

        def established() -> bool:
            conditions = extensions.read_custom_resource_definition(f"widgets.{group}").status.conditions or []
            return any(c.type == "Established" and c.status == "True" for c in conditions)

        wait_for(established, timeout=60, description="the CRD to be established")
        body = {"apiVersion": f"{group}/v1", "kind": "Widget", "metadata": {"name": "w"}, "spec": {"size": 3}}
        wait_for(
            lambda: custom.create_namespaced_custom_object(group, "v1", namespace, "widgets", body),
            timeout=30,
            description="the Widget to be created",
        )

        custom.patch_namespaced_custom_object_status(
            group, "v1", namespace, "widgets", "w", {"status": {"phase": "Ready"}}
        )
        # the main resource ignores status, the status subresource ignores spec
        custom.patch_namespaced_custom_object(group, "v1", namespace, "widgets", "w", {"status": {"phase": "Nope"}})

        widget = custom.get_namespaced_custom_object(group, "v1", namespace, "widgets", "w")
        assert widget["status"] == {"phase": "Ready"}
        assert widget["spec"] == {"size": 3}
    finally:
        extensions.delete_custom_resource_definition(f"widgets.{group}")


def test_kubectl_logs_returns_the_lines_written_for_the_pod(
    devcluster: DevCluster, namespace: str, pod_logs: PodLogsFactory
) -> None:
    _core(devcluster).create_namespaced_pod(namespace, _cpu_pod("chatty"))
    wait_for_pod_phase(devcluster.api, namespace, "chatty", ["Running"])
    logs = pod_logs(namespace, "chatty")
    logs.write("step 1 loss 2.31", "step 2 loss 2.05")

    wait_for_pod_log(devcluster.api, namespace, "chatty", "step 2 loss 2.05")
    output = devcluster.kubectl_run("logs", f"--namespace={namespace}", "chatty").stdout
    assert output.splitlines() == ["step 1 loss 2.31", "step 2 loss 2.05"]


def test_following_logs_streams_lines_appended_after_the_stream_started(
    devcluster: DevCluster, namespace: str, pod_logs: PodLogsFactory
) -> None:
    _core(devcluster).create_namespaced_pod(namespace, _cpu_pod("follower"))
    wait_for_pod_phase(devcluster.api, namespace, "follower", ["Running"])
    logs = pod_logs(namespace, "follower")
    logs.write("before the stream")
    wait_for_pod_log(devcluster.api, namespace, "follower", "before the stream")

    follow = subprocess.Popen(
        [
            str(devcluster.kubectl),
            f"--kubeconfig={devcluster.kubeconfig}",
            "logs",
            "-f",
            "-n",
            namespace,
            "follower",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    lines: queue.Queue[str] = queue.Queue()

    def pump() -> None:
        assert follow.stdout is not None
        for line in follow.stdout:
            lines.put(line.rstrip("\n"))

    threading.Thread(target=pump, daemon=True).start()
    try:
        assert lines.get(timeout=30) == "before the stream"
        for step in range(3):
            logs.write(f"appended {step}")
            assert lines.get(timeout=30) == f"appended {step}"
    finally:
        follow.kill()
        follow.wait(timeout=10)


def test_pods_of_a_job_serve_the_namespace_log_file(devcluster: DevCluster, namespace: str) -> None:
    logs = register_namespace_logs(devcluster.api, namespace, devcluster.pod_log_file(namespace, "all-pods"))
    batch: Any = client.BatchV1Api(devcluster.api)
    batch.create_namespaced_job(namespace, _job("logged", completions=1))

    def running_pod() -> str | None:
        pods = _core(devcluster).list_namespaced_pod(namespace, label_selector="job-name=logged").items
        return next((p.metadata.name for p in pods if p.status.phase == "Running"), None)

    pod = wait_for(running_pod, timeout=90, description="the Job's pod to run")
    logs.write('{"event": "step", "step": 1}', stream="stderr")

    assert wait_for_pod_log(devcluster.api, namespace, pod, '"step": 1').splitlines() == [
        '{"event": "step", "step": 1}'
    ]


def test_devcluster_up_reuses_the_healthy_cluster(devcluster: DevCluster) -> None:
    layout = dc.Layout(dc.state_dir())
    before = dc.State.load(layout.state)
    assert before is not None
    result = subprocess.run(
        [sys.executable, str(DEVCLUSTER_SCRIPT), "up"],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )

    assert "reusing the healthy cluster" in result.stdout
    assert devcluster.server in result.stdout
    after = dc.State.load(layout.state)
    assert after is not None
    assert after.pids == before.pids  # the same processes: nothing was restarted
