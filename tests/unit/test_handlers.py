"""The kopf handlers the operator registers, and what kopf is told to do for them."""

from __future__ import annotations

import kopf

from finetune_operator import handlers


def test_the_operator_reacts_to_events_only_so_kopf_builds_no_essence_of_a_body() -> None:
    registry = kopf.get_default_registry()
    # The essence is what kopf compares for on.create/update/delete and on.field handlers; with none, an empty
    # one changes nothing, and kopf no longer deep-copies every body it receives.
    assert list(registry._changing.get_all_handlers()) == []
    assert list(registry._spawning.get_all_handlers()) == []
    assert {handler.id for handler in registry._watching.get_all_handlers()} >= {
        "finetunejob_changed",
        "job_changed",
        "pod_changed",
        "warning_recorded",
    }
    pod = kopf.Body({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p"}, "spec": {"nodeName": "n"}})
    assert handlers.EventsOnlyDiffBase().build(body=pod) == {}
