"""Nothing adopted, nothing overwritten, one leader: against the real API server, with real operator processes."""

from __future__ import annotations

import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from finetune_harness import Cluster, OperatorProcess
from kubernetes import client
from kubernetes.client.exceptions import ApiException
from kwokpods import wait_for
from testcluster import DevCluster

from finetune_operator.api import GROUP, PLURAL, VERSION
from finetune_operator.kube import Conflict, KubeApi

pytestmark = pytest.mark.integration

SPEC = {"input": {"train_data": "s3://datasets/train.jsonl"}}


def owner_uids(obj: client.V1ObjectMeta) -> list[str]:
    return [reference.uid for reference in obj.owner_references or [] if reference.controller]


def test_a_namesake_child_is_never_used_and_the_job_goes_on_once_the_name_is_free(
    cluster: Cluster, operator: OperatorProcess
) -> None:
    squatter = {"metadata": {"name": "llama-input"}, "data": {"input.json": "{}"}}
    cluster.core.create_namespaced_config_map(cluster.namespace, squatter)
    cluster.create("llama", SPEC)
    blocked = cluster.wait_status("llama", lambda s: s.get("reason") == "NameConflict", "the name conflict reported")
    assert f"ConfigMap {cluster.namespace}/llama-input (controller: none)" in blocked["message"]
    validated = next(c for c in blocked["conditions"] if c["type"] == "Validated")
    assert (validated["status"], validated["reason"]) == ("Unknown", "NameConflict")
    wait_for(lambda: "NameConflict" in cluster.event_reasons("llama"), timeout=30, description="a NameConflict Event")
    assert not cluster.jobs("llama"), "nothing is created next to an object the job does not own"
    assert cluster.core.read_namespaced_config_map("llama-input", cluster.namespace).data == {"input.json": "{}"}

    cluster.core.delete_namespaced_config_map("llama-input", cluster.namespace)
    cluster.wait_status("llama", lambda s: s.get("reason") == "ValidatingData", "validation once the name is free")
    uid = cluster.get("llama")["metadata"]["uid"]
    config_map = cluster.core.read_namespaced_config_map("llama-input", cluster.namespace)
    assert owner_uids(config_map.metadata) == [uid]


def test_a_re_created_finetunejob_never_adopts_its_namesakes_workload(
    cluster: Cluster, operator: OperatorProcess
) -> None:
    cluster.create("llama", SPEC)
    cluster.pass_validation("llama")
    cluster.wait_phase("llama", "Running")
    first_uid = cluster.get("llama")["metadata"]["uid"]
    # Delete it leaving its children behind (as a slow garbage collector would), and re-create it at once.
    cluster.custom.delete_namespaced_custom_object(
        GROUP, VERSION, cluster.namespace, PLURAL, "llama", body={"propagationPolicy": "Orphan"}
    )
    wait_for(lambda: cluster.is_gone("llama"), timeout=30, description="the first llama to be deleted")
    cluster.create("llama", SPEC)
    second_uid = cluster.get("llama")["metadata"]["uid"]
    assert second_uid != first_uid

    # Orphaned children keep their names and lose their ownerReferences: nobody's, so not the new llama's either.
    blocked = cluster.wait_status("llama", lambda s: s.get("reason") == "NameConflict", "the namesake's objects")
    assert f"ConfigMap {cluster.namespace}/llama-input (controller: none)" in blocked["message"]
    assert "trainRows" not in blocked.get("resolved", {}), "the namesake's data sizes are not this run's"
    assert "workload" not in blocked
    assert not cluster.pods("llama", "training") or all(
        pod.status.phase == "Running" for pod in cluster.pods("llama", "training")
    )
    old_jobs = cluster.jobs("llama")
    assert {job.metadata.name for job in old_jobs} == {"llama-validate", "llama-train"}
    assert all(not owner_uids(job.metadata) for job in old_jobs), "the new llama took none of them over"

    for job in old_jobs:
        cluster.batch.delete_namespaced_job(job.metadata.name, cluster.namespace, propagation_policy="Background")
    cluster.core.delete_namespaced_config_map("llama-input", cluster.namespace)
    cluster.wait_status("llama", lambda s: s.get("reason") == "ValidatingData", "its own validation")
    jobs = wait_for(
        lambda: [job for job in cluster.jobs("llama") if owner_uids(job.metadata)] or None,
        timeout=30,
        description="the new validation Job",
    )
    assert [(job.metadata.name, owner_uids(job.metadata)) for job in jobs] == [("llama-validate", [second_uid])]


def test_writes_and_deletes_never_land_on_a_re_created_namesake(devcluster: DevCluster, cluster: Cluster) -> None:
    api = KubeApi(devcluster.api)
    cluster.create("llama", SPEC)
    first = cluster.get("llama")
    api.patch_finetunejob_status(
        cluster.namespace, "llama", {"phase": "Validating"}, first["metadata"]["resourceVersion"]
    )
    with pytest.raises(Conflict, match="changed since it was read"):
        api.patch_finetunejob_status(
            cluster.namespace, "llama", {"phase": "Failed"}, first["metadata"]["resourceVersion"]
        )

    cluster.custom.delete_namespaced_custom_object(GROUP, VERSION, cluster.namespace, PLURAL, "llama")
    wait_for(lambda: cluster.is_gone("llama"), timeout=30, description="llama to be deleted")
    cluster.create("llama", SPEC)
    with pytest.raises(Conflict, match=f"no object with UID {first['metadata']['uid']}"):
        api.patch_log_fields(cluster.namespace, "llama", first["metadata"]["uid"], {"logs": "not mine"})
    api.delete_finetunejob(cluster.namespace, "llama", first["metadata"]["uid"])
    survivor = cluster.get("llama")
    assert survivor["metadata"]["uid"] != first["metadata"]["uid"]
    assert "logs" not in (survivor.get("status") or {})
    # The state machine writes first (a log is followed only once the job runs); then the follower may.
    api.patch_finetunejob_status(
        cluster.namespace, "llama", {"phase": "Running"}, survivor["metadata"]["resourceVersion"]
    )
    api.patch_log_fields(cluster.namespace, "llama", survivor["metadata"]["uid"], {"logs": "mine"})
    assert cluster.status("llama")["logs"] == "mine"


def test_a_child_the_api_server_refuses_fails_the_job_with_its_message(
    cluster: Cluster, operator: OperatorProcess
) -> None:
    quota = {"metadata": {"name": "no-jobs"}, "spec": {"hard": {"count/jobs.batch": "0"}}}
    cluster.core.create_namespaced_resource_quota(cluster.namespace, quota)
    wait_for(
        lambda: cluster.core.read_namespaced_resource_quota("no-jobs", cluster.namespace).status.hard,
        timeout=30,
        description="the quota to be counted",
    )
    cluster.create("llama", SPEC)
    failed = cluster.wait_phase("llama", "Failed")
    assert failed["reason"] == "CreateRejected"
    assert failed["error"]["reason"] == "CreateRejected"
    assert f"Job {cluster.namespace}/llama-validate" in failed["message"]
    assert "exceeded quota: no-jobs" in failed["message"]
    attempts = sum(1 for line in operator.log_path.read_text().splitlines() if "CreateValidation" in line)
    assert attempts == 1, "a refusal that cannot heal is not retried"


def lease_holder(devcluster: DevCluster, namespace: str) -> str | None:
    try:
        lease = client.CoordinationV1Api(devcluster.api).read_namespaced_lease("finetune-operator", namespace)
    except ApiException as error:
        if error.status == 404:
            return None
        raise
    holder: str | None = lease.spec.holder_identity
    return holder


def test_two_replicas_one_leads_the_standby_writes_nothing_and_takes_over_after_kill_9(
    devcluster: DevCluster, cluster: Cluster, namespace: str, tmp_path: Path
) -> None:
    lease_seconds = 6
    election = {
        "FINETUNE_LEADER_ELECTION": "true",
        "FINETUNE_LEADER_ELECTION_NAMESPACE": namespace,
        "FINETUNE_LEASE_DURATION_SECONDS": str(lease_seconds),
        "FINETUNE_RENEW_DEADLINE_SECONDS": "4",
        "FINETUNE_RETRY_PERIOD_SECONDS": "1",
    }
    replicas = {
        name: OperatorProcess(
            namespace, devcluster.kubeconfig, tmp_path / f"{name}.log", env={**election, "POD_NAME": name}
        )
        for name in ("replica-a", "replica-b")
    }
    replicas["replica-a"].start()
    try:
        wait_for(lambda: lease_holder(devcluster, namespace) == "replica-a", timeout=60, description="a to lead")
        replicas["replica-b"].start()
        standby = replicas["replica-b"]
        wait_for(lambda: standby.probe("/healthz") == 200, timeout=60, description="the standby's /healthz")
        assert standby.probe("/readyz") == 503
        assert replicas["replica-a"].probe("/readyz") == 200

        cluster.create("llama", SPEC)
        cluster.wait_phase("llama", "Validating")
        assert "finetune_status_patches_total{" not in standby.metrics(), "the standby writes nothing"

        replicas["replica-a"].kill()
        killed_at = time.monotonic()
        wait_for(lambda: lease_holder(devcluster, namespace) == "replica-b", timeout=60, description="b to lead")
        # A figure, not an assertion (this machine is shared): client-go's rule makes it about the lease duration.
        sys.stdout.write(f"\nstandby led {time.monotonic() - killed_at:.1f}s after kill -9 (lease {lease_seconds}s)\n")
        cluster.pass_validation("llama")
        cluster.wait_phase("llama", "Running")
    finally:
        for replica in replicas.values():
            replica.stop()
            sys.stdout.write(f"\n--- {replica.log_path.name} ---\n{replica.log_path.read_text()[-3000:]}\n")


def test_pods_a_quota_forbids_are_reported_in_status_within_seconds(
    cluster: Cluster, operator: OperatorProcess
) -> None:
    quota = {"metadata": {"name": "no-pods"}, "spec": {"hard": {"pods": "0"}}}
    cluster.core.create_namespaced_resource_quota(cluster.namespace, quota)
    wait_for(
        lambda: cluster.core.read_namespaced_resource_quota("no-pods", cluster.namespace).status.hard,
        timeout=30,
        description="the quota to be counted",
    )
    cluster.create("llama", SPEC)
    status = cluster.wait_status("llama", lambda s: s.get("reason") == "FailedCreate", "the Job controller's warning")
    assert status["phase"] == "Validating"
    assert "exceeded quota: no-pods" in status["message"]
    validated = next(c for c in status["conditions"] if c["type"] == "Validated")
    assert (validated["status"], validated["reason"]) == ("Unknown", "FailedCreate")


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def reconciles(operator: OperatorProcess) -> float:
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in operator.metrics().splitlines()
        if line.startswith("finetune_reconciles_total{")
    )


def test_two_thousand_unrelated_pods_cost_the_operator_no_memory_and_no_reconciles(
    devcluster: DevCluster, cluster: Cluster, namespace: str, tmp_path: Path
) -> None:
    # The unrelated pods share the namespace the operator watches.
    operator = OperatorProcess(namespace, devcluster.kubeconfig, tmp_path / "operator.log")
    operator.start()
    try:
        # A job that has finished (here at once: no weights for its model) has nothing left to look at: every
        # reconcile from now on is one something caused.
        cluster.create("llama", {**SPEC, "model": {"name": "example/unknown-model"}})
        cluster.wait_phase("llama", "Failed")
        settled = reconciles(operator)
        assert operator.process is not None
        before = rss_bytes(operator.process.pid)

        def make(index: int) -> None:
            pod = {
                "metadata": {"name": f"unrelated-{index}", "labels": {"app": "web"}},
                # Held back from the scheduler: an unrelated workload that costs the cluster little.
                "spec": {
                    "schedulingGates": [{"name": "example.com/hold"}],
                    "containers": [{"name": "c", "image": "x"}],
                },
            }
            cluster.core.create_namespaced_pod(namespace, pod)

        with ThreadPoolExecutor(max_workers=8) as pool:
            list(pool.map(make, range(2000)))
        assert len(cluster.core.list_namespaced_pod(namespace, label_selector="app=web").items) == 2000
        # The watch on pods has a label selector: none of these reaches the operator. A change of the job after
        # them gives the pods time to show otherwise.
        cluster.patch_spec("llama", ttlSecondsAfterFinished=600)
        cluster.wait_status("llama", lambda s: s.get("observedGeneration") == 2, "the operator to see the change")
        after = rss_bytes(operator.process.pid)
        assert after - before < 10 * 1024 * 1024, f"RSS grew by {(after - before) / 2**20:.1f} MiB"
        # The spec change is the only news: its reconcile, and one for the status it wrote; none for 2,000 pods.
        assert reconciles(operator) - settled <= 2
    finally:
        operator.stop()
        cluster.core.delete_collection_namespaced_pod(namespace, label_selector="app=web", grace_period_seconds=0)
