"""Replicate's trainings API on the local cluster, spoken to by Replicate's own Python client, with webhooks
verified by a Standard Webhooks receiver. The operator is a real process; a test plays the trainer as in
test_operator.py (pod logs and termination messages on kwok's simulated A40 nodes)."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from finetune_harness import DESTINATION, Cluster, OperatorProcess, install_crd, trainer_log_lines
from kubernetes.client.exceptions import ApiException
from kwokpods import register_namespace_logs, terminate_pod, wait_for
from replicate.client import Client
from replicate.exceptions import ReplicateError
from replicate_harness import (
    LOOPBACK_WEBHOOKS,
    TERMINAL,
    Delivery,
    WebhookReceiver,
    create_signing_secret,
    dumps,
    new_signing_key,
    running_receiver,
    service_account_token,
    statuses,
    wait_until_serving,
)
from testcluster import DevCluster, free_port

from finetune_contract.protocol import OutputEvent, OutputFile, termination_message
from finetune_operator.api import GROUP, PLURAL, VERSION

pytestmark = pytest.mark.integration

TRAIN_DATA = "https://datasets.example.com/support/train.jsonl"
BASE_VERSION = "7b2ea1a6d3a3c2f2e9f6ab0e4b7f0f0e1d2c3b4a5968778695a4b3c2d1e0f9a8"
USER_VERBS = ("create", "get", "list", "patch")


def output_of(name: str) -> OutputEvent:
    return OutputEvent(
        weights=f"{DESTINATION}/{name}/",
        files=[OutputFile(path="adapter_model.safetensors", size=16_801_880, sha256="d" * 64)],
        metrics={"train_loss": 1.0},
    )


@pytest.fixture
def cluster(devcluster: DevCluster, namespace: str) -> Cluster:
    install_crd(devcluster.api)
    logs = register_namespace_logs(devcluster.api, namespace, devcluster.pod_log_file(namespace, "all-pods"))
    return Cluster(devcluster, namespace, logs)


@pytest.fixture
def receiver(cluster: Cluster) -> Iterator[WebhookReceiver]:
    key = new_signing_key()
    create_signing_secret(cluster.api, cluster.namespace, key)
    with running_receiver(WebhookReceiver(key)) as running:
        yield running
    assert running.unverified == [], "every delivery verifies with the namespace's signing key"


@pytest.fixture
def api_url() -> str:
    return f"http://127.0.0.1:{free_port()}"


@pytest.fixture
def operator(devcluster: DevCluster, namespace: str, tmp_path: Path, api_url: str) -> Iterator[OperatorProcess]:
    """The operator with the API beside it (`run --api-listen`) and webhooks allowed to reach loopback."""
    process = OperatorProcess(
        namespace,
        devcluster.kubeconfig,
        tmp_path / "operator.log",
        args=("--api-listen", api_url.removeprefix("http://")),
        env=LOOPBACK_WEBHOOKS,
    )
    process.start()
    wait_until_serving(f"{api_url}/v1/trainings")
    yield process
    process.stop()
    sys.stdout.write(f"\n--- operator log ---\n{process.log_path.read_text()[-6000:]}\n")


def reloaded(training: Any) -> Any:
    training.reload()
    return training


def wait_training(training: Any, status: str, seen: list[str] | None = None, timeout: float = 90) -> Any:
    def probe() -> Any:
        reloaded(training)
        if seen is not None and (not seen or seen[-1] != training.status):
            seen.append(training.status)
        return training if training.status == status else None

    return wait_for(probe, timeout=timeout, interval=0.5, description=f"training {training.id} {status}")


def test_replicate_client_trains_polls_lists_and_cancels_with_signed_filtered_retried_webhooks(
    cluster: Cluster, operator: OperatorProcess, receiver: WebhookReceiver, api_url: str
) -> None:
    token = service_account_token(cluster.api, cluster.namespace, "ml-engineer", USER_VERBS)
    client = Client(api_token=token, base_url=api_url)
    receiver.failures = 2  # the first delivery is answered 500 twice, then accepted

    training = client.trainings.create(
        model="meta/llama-2-7b",
        version=BASE_VERSION,
        input={"train_data": TRAIN_DATA, "num_train_epochs": 1, "lora_rank": 16},
        destination=f"{cluster.namespace}/support-bot",
        webhook=receiver.url,
        webhook_events_filter=["start", "completed"],
    )
    assert training.status == "starting"
    assert training.model == "meta/llama-2-7b"
    assert training.version == BASE_VERSION
    given = {"train_data": TRAIN_DATA, "num_train_epochs": 1, "lora_rank": 16}
    assert training.input is not None
    assert training.input == {**training.input, **given}
    assert training.input["lora_alpha"] == 16, "the inputs the training runs with: Replicate's defaults filled in"
    assert training.urls == {
        "get": f"{api_url}/v1/trainings/{training.id}",
        "cancel": f"{api_url}/v1/trainings/{training.id}/cancel",
    }
    namespace, name = training.id.split(".", 1)
    assert namespace == cluster.namespace
    job = cluster.get(name)
    assert job["spec"]["destination"] == f"{DESTINATION}/{namespace}/support-bot/{name}/"
    assert job["spec"]["webhook"]["events"] == ["start", "completed"]

    seen = ["starting"]
    cluster.pass_validation(name)
    wait_training(training, "processing", seen)
    cluster.logs.write(*trainer_log_lines(5))
    wait_for(lambda: "step" in reloaded(training).logs, timeout=60, description="the trainer log in the training")
    pod = cluster.wait_pod(name, "training")
    terminate_pod(cluster.api, cluster.namespace, pod, 0, message=termination_message(output_of(name)))
    wait_training(training, "succeeded", seen)
    assert seen == ["starting", "processing", "succeeded"]
    assert training.output == {
        "weights": output_of(name).weights,
        "version": f"{namespace}/support-bot:{job['metadata']['uid']}",
    }
    assert training.destination == f"{namespace}/support-bot"
    assert str(training.completed_at) >= str(training.started_at) >= str(training.created_at)

    other = client.trainings.create(
        model="meta/llama-2-7b",
        version=BASE_VERSION,
        input={"train_data": TRAIN_DATA},
        destination=f"{cluster.namespace}/other-bot",
    )
    other.cancel()
    wait_training(other, "canceled")
    assert [t.id for t in client.trainings.list()] == [other.id, training.id]  # newest first
    assert client.trainings.get(training.id).status == "succeeded"

    def completed_delivered() -> list[Delivery] | None:
        found = receiver.accepted(training.id)
        return found if found and found[-1].body["status"] in TERMINAL else None

    accepted = wait_for(completed_delivered, timeout=60, description="the completed webhook")
    # Filtered as asked: start and completed, not the logs and output in between. A retried message carries the
    # training as it is at the attempt, so the start message may already say processing.
    assert len(accepted) == 2, dumps(receiver.deliveries)
    assert [d.message_id[-2:] for d in accepted] == ["_1", "_2"]
    assert accepted[0].body["status"] in ("starting", "processing", "succeeded")
    assert accepted[1].body["status"] == "succeeded"
    assert receiver.attempts(accepted[0].message_id) == [500, 500, 200], "the same message, retried"
    assert accepted[1].body["output"]["weights"] == output_of(name).weights
    webhook_state = cluster.status(name)["webhook"]
    assert webhook_state["delivered"] == 2
    assert webhook_state["pending"] == []


def test_webhooks_of_a_kubectl_job_come_in_order_and_survive_kill_9_without_a_second_completed(
    cluster: Cluster, operator: OperatorProcess, receiver: WebhookReceiver
) -> None:
    name = cluster.apply_example("finetunejob.yaml", webhook={"url": receiver.url})
    cluster.pass_validation(name)
    cluster.wait_phase(name, "Running")
    cluster.logs.write(*trainer_log_lines(5))
    wait_for(
        lambda: any("step" in d.body["logs"] for d in receiver.accepted()), timeout=60, description="a logs webhook"
    )

    receiver.fail_terminal_only, receiver.failures = True, 1000  # until the operator is killed
    pod = cluster.wait_pod(name, "training")
    terminate_pod(cluster.api, cluster.namespace, pod, 0, message=termination_message(output_of(name)))
    refused = cluster.wait_status(
        name,
        lambda s: any(
            p["event"] == "completed" and p["attempts"] >= 1 for p in s.get("webhook", {}).get("pending", [])
        ),
        "the completed webhook waiting for its retry",
    )
    message_id = next(p["id"] for p in refused["webhook"]["pending"] if p["event"] == "completed")
    operator.kill()  # only the FineTuneJob remembers the retry now
    receiver.failures = 0
    operator.start()
    cluster.wait_status(name, lambda s: s["webhook"]["pending"] == [], "the completed webhook delivered", timeout=60)
    attempts = receiver.attempts(message_id)
    assert attempts[-1] == 200, attempts
    assert set(attempts[:-1]) == {500}, "accepted once, by the restarted operator"

    operator.kill()  # and again, now that it was delivered and recorded
    operator.start()
    second = cluster.apply_example("finetunejob.yaml", name="after-restart", webhook={"url": receiver.url})
    second_uid = cluster.get(second)["metadata"]["uid"].replace("-", "")
    wait_for(
        lambda: [d for d in receiver.accepted() if second_uid in d.message_id],
        timeout=60,
        description="the restarted operator's first webhook",
    )
    accepted = receiver.accepted(f"{cluster.namespace}.{name}")
    order = statuses(accepted)
    assert order[0] == "starting", dumps(accepted)
    assert order[-1] == "succeeded", dumps(accepted)
    assert "processing" in order
    assert all(status not in TERMINAL for status in order[:-1]), "completed comes last, once"
    assert len({d.message_id for d in accepted}) == len(accepted), "no message accepted twice"
    assert any(d.body["logs"] for d in accepted[1:-1]), "logs arrived while it ran"


@pytest.fixture
def api_alone(devcluster: DevCluster, namespace: str, tmp_path: Path, api_url: str) -> Iterator[str]:
    """`finetune-operator api --listen`: the API without the operator."""
    install_crd(devcluster.api)
    log_path = tmp_path / "api.log"
    command = [sys.executable, "-m", "finetune_operator.cli", "api", "--listen", api_url.removeprefix("http://")]
    env = {"KUBECONFIG": str(devcluster.kubeconfig), "FINETUNE_DEFAULT_DESTINATION": DESTINATION, **LOOPBACK_WEBHOOKS}
    with log_path.open("ab") as log:
        process = subprocess.Popen([*command, "-n", namespace], env={**os.environ, **env}, stdout=log, stderr=log)
    try:
        wait_until_serving(f"{api_url}/v1/trainings")
        yield api_url
    finally:
        process.terminate()
        process.wait(timeout=30)
        sys.stdout.write(f"\n--- api log ---\n{log_path.read_text()[-4000:]}\n")


BAD_BODIES: list[tuple[str, dict[str, Any], dict[str, Any], str]] = [
    ("unknown-input", {"train_data": TRAIN_DATA, "epochs": 3}, {}, "input.epochs"),
    ("wrong-type", {"train_data": TRAIN_DATA, "num_train_epochs": "three"}, {}, "input.num_train_epochs"),
    ("micro-above-train", {"train_data": TRAIN_DATA, "micro_batch_size": 8}, {}, "input.micro_batch_size"),
    ("ftp-train-data", {"train_data": "ftp://files.example.com/train.jsonl"}, {}, "input.train_data"),
    ("ftp-webhook", {"train_data": TRAIN_DATA}, {"webhook": "ftp://hooks.example.com/"}, "webhook"),
    ("metadata-webhook", {"train_data": TRAIN_DATA}, {"webhook": "http://169.254.169.254/"}, "webhook"),
]


def test_api_refuses_callers_without_token_or_rights_and_bad_bodies_and_leaves_no_finetunejob(
    cluster: Cluster, api_alone: str
) -> None:
    def create(client: Client, training_input: dict[str, Any], **more: Any) -> Any:
        return client.trainings.create(
            model="meta/llama-2-7b",
            version=BASE_VERSION,
            input=training_input,
            destination=f"{cluster.namespace}/bot",
            **more,
        )

    for token, detail in (("not-a-token", "Invalid token."), ("", "Authentication credentials were not provided.")):
        with pytest.raises(ReplicateError) as unauthenticated:
            create(Client(api_token=token, base_url=api_alone), {"train_data": TRAIN_DATA})
        assert (unauthenticated.value.status, unauthenticated.value.detail) == (401, detail)

    stranger = Client(api_token=service_account_token(cluster.api, cluster.namespace, "stranger"), base_url=api_alone)
    with pytest.raises(ReplicateError) as forbidden:
        create(stranger, {"train_data": TRAIN_DATA})
    assert forbidden.value.status == 403
    assert "may not create FineTuneJobs" in (forbidden.value.detail or "")
    with pytest.raises(ReplicateError) as forbidden_list:
        stranger.trainings.get(f"{cluster.namespace}.bot-12345678")
    assert forbidden_list.value.status == 403

    user = Client(
        api_token=service_account_token(cluster.api, cluster.namespace, "ml-engineer", USER_VERBS), base_url=api_alone
    )
    for case, training_input, more, field in BAD_BODIES:
        with pytest.raises(ReplicateError) as invalid:
            create(user, training_input, **more)
        assert invalid.value.status == 422, case
        assert (invalid.value.detail or "").startswith(f"{field}: "), f"{case}: {invalid.value.detail}"
    with pytest.raises(ReplicateError) as missing:
        user.trainings.get(f"{cluster.namespace}.bot-12345678")
    assert missing.value.status == 404
    try:
        left = cluster.custom.list_namespaced_custom_object(GROUP, VERSION, cluster.namespace, PLURAL)["items"]
    except ApiException as error:
        raise AssertionError(error.body) from None
    assert left == [], "a refused request leaves no FineTuneJob"
    assert [t.id for t in user.trainings.list()] == []
