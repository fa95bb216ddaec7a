"""Reading the API server's audit log back (tests/cluster/auditlog.py): requests counted per FineTuneJob and kind."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from auditlog import (
    count_noop_writes,
    json_patch_status,
    mark_audit_log,
    merge_patch,
    operator_usage,
    read_audit_events,
    read_audit_events_since,
)

from finetune_operator.kube import LOG_FOLLOWER_MANAGER, STATE_MACHINE_MANAGER

OPERATOR = "system:serviceaccount:ns:finetune-operator"
_ids = iter(range(1_000_000))


def event(
    verb: str,
    resource: str,
    name: str = "",
    *,
    subresource: str = "",
    body: dict[str, Any] | list[dict[str, Any]] | None = None,
    user: str = OPERATOR,
    code: int = 200,
    uri: str = "",
    namespace: str = "ns",
) -> dict[str, Any]:
    number = next(_ids)
    ref: dict[str, Any] = {"resource": resource, "namespace": namespace}
    if name:
        ref["name"] = name
    if subresource:
        ref["subresource"] = subresource
    found: dict[str, Any] = {
        "auditID": f"id-{number}",
        "stage": "ResponseComplete",
        "verb": verb,
        "user": {"username": user},
        "objectRef": ref,
        "requestURI": uri or f"/apis/x/namespaces/{namespace}/{resource}",
        "responseStatus": {"code": code},
        "requestReceivedTimestamp": f"2026-01-01T00:00:{number // 1000:02d}.{number % 1000:06d}Z",
    }
    if body is not None:
        found["requestObject"] = body
    return found


def status_patch(name: str, status: dict[str, Any], code: int = 200) -> dict[str, Any]:
    """A merge patch without a field manager: told by its body."""
    return event("patch", "finetunejobs", name, subresource="status", body={"status": status}, code=code)


def json_patch(name: str, manager: str, fields: dict[str, Any], uid: str = "u1", code: int = 200) -> dict[str, Any]:
    """The log follower's write: a JSON patch that tests the UID, with its field manager in the URI."""
    operations: list[dict[str, Any]] = [{"op": "test", "path": "/metadata/uid", "value": uid}]
    operations += [{"op": "add", "path": f"/status/{key}", "value": value} for key, value in fields.items()]
    uri = f"/apis/finetune.dev/v1alpha1/namespaces/ns/finetunejobs/{name}/status?fieldManager={manager}"
    return event("patch", "finetunejobs", name, subresource="status", body=operations, uri=uri, code=code)


def merge_patch_of(name: str, manager: str, status: dict[str, Any]) -> dict[str, Any]:
    """The state machine's write: a merge patch with the resourceVersion it was computed from."""
    body = {"metadata": {"resourceVersion": "42"}, "status": status}
    uri = f"/apis/finetune.dev/v1alpha1/namespaces/ns/finetunejobs/{name}/status?fieldManager={manager}"
    return event("patch", "finetunejobs", name, subresource="status", body=body, uri=uri)


def test_requests_are_counted_per_finetunejob_by_kind() -> None:
    events = [
        event("create", "configmaps", "a-input"),
        event("create", "configmaps", "a-input", code=409),
        event("create", "jobs", "a-validate"),
        event("create", "jobs", "a-train"),
        event("create", "events", body={"involvedObject": {"kind": "FineTuneJob", "name": "a"}}),
        status_patch("a", {"phase": "Validating"}),
        status_patch("a", {"progress": {"step": 1}, "logs": "x"}),
        status_patch("a", {"phase": "Running", "progress": {"step": 2}}),
        event("get", "finetunejobs", "a"),
        event("get", "jobs", "a-train"),
        event("get", "pods", "a-train-0-abcde", subresource="log"),
        event("list", "pods", uri="/api/v1/namespaces/ns/pods?labelSelector=finetune.dev%2Fjob-name%3Db"),
        event("patch", "jobs", "b-train"),
        event("delete", "jobs", "b-validate"),
        event("watch", "pods", uri="/api/v1/namespaces/ns/pods?watch=true"),
        event("update", "leases", "finetune-operator"),
        event("get", "finetunejobs", "a", user="devcluster-admin"),
        event("get", "finetunejobs", "a", namespace="elsewhere"),
    ]
    usage = operator_usage(events, OPERATOR, "ns", ["a", "b"])
    a, b = usage.per_job["a"], usage.per_job["b"]
    assert (a.creates, a.events, a.status_writes, a.progress_writes, a.reads) == (3, 1, 2, 1, 3)
    assert a.refused_writes == 1
    assert (b.reads, b.other_writes, b.deletes) == (1, 1, 1)
    assert usage.unattributed.watches == 1
    assert usage.lease_writes == 1
    assert usage.total().writes == 3 + 1 + 3 + 1 + 1
    assert usage.most("status_writes") == 2


def test_a_status_write_that_changes_nothing_is_a_noop() -> None:
    writes = [
        status_patch("a", {"phase": "Running", "conditions": [{"type": "Running"}]}),
        status_patch("a", {"phase": "Running"}),  # the same phase again: an echo
        status_patch("a", {"progress": {"step": 3}}),
        status_patch("a", {"progress": {"step": 3}}),  # identical content again
        status_patch("a", {"phase": "Succeeded"}, code=409),  # refused: changed nothing, not a write that landed
        status_patch("a", {"message": None}),  # removing a field that is not there
    ]
    assert count_noop_writes(writes) == 3
    usage = operator_usage(writes, OPERATOR, "ns", ["a"])
    assert usage.per_job["a"].noop_status_writes == 3
    a = usage.per_job["a"]
    assert (a.status_writes, a.progress_writes, a.refused_writes) == (3, 2, 1)


def test_the_field_manager_in_the_uri_names_the_writer() -> None:
    events = [
        merge_patch_of("a", STATE_MACHINE_MANAGER, {"phase": "Running", "progress": {"percent": 0}}),
        json_patch("a", LOG_FOLLOWER_MANAGER, {"progress": {"step": 1}}),
        json_patch("a", LOG_FOLLOWER_MANAGER, {"progress": {"step": 1}}),  # the same again: an echo
        json_patch("a", f"{STATE_MACHINE_MANAGER}-webhooks", {"webhook": {"delivered": 1}}),
    ]
    a = operator_usage(events, OPERATOR, "ns", ["a"]).per_job["a"]
    assert (a.status_writes, a.progress_writes, a.other_writes, a.noop_status_writes) == (1, 2, 1, 1)


def test_a_json_patch_adds_replaces_and_removes_status_fields() -> None:
    status = {"phase": "Running", "progress": {"step": 1}}
    operations = [
        {"op": "test", "path": "/metadata/uid", "value": "u1"},
        {"op": "add", "path": "/status/progress/step", "value": 2},
        {"op": "replace", "path": "/status/logs", "value": "x"},
        {"op": "remove", "path": "/status/phase"},
    ]
    assert json_patch_status(status, operations) == {"progress": {"step": 2}, "logs": "x"}
    assert status == {"phase": "Running", "progress": {"step": 1}}


def test_merge_patch_merges_maps_replaces_lists_and_removes_nulls() -> None:
    target = {"phase": "Running", "progress": {"step": 1, "loss": 2.0}, "conditions": [1, 2]}
    patch = {"progress": {"step": 2, "loss": None}, "conditions": [3], "reason": "R"}
    assert merge_patch(target, patch) == {"phase": "Running", "progress": {"step": 2}, "conditions": [3], "reason": "R"}


def test_each_request_is_read_once_from_its_last_stage(tmp_path: Path) -> None:
    log = tmp_path / "audit.log"
    started = {**event("watch", "pods"), "stage": "ResponseStarted"}
    completed = {**started, "stage": "ResponseComplete"}
    lines = [json.dumps(started), json.dumps(event("get", "pods", "p")), json.dumps(completed), '{"truncated']
    log.write_text("\n".join(lines))
    events = read_audit_events(log)
    assert sorted(e["stage"] for e in events) == ["ResponseComplete", "ResponseComplete"]
    assert read_audit_events(log, offset=len(lines[0]) + 1)[0]["verb"] == "get"


def test_requests_since_a_mark_are_read_across_a_rotation_of_the_log(tmp_path: Path) -> None:
    log = tmp_path / "audit.log"
    before, during, after = (json.dumps(event("get", "pods", name)) + "\n" for name in ("before", "during", "after"))
    log.write_text(before)
    mark = mark_audit_log(log)
    with log.open("a") as handle:
        handle.write(during)
    # The API server rotates the log: the current file is renamed with the time, and a new one begins.
    log.rename(tmp_path / "audit-2026-11-30T01-49-20.616.log")
    (tmp_path / "audit-2026-11-30T00-10-00.000.log").write_text(json.dumps(event("get", "pods", "older")) + "\n")
    log.write_text(after)
    names = [e["objectRef"]["name"] for e in read_audit_events_since(mark)]
    assert names == ["during", "after"]
