"""Replicate's training requests and objects against FineTuneJobs: the pure mapping both ways, and list pages."""

from __future__ import annotations

from typing import Any

import pytest

from finetune_operator.api import FineTuneJobSpec
from finetune_operator.replicate_api.auth import bearer_token
from finetune_operator.replicate_api.mapping import (
    InvalidTraining,
    finetunejob_manifest,
    job_name,
    owner_namespace,
    parse_request,
    parse_training_id,
    request_field,
    to_training,
    training_id,
)
from finetune_operator.replicate_api.pages import page
from finetune_operator.replicate_api.training import Training, TrainingUrls
from finetune_operator.settings import Settings

TRAIN_DATA = "https://datasets.example.com/train.jsonl"
SETTINGS = Settings(
    default_destination="s3://finetunes",
    model_weights={"meta/llama-2-7b": "hf://meta-llama/Llama-2-7b-hf", "meta/llama-2-7b:v2": "s3://weights/v2/"},
    api_owner_namespaces={"acme_ml": "team-acme"},
    webhook_allowed_networks=[],
)


def manifest(
    body: dict[str, Any], version: str = "v1", settings: Settings = SETTINGS, base_model: str = "meta/llama-2-7b"
) -> dict[str, Any]:
    request = parse_request(body)
    return finetunejob_manifest(
        request,
        base_model=base_model,
        version=version,
        namespace="alice",
        name="support-bot-abcd1234",
        created_by="system:serviceaccount:alice:ci",
        settings=settings,
    )


def rejected_fields(body: Any, **kwargs: Any) -> dict[str, str]:
    with pytest.raises(InvalidTraining) as raised:
        manifest(body, **kwargs)
    return {problem.field: problem.description for problem in raised.value.problems}


def test_a_request_becomes_a_finetunejob_in_the_owner_namespace_writing_under_the_model_name() -> None:
    made = manifest(
        {
            "destination": "alice/support-bot",
            "input": {"train_data": TRAIN_DATA, "num_train_epochs": "2"},
            "webhook": "https://hooks.example.com/replicate",
            "webhook_events_filter": ["start", "completed", "start"],
        }
    )
    assert made["metadata"]["namespace"] == "alice"
    assert made["metadata"]["annotations"] == {
        "finetune.dev/destination": "alice/support-bot",
        "finetune.dev/model-version": "v1",
        "finetune.dev/created-by": "system:serviceaccount:alice:ci",
    }
    spec = made["spec"]
    assert spec["input"] == {"train_data": TRAIN_DATA, "num_train_epochs": 2}
    assert spec["model"] == {"name": "meta/llama-2-7b", "weights": "hf://meta-llama/Llama-2-7b-hf"}
    assert spec["destination"] == "s3://finetunes/alice/support-bot/support-bot-abcd1234/"
    assert spec["webhook"] == {"url": "https://hooks.example.com/replicate", "events": ["start", "completed"]}
    FineTuneJobSpec.model_validate(spec)


def test_a_model_version_with_weights_of_its_own_takes_them_and_other_versions_the_model_weights() -> None:
    body = {"destination": "alice/bot", "input": {"train_data": TRAIN_DATA}}
    assert manifest(body, version="v2")["spec"]["model"]["weights"] == "s3://weights/v2/"
    assert manifest(body, version="v9")["spec"]["model"]["weights"] == "hf://meta-llama/Llama-2-7b-hf"


def test_webhook_completed_alone_receives_only_completed_and_beside_a_webhook_is_its_completed_url() -> None:
    alone = manifest({"destination": "a/b", "input": {"train_data": TRAIN_DATA}, "webhook_completed": "https://h/c"})
    assert alone["spec"]["webhook"] == {"url": "https://h/c", "events": ["completed"]}
    both = manifest(
        {
            "destination": "a/b",
            "input": {"train_data": TRAIN_DATA},
            "webhook": "https://h/w",
            "webhook_completed": "https://h/c",
        }
    )
    assert both["spec"]["webhook"] == {"url": "https://h/w", "completedUrl": "https://h/c"}


@pytest.mark.parametrize(
    ("body", "field", "fragment"),
    [
        ({"destination": "a/b", "input": {"train_data": TRAIN_DATA, "epochs": 3}}, "input.epochs", "Extra inputs"),
        (
            {"destination": "a/b", "input": {"train_data": TRAIN_DATA, "lora_rank": "many"}},
            "input.lora_rank",
            "integer",
        ),
        (
            {"destination": "a/b", "input": {"train_data": TRAIN_DATA, "micro_batch_size": 8, "train_batch_size": 4}},
            "input.micro_batch_size",
            "must not exceed train_batch_size",
        ),
        ({"destination": "a/b", "input": {"train_data": "ftp://files.example.com/t.jsonl"}}, "input.train_data", "ftp"),
        ({"destination": "a/b", "input": {}}, "input.train_data", "Field required"),
        ({"destination": "a/b", "input": {"train_data": TRAIN_DATA}, "webhook": "ftp://h/w"}, "webhook", "http://"),
        (
            {"destination": "a/b", "input": {"train_data": TRAIN_DATA}, "webhook": "http://169.254.169.254/"},
            "webhook",
            "link-local",
        ),
        (
            {"destination": "a/b", "input": {"train_data": TRAIN_DATA}, "webhook_events_filter": ["completed"]},
            "webhook_events_filter",
            "webhook",
        ),
        (
            {
                "destination": "a/b",
                "input": {"train_data": TRAIN_DATA},
                "webhook": "https://h/",
                "webhook_events_filter": ["done"],
            },
            "webhook_events_filter.0",
            "start",
        ),
        ({"destination": "not a model", "input": {"train_data": TRAIN_DATA}}, "destination", "pattern"),
        ({"destination": "a/b", "input": {"train_data": TRAIN_DATA}, "hardware": "gpu"}, "hardware", "Extra inputs"),
        ({"input": {"train_data": TRAIN_DATA}}, "destination", "Field required"),
        ([], "body", "JSON object"),
    ],
)
def test_bad_requests_name_the_field(body: Any, field: str, fragment: str) -> None:
    problems = rejected_fields(body)
    assert field in problems, problems
    assert fragment in problems[field]


def test_a_model_the_operator_has_no_weights_for_is_refused_naming_the_model() -> None:
    body = {"destination": "a/b", "input": {"train_data": TRAIN_DATA}}
    problems = rejected_fields(body, base_model="meta/llama-2-13b", version="v9")
    assert list(problems) == ["model"]
    assert "meta/llama-2-13b:v9" in problems["model"]
    no_weights = SETTINGS.model_copy(update={"model_weights": {}})
    assert "model" in rejected_fields({"destination": "a/b", "input": {"train_data": TRAIN_DATA}}, settings=no_weights)


def test_without_a_default_destination_the_request_is_refused_naming_the_destination() -> None:
    no_storage = SETTINGS.model_copy(update={"default_destination": None})
    assert "destination" in rejected_fields(
        {"destination": "a/b", "input": {"train_data": TRAIN_DATA}}, settings=no_storage
    )


def test_owners_are_namespaces_unless_the_settings_map_them() -> None:
    assert owner_namespace("alice", SETTINGS) == "alice"
    assert owner_namespace("acme_ml", SETTINGS) == "team-acme"
    with pytest.raises(InvalidTraining, match="destination"):
        owner_namespace("bob_ml", SETTINGS)


def test_job_names_are_dns_labels_made_from_the_model_name() -> None:
    assert job_name("support-bot", "abcd1234") == "support-bot-abcd1234"
    assert job_name("Llama_2.chat", "abcd1234") == "llama-2-chat-abcd1234"
    long = job_name("x" * 200, "abcd1234")
    assert len(long) == 63
    assert long.endswith("-abcd1234")


def test_training_ids_are_namespace_dot_name_and_nothing_else_parses() -> None:
    assert training_id("alice", "bot.v1-x") == "alice.bot.v1-x"
    assert parse_training_id("alice.bot.v1-x") == ("alice", "bot.v1-x")
    for bad in ("alice", ".bot", "Alice.bot", "alice.", "a" * 64 + ".bot", "alice.bot/../x", "alice." + "b" * 64):
        assert parse_training_id(bad) is None, bad


@pytest.mark.parametrize(
    ("spec_field", "request_name"),
    [
        ("spec.input.micro_batch_size", "input.micro_batch_size"),
        ("spec.webhook.url", "webhook"),
        ("spec.webhook.completedUrl", "webhook_completed"),
        ("spec.webhook.events[0]", "webhook_events_filter[0]"),
        ("spec.model.weights", "model.weights"),
        ("spec.destination", "destination"),
    ],
)
def test_finetunejob_fields_are_named_as_the_request_names_them(spec_field: str, request_name: str) -> None:
    assert request_field(spec_field) == request_name


def finetunejob(phase: str, **status: Any) -> dict[str, Any]:
    return {
        "metadata": {
            "name": "support-bot-abcd1234",
            "namespace": "alice",
            "uid": "0b7e4c2a-1111-2222-3333-444455556666",
            "creationTimestamp": "2026-11-29T10:00:00Z",
            "annotations": {"finetune.dev/destination": "alice/support-bot", "finetune.dev/model-version": "v1"},
        },
        "spec": {"input": {"train_data": TRAIN_DATA}, "model": {"name": "meta/llama-2-7b", "weights": "hf://x"}},
        "status": {"phase": phase, **status},
    }


@pytest.mark.parametrize(
    ("phase", "expected"),
    [
        ("Pending", "starting"),
        ("Validating", "starting"),
        ("Queued", "starting"),
        ("Suspended", "starting"),
        ("Running", "processing"),
        ("Succeeded", "succeeded"),
        ("Failed", "failed"),
        ("Canceled", "canceled"),
    ],
)
def test_phases_map_to_replicate_statuses(phase: str, expected: str) -> None:
    assert to_training(finetunejob(phase), "https://api.example.com").status == expected


def test_a_succeeded_job_is_a_training_with_weights_a_version_and_predict_time() -> None:
    training = to_training(
        finetunejob(
            "Succeeded",
            startedAt="2026-11-29T10:01:00Z",
            completedAt="2026-11-29T10:31:30Z",
            logs="step 30/30",
            output={"weights": "s3://finetunes/alice/support-bot/x/", "files": [], "metrics": {}},
        ),
        "https://api.example.com/",
    )
    assert training.model_dump(mode="json") == {
        "id": "alice.support-bot-abcd1234",
        "model": "meta/llama-2-7b",
        "version": "v1",
        "destination": "alice/support-bot",
        "status": "succeeded",
        "input": {"train_data": TRAIN_DATA},
        "output": {
            "weights": "s3://finetunes/alice/support-bot/x/",
            "version": "alice/support-bot:0b7e4c2a-1111-2222-3333-444455556666",
        },
        "error": None,
        "logs": "step 30/30",
        "metrics": {"predict_time": 1830.0},
        "urls": {
            "get": "https://api.example.com/v1/trainings/alice.support-bot-abcd1234",
            "cancel": "https://api.example.com/v1/trainings/alice.support-bot-abcd1234/cancel",
        },
        "created_at": "2026-11-29T10:00:00Z",
        "started_at": "2026-11-29T10:01:00Z",
        "completed_at": "2026-11-29T10:31:30Z",
    }


def test_a_failed_job_carries_its_error_and_a_kubectl_job_has_no_destination() -> None:
    job = finetunejob("Failed", error={"reason": "InvalidTrainingData", "message": "train_data line 3: not JSON"})
    job["metadata"]["annotations"] = {}
    training = to_training(job, "")
    assert training.error == "train_data line 3: not JSON"
    assert training.destination is None
    assert training.version == "hf://x"
    assert training.urls.get == "/v1/trainings/alice.support-bot-abcd1234"


def test_an_unreadable_status_is_a_starting_training() -> None:
    job = finetunejob("Running")
    job["status"] = {"phase": "Exploded"}
    assert to_training(job, "").status == "starting"


def made(identifier: str, created_at: str) -> Training:
    return Training(
        id=identifier,
        model="meta/llama-2-7b",
        version="v1",
        status="starting",
        input={},
        urls=TrainingUrls(get="", cancel=""),
        created_at=created_at,
    )


def test_pages_are_newest_first_and_the_cursor_continues_without_gaps_or_repeats() -> None:
    trainings = [made(f"ns.job-{i}", f"2026-11-29T10:00:{i // 2:02d}Z") for i in range(7)]
    seen: list[str] = []
    cursor = None
    while True:
        shown, cursor = page(trainings, cursor, size=3)
        seen += [training.id for training in shown]
        if cursor is None:
            break
    expected = [t.id for t in sorted(trainings, key=lambda t: (t.created_at, t.id), reverse=True)]
    assert seen == expected
    assert seen[0] == "ns.job-6"


def test_a_cursor_this_server_did_not_make_is_refused() -> None:
    with pytest.raises(InvalidTraining, match="cursor"):
        page([], "not-a-cursor!")


@pytest.mark.parametrize(
    ("header", "token"),
    [
        ("Bearer abc.def", "abc.def"),
        ("Token r8_abc", "r8_abc"),
        ("bearer  abc ", "abc"),
        ("Basic dXNlcjpwYXNz", None),
        ("Bearer", None),
        ("", None),
        (None, None),
    ],
)
def test_bearer_and_token_schemes_carry_the_token(header: str | None, token: str | None) -> None:
    assert bearer_token(header) == token
