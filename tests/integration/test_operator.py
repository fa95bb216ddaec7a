"""The operator, as a real process, against the real API server; kwok's simulated A40 nodes run the pods.

A test plays the trainer: it writes the trainer's log lines into the simulated pod's log and ends the pod's
container with an exit code and termination message (tests/cluster/README.md says how). Everything else is real:
the operator process, the Job controller, the scheduler, garbage collection.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime
from pathlib import Path

import pytest
import yaml
from finetune_harness import (
    ADMIN,
    CHART_SERVICE_ACCOUNT,
    DESTINATION,
    EXAMPLES,
    Cluster,
    OperatorProcess,
    trainer_log_lines,
)
from kubernetes import client
from kwokpods import restore_node_heartbeat, stop_node_heartbeat, terminate_pod, wait_for
from testcluster import DevCluster

from finetune_contract.protocol import (
    EXIT_USER_ERROR,
    ErrorEvent,
    OutputEvent,
    OutputFile,
    encode,
    termination_message,
)
from finetune_operator.api import GROUP, PLURAL, VERSION

pytestmark = pytest.mark.integration

# The scenarios that also prove the chart's RBAC is enough: run as the admin, and as the chart's ServiceAccount.
AS_ADMIN_AND_CHART_SERVICE_ACCOUNT = pytest.mark.parametrize(
    "operator_identity", [ADMIN, CHART_SERVICE_ACCOUNT], indirect=True
)


OUTPUT = OutputEvent(
    weights=f"{DESTINATION}/NAMESPACE/JOB/",
    files=[
        OutputFile(path="adapter_model.safetensors", size=16_801_880, sha256="a" * 64),
        OutputFile(path="adapter_config.json", size=612, sha256="b" * 64),
    ],
    metrics={"train_loss": 1.0, "eval_loss": 1.2},
)


@AS_ADMIN_AND_CHART_SERVICE_ACCOUNT
def test_minimal_example_runs_to_success_with_progress_and_weights(cluster: Cluster, operator: OperatorProcess) -> None:
    name = cluster.apply_example("finetunejob.yaml")
    cluster.wait_phase(name, "Validating")
    cluster.pass_validation(name)
    running = cluster.wait_phase(name, "Running")
    assert running["resolved"]["trainRows"] == 950
    assert running["workload"]["job"] == f"{name}-train"
    pod = cluster.wait_pod(name, "training")
    train_pod = cluster.core.read_namespaced_pod(pod, cluster.namespace)
    assert train_pod.spec.containers[0].resources.limits["nvidia.com/gpu"] == "8"
    assert train_pod.spec.node_selector["nvidia.com/gpu.product"] == "NVIDIA-A40"

    lines = trainer_log_lines(30)
    cluster.logs.write(*lines)
    # The whole log read: the eval and the sample come after the last step, maybe in the next status write.
    progressed = cluster.wait_status(
        name, lambda s: s.get("logs", "").endswith(lines[-1]), "progress from the trainer log"
    )
    assert progressed["progress"]["step"] == 30
    assert progressed["progress"]["totalSteps"] == 30
    assert progressed["progress"]["percent"] == 100
    assert progressed["progress"]["evalLoss"] == 1.2
    assert progressed["validationSamples"] == [
        {"epoch": 3.0, "prompt": "What is LoRA?", "completion": "A low-rank adapter."}
    ]

    cluster.wait_trainer_ran(pod, 1)
    terminate_pod(cluster.api, cluster.namespace, pod, 0, message=termination_message(OUTPUT))
    done = cluster.wait_phase(name, "Succeeded")
    assert done["output"]["weights"] == OUTPUT.weights
    assert done["output"]["files"][0] == {"path": "adapter_model.safetensors", "size": 16_801_880, "sha256": "a" * 64}
    assert done["completedAt"] >= done["startedAt"] >= done["createdAt"]
    assert done["gpuSeconds"] == cluster.gpu_seconds_of(pod) >= 8
    conditions = {c["type"]: (c["status"], c["reason"]) for c in done["conditions"]}
    assert conditions["Succeeded"] == ("True", "TrainingSucceeded")
    assert conditions["Validated"] == ("True", "DataValid")
    assert done["observedGeneration"] == 1
    # Events follow the status write that records the transition.
    wait_for(
        lambda: (
            {"ValidatingData", "TrainingRunning", "TrainingSucceeded", "BatchSizeRounded"}
            <= cluster.event_reasons(name)
        ),
        timeout=30,
        description="an Event for each transition",
    )
    assert 'finetune_phase_transitions_total{phase="Succeeded"} 1.0' in operator.metrics()


def test_a_burst_of_progress_beyond_the_parsing_budget_is_coalesced_to_its_newest_event(
    cluster: Cluster, namespace: str, tmp_path: Path
) -> None:
    # A budget that never fills: every progress event waits, and only the newest one waiting is ever read.
    operator = OperatorProcess(
        namespace,
        cluster.devcluster.kubeconfig,
        tmp_path / "operator.log",
        env={"FINETUNE_LOG_EVENTS_PER_SECOND": "0.001"},
    )
    operator.start()
    try:
        name = cluster.apply_example("finetunejob.yaml")
        cluster.pass_validation(name)
        cluster.wait_phase(name, "Running")
        cluster.logs.write(*trainer_log_lines(30))
        status = cluster.wait_status(name, lambda s: bool(s.get("validationSamples")), "the sample after the burst")
        assert status["progress"]["step"] == 30
        # A held progress event is read when a status patch goes out (one a second here) or before another event:
        # a few of the 30, always the newest, in order.
        steps = [point["step"] for point in status["lossHistory"]["train"]]
        assert steps[-1] == 30
        assert steps == sorted(set(steps))
        assert len(steps) < 30
        events_read = re.search(r"^finetune_trainer_events_total (\S+)$", operator.metrics(), re.MULTILINE)
        assert events_read is not None
        # start, eval and sample are always read; of the 30 progress events only as many as there are points.
        assert float(events_read.group(1)) == 3 + len(steps)
    finally:
        operator.stop()


def test_user_error_exit_fails_at_once_without_retry(cluster: Cluster, operator: OperatorProcess) -> None:
    name = cluster.apply_example("finetunejob.yaml", backoffLimit=3)
    cluster.pass_validation(name)
    pod = cluster.wait_pod(name, "training")
    error = ErrorEvent(reason="InvalidTrainingData", message='train_data line 17: missing "completion"')
    terminate_pod(cluster.api, cluster.namespace, pod, EXIT_USER_ERROR, message=encode(error))
    failed = cluster.wait_phase(name, "Failed")
    assert failed["error"] == {
        "reason": "InvalidTrainingData",
        "message": 'train_data line 17: missing "completion"',
        "exitCode": 65,
        "pod": pod,
    }
    assert len(cluster.pods(name, "training")) == 1  # no retry
    assert "InvalidTrainingData" in cluster.event_reasons(name)


def test_bad_training_data_fails_in_validation_before_any_gpu_is_claimed(
    cluster: Cluster, operator: OperatorProcess
) -> None:
    name = cluster.apply_example("finetunejob.yaml")
    pod = cluster.wait_pod(name, "validation", index=None)
    assert "nvidia.com/gpu" not in (
        cluster.core.read_namespaced_pod(pod, cluster.namespace).spec.containers[0].resources.limits or {}
    )
    error = ErrorEvent(reason="InvalidTrainingData", message="train_data line 3: not a JSON object")
    terminate_pod(cluster.api, cluster.namespace, pod, EXIT_USER_ERROR, message=encode(error))
    failed = cluster.wait_phase(name, "Failed")
    assert (failed["error"]["reason"], failed["error"]["message"]) == (
        "InvalidTrainingData",
        "train_data line 3: not a JSON object",
    )
    assert failed["reason"] == "InvalidTrainingData"
    assert [job.metadata.name for job in cluster.jobs(name)] == [f"{name}-validate"]


def test_transient_failure_is_retried_then_succeeds(cluster: Cluster, operator: OperatorProcess) -> None:
    name = cluster.apply_example("finetunejob.yaml", backoffLimit=2)
    cluster.pass_validation(name)
    first = cluster.wait_pod(name, "training")
    terminate_pod(cluster.api, cluster.namespace, first, 1, reason="Error", message="NCCL timeout")
    second = cluster.wait_pod(name, "training", exclude=frozenset({first}))
    restarted = cluster.wait_status(name, lambda s: s.get("restarts") == 1, "one restart counted")
    assert restarted["phase"] in ("Starting", "Running")
    cluster.wait_trainer_ran(second, 1)
    terminate_pod(cluster.api, cluster.namespace, second, 0, message=termination_message(OUTPUT))
    done = cluster.wait_phase(name, "Succeeded")
    assert done["restarts"] == 1
    # The GPU time of both pods, the failed one's too.
    assert done["gpuSeconds"] == cluster.gpu_seconds_of(first) + cluster.gpu_seconds_of(second)
    assert "TrainerRestarted" in cluster.event_reasons(name)


@pytest.mark.parametrize("operator_identity", [CHART_SERVICE_ACCOUNT], indirect=True)
def test_a_trainer_whose_node_stopped_reporting_is_released_and_replaced_as_a_disruption(
    cluster: Cluster, operator: OperatorProcess
) -> None:
    name = cluster.apply_example("finetunejob.yaml", backoffLimit=0)
    cluster.pass_validation(name)
    first = cluster.wait_pod(name, "training")
    node = cluster.core.read_namespaced_pod(first, cluster.namespace).spec.node_name
    # The node's kubelet dies: nothing will confirm the pod's end. It is evicted (as the taint manager does once the
    # node is NotReady) and kept from new pods, so that the replacement goes to the other A40 node.
    stop_node_heartbeat(cluster.api, node)
    cluster.core.patch_node(node, {"spec": {"unschedulable": True}})
    try:
        eviction = {
            "apiVersion": "policy/v1",
            "kind": "Eviction",
            "metadata": {"name": first, "namespace": cluster.namespace},
            "deleteOptions": {"gracePeriodSeconds": 1},
        }
        cluster.core.create_namespaced_pod_eviction(first, cluster.namespace, eviction)
        # Released past its grace and a margin, at the job's next resync.
        second = cluster.wait_pod(name, "training", exclude=frozenset({first}), timeout=180)
        wait_for(lambda: "LostPodReleased" in cluster.event_reasons(name), timeout=30, description="the release Event")
        # backoffLimit 0: the lost pod counted as a disruption, not a failure.
        restarted = cluster.wait_status(name, lambda s: s.get("restarts") == 1, "one restart counted")
        assert restarted["phase"] in ("Starting", "Running")
        cluster.wait_trainer_ran(second, 1)
        terminate_pod(cluster.api, cluster.namespace, second, 0, message=termination_message(OUTPUT))
        assert cluster.wait_phase(name, "Succeeded")["restarts"] == 1
    finally:
        cluster.core.patch_node(node, {"spec": {"unschedulable": False}})
        restore_node_heartbeat(cluster.api, node)
        wait_for(lambda: node_is_ready(cluster.core.read_node(node)), timeout=90, description=f"{node} Ready again")


def node_is_ready(node: client.V1Node) -> bool:
    ready = any(c.type == "Ready" and c.status == "True" for c in node.status.conditions or [])
    return ready and not any(t.key.startswith("node.kubernetes.io/") for t in node.spec.taints or [])


def test_sixteen_gpus_per_node_stay_queued_with_the_scheduler_reason(
    cluster: Cluster, operator: OperatorProcess
) -> None:
    name = cluster.apply_example("finetunejob.yaml", resources={"gpusPerNode": 16})
    cluster.pass_validation(name)
    queued = cluster.wait_status(
        name, lambda s: s.get("phase") == "Queued" and s.get("reason") == "Unschedulable", "Queued: Unschedulable"
    )
    assert "nvidia.com/gpu" in queued["message"]
    admitted = next(c for c in queued["conditions"] if c["type"] == "Admitted")
    assert admitted["status"] == "False"
    assert "nvidia.com/gpu" in admitted["message"]


@AS_ADMIN_AND_CHART_SERVICE_ACCOUNT
def test_cancel_removes_the_workload_and_keeps_the_status(cluster: Cluster, operator: OperatorProcess) -> None:
    name = cluster.apply_example("finetunejob.yaml")
    cluster.pass_validation(name)
    cluster.wait_phase(name, "Running")
    cluster.logs.write(*trainer_log_lines(5))
    cluster.wait_status(name, lambda s: s.get("progress", {}).get("step") == 5, "progress")
    cluster.patch_spec(name, cancel=True)
    canceled = cluster.wait_phase(name, "Canceled")
    wait_for(lambda: not cluster.jobs(name), timeout=60, description="the Jobs to be deleted")
    wait_for(lambda: not cluster.pods(name, "training"), timeout=60, description="the pods to be deleted")
    selector = f"finetune.dev/job-name={name}"
    wait_for(
        lambda: not cluster.core.list_namespaced_config_map(cluster.namespace, label_selector=selector).items,
        timeout=60,
        description="the input ConfigMap to be deleted",
    )
    assert canceled["progress"]["step"] == 5
    assert canceled["startedAt"]
    assert cluster.status(name)["phase"] == "Canceled"


@AS_ADMIN_AND_CHART_SERVICE_ACCOUNT
def test_suspend_and_resume_count_the_gpu_time_of_the_pods_before_and_after(
    cluster: Cluster, operator: OperatorProcess
) -> None:
    name = cluster.apply_example("finetunejob.yaml")
    cluster.pass_validation(name)
    first = cluster.wait_pod(name, "training")
    cluster.wait_phase(name, "Running")
    first_started, _ = cluster.trainer_times(first)
    cluster.wait_trainer_ran(first, 2)
    cluster.patch_spec(name, suspend=True)
    suspended = cluster.wait_phase(name, "Suspended")
    wait_for(
        lambda: (
            not [
                p
                for p in cluster.pods(name, "training")
                if p.status.phase == "Running" and not p.metadata.deletion_timestamp
            ]
        ),
        timeout=60,
        description="the trainer pods to be removed",
    )
    first_gone = datetime.now(UTC)
    assert cluster.batch.read_namespaced_job(f"{name}-train", cluster.namespace).spec.suspend is True
    cluster.patch_spec(name, suspend=False)
    second = cluster.wait_pod(name, "training", exclude=frozenset({first}))
    resumed = cluster.wait_phase(name, "Running")
    suspended_condition = next(c for c in resumed["conditions"] if c["type"] == "Suspended")
    assert (suspended_condition["status"], suspended_condition["reason"]) == ("False", "Resumed")

    cluster.wait_trainer_ran(second, 2)
    terminate_pod(cluster.api, cluster.namespace, second, 0, message=termination_message(OUTPUT))
    done = cluster.wait_phase(name, "Succeeded")
    # The first pod is gone, its time is not: at least what was counted when it was suspended, at most its life.
    before_suspend = suspended["gpuSeconds"]
    assert before_suspend >= 8 * 2
    first_at_most = 8 * (int((first_gone - first_started).total_seconds()) + 1)
    assert before_suspend + cluster.gpu_seconds_of(second) <= done["gpuSeconds"]
    assert done["gpuSeconds"] <= first_at_most + cluster.gpu_seconds_of(second)


def test_operator_killed_mid_run_makes_no_duplicates_and_carries_on(
    cluster: Cluster, operator: OperatorProcess
) -> None:
    name = cluster.apply_example("finetunejob.yaml")
    cluster.pass_validation(name)
    pod = cluster.wait_pod(name, "training")
    cluster.wait_phase(name, "Running")
    cluster.logs.write(*trainer_log_lines(10)[:8])
    cluster.wait_status(name, lambda s: s.get("progress", {}).get("step") == 3, "progress before the kill")
    operator.kill()
    started_at = cluster.status(name)["startedAt"]
    cluster.logs.write(*trainer_log_lines(10)[8:])
    operator.start()
    cluster.wait_status(name, lambda s: s.get("progress", {}).get("step") == 10, "progress after the restart")
    terminate_pod(cluster.api, cluster.namespace, pod, 0, message=termination_message(OUTPUT))
    done = cluster.wait_phase(name, "Succeeded")
    assert done["startedAt"] == started_at
    assert sorted(job.metadata.name for job in cluster.jobs(name)) == [f"{name}-train", f"{name}-validate"]
    assert len(cluster.pods(name, "training")) == 1
    config_maps = cluster.core.list_namespaced_config_map(
        cluster.namespace, label_selector=f"finetune.dev/job-name={name}"
    )
    assert len(config_maps.items) == 1


def test_two_node_qlora_example_gets_ranks_zero_and_one_behind_a_service(
    cluster: Cluster, operator: OperatorProcess
) -> None:
    manifest = yaml.safe_load((EXAMPLES / "finetunejob-qlora-2node.yaml").read_text())
    labels = manifest["metadata"].get("labels") or {}
    # Without Kueue in this cluster, drop the queue label so the Job runs at once.
    labels.pop("kueue.x-k8s.io/queue-name", None)
    for secret, data in (("s3-credentials", {"AWS_ACCESS_KEY_ID": "x"}), ("huggingface", {"token": "x"})):
        cluster.core.create_namespaced_secret(cluster.namespace, {"metadata": {"name": secret}, "stringData": data})
    name = cluster.create(manifest["metadata"]["name"], manifest["spec"], labels)
    cluster.pass_validation(name)
    rank0 = cluster.wait_pod(name, "training", index=0)
    rank1 = cluster.wait_pod(name, "training", index=1)
    assert rank0 != rank1
    service = cluster.core.read_namespaced_service(f"{name}-workers", cluster.namespace)
    assert service.spec.cluster_ip == "None"
    env = {e.name: e for e in cluster.core.read_namespaced_pod(rank1, cluster.namespace).spec.containers[0].env}
    assert env["MASTER_ADDR"].value == f"{name}-train-0.{name}-workers"
    assert env["NNODES"].value == "2"
    assert env["NODE_RANK"].value_from.field_ref.field_path.endswith("['batch.kubernetes.io/job-completion-index']")
    pod1 = cluster.core.read_namespaced_pod(rank1, cluster.namespace)
    assert pod1.spec.subdomain == f"{name}-workers"
    assert pod1.spec.hostname == f"{name}-train-1"
    running = cluster.wait_phase(name, "Running")
    assert running["resolved"]["worldSize"] == 16
    assert running["workload"]["service"] == f"{name}-workers"
    # The headless Service resolves <job>-0.<service> (MASTER_ADDR) and <job>-1.<service> to the two pods.
    discovery = client.DiscoveryV1Api(cluster.api)

    def hostnames() -> set[str] | None:
        slices = discovery.list_namespaced_endpoint_slice(
            cluster.namespace, label_selector=f"kubernetes.io/service-name={name}-workers"
        ).items
        names = {endpoint.hostname for piece in slices for endpoint in (piece.endpoints or []) if endpoint.addresses}
        return names if len(names) == 2 else None

    expected = {f"{name}-train-0", f"{name}-train-1"}
    assert wait_for(hostnames, timeout=60, description="both pods behind the headless Service") == expected


def test_kueue_queue_label_creates_the_job_suspended_for_admission(cluster: Cluster, operator: OperatorProcess) -> None:
    name = cluster.create(
        "queued-run", {"input": {"train_data": "https://example.com/data.jsonl"}}, {"kueue.x-k8s.io/queue-name": "a40"}
    )
    cluster.pass_validation(name)
    queued = cluster.wait_status(name, lambda s: s.get("reason") == "AwaitingAdmission", "awaiting Kueue")
    assert queued["phase"] == "Queued"
    job = cluster.batch.read_namespaced_job(f"{name}-train", cluster.namespace)
    assert job.spec.suspend is True
    assert job.metadata.labels["kueue.x-k8s.io/queue-name"] == "a40"
    # Kueue admits by unsuspending the Job; the operator must not suspend it again.
    cluster.batch.patch_namespaced_job(f"{name}-train", cluster.namespace, {"spec": {"suspend": False}})
    cluster.wait_phase(name, "Running")


def test_chatty_trainer_log_tail_stays_within_its_bound(cluster: Cluster, operator: OperatorProcess) -> None:
    name = cluster.apply_example("finetunejob.yaml")
    cluster.pass_validation(name)
    cluster.wait_phase(name, "Running")
    for chunk in range(20):
        cluster.logs.write(*[f"chunk {chunk} line {i} " + "x" * 200 for i in range(250)])
    cluster.logs.write("the last line")
    status = cluster.wait_status(name, lambda s: (s.get("logs") or "").endswith("the last line"), "the last log line")
    assert len(status["logs"].encode()) <= 8192
    assert len(status["logs"].splitlines()) <= 40


def test_deleting_a_finetunejob_removes_its_children_without_waiting(
    cluster: Cluster, operator: OperatorProcess
) -> None:
    name = cluster.apply_example("finetunejob.yaml")
    cluster.pass_validation(name)
    cluster.wait_phase(name, "Running")
    assert not cluster.get(name)["metadata"].get("finalizers")
    operator.stop()  # deletion must not depend on the operator
    cluster.custom.delete_namespaced_custom_object(GROUP, VERSION, cluster.namespace, PLURAL, name)

    wait_for(lambda: cluster.is_gone(name), timeout=30, description="the FineTuneJob to be deleted")
    wait_for(lambda: not cluster.jobs(name), timeout=90, description="garbage collection of the Jobs")


@AS_ADMIN_AND_CHART_SERVICE_ACCOUNT
def test_finished_job_is_deleted_after_its_ttl(cluster: Cluster, operator: OperatorProcess) -> None:
    name = cluster.apply_example("finetunejob.yaml", ttlSecondsAfterFinished=3)
    cluster.pass_validation(name)
    pod = cluster.wait_pod(name, "training")
    terminate_pod(cluster.api, cluster.namespace, pod, 0, message=termination_message(OUTPUT))
    # Kept once it finished (its status could be read), then deleted; when exactly is the TTL policy's unit test.
    cluster.wait_phase(name, "Succeeded")
    wait_for(lambda: cluster.is_gone(name), timeout=60, description="the TTL to delete the FineTuneJob")


def test_run_with_all_namespaces_reconciles_finetunejobs_in_every_namespace(
    cluster: Cluster, devcluster: DevCluster, tmp_path: Path
) -> None:
    other = Cluster(devcluster, f"{cluster.namespace}-b", cluster.logs)
    cluster.core.create_namespace({"metadata": {"name": other.namespace}})
    operator = OperatorProcess(None, devcluster.kubeconfig, tmp_path / "operator.log")
    operator.start()
    try:
        for each in (cluster, other):
            each.create("everywhere", {"input": {"train_data": "https://example.com/data.jsonl"}})
        for each in (cluster, other):
            each.wait_phase("everywhere", "Validating")
            [job] = each.jobs("everywhere")
            assert job.metadata.namespace == each.namespace
    finally:
        operator.stop()
        cluster.core.delete_namespace(other.namespace)
