"""Health in the kstatus conventions: Ready, Reconciling and Stalled follow from the phase."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from conftest import make_spec
from finetune_operator.api.status import Condition, ConditionType, FineTuneJobStatus, Phase
from finetune_operator.lifecycle import Observation, decide
from finetune_operator.lifecycle.kstatus import kstatus_conditions
from finetune_operator.naming import workload_names
from finetune_operator.timestamps import timestamp

NOW = datetime(2026, 11, 28, 12, 0, 0, tzinfo=UTC)


def health(status: FineTuneJobStatus) -> tuple[str, str, str]:
    conditions = kstatus_conditions(status)
    ready, reconciling, stalled = ConditionType.READY, ConditionType.RECONCILING, ConditionType.STALLED
    return conditions[ready][0], conditions[reconciling][0], conditions[stalled][0]


@pytest.mark.parametrize(
    ("phase", "expected"),
    [
        (Phase.PENDING, ("False", "True", "False")),
        (Phase.VALIDATING, ("False", "True", "False")),
        (Phase.QUEUED, ("False", "True", "False")),
        (Phase.STARTING, ("False", "True", "False")),
        (Phase.RUNNING, ("False", "True", "False")),
        (Phase.SUSPENDED, ("False", "False", "False")),
        (Phase.SUCCEEDED, ("True", "False", "False")),
        (Phase.FAILED, ("False", "False", "True")),
        (Phase.CANCELED, ("False", "False", "True")),
    ],
)
def test_each_phase_maps_to_ready_reconciling_and_stalled(phase: Phase, expected: tuple[str, str, str]) -> None:
    assert health(FineTuneJobStatus(phase=phase, reason="Why", message="because")) == expected


def test_the_conditions_carry_the_phase_reason_and_message() -> None:
    status = FineTuneJobStatus(
        phase=Phase.FAILED, reason="InvalidTrainingData", message='line 17: missing "completion"'
    )
    for _, reason, message in kstatus_conditions(status).values():
        assert (reason, message) == ("InvalidTrainingData", 'line 17: missing "completion"')


def observe(status: FineTuneJobStatus, generation: int = 1, **spec_changes: object) -> Observation:
    spec = make_spec(**spec_changes)
    return Observation(
        spec=spec,
        status=status,
        generation=generation,
        created_at=timestamp(NOW),
        now=NOW,
        names=workload_names("bot"),
    )


def conditions_by_type(status: FineTuneJobStatus) -> dict[ConditionType, Condition]:
    return {condition.type: condition for condition in status.conditions}


def test_every_reconcile_writes_them_beside_todays_conditions_with_the_observed_generation() -> None:
    status = decide(observe(FineTuneJobStatus(), generation=3)).status
    found = conditions_by_type(status)
    assert found[ConditionType.VALIDATED].status == "Unknown"  # today's conditions stay
    assert found[ConditionType.RECONCILING].status == "True"
    assert found[ConditionType.RECONCILING].reason == "ValidatingData"
    assert {found[kind].observed_generation for kind in found} == {3}


def test_a_job_finished_before_these_conditions_existed_gets_them_and_observes_a_later_spec_change() -> None:
    finished = FineTuneJobStatus(
        phase=Phase.SUCCEEDED, reason="TrainingSucceeded", completed_at=timestamp(NOW), observed_generation=1
    )
    status = decide(observe(finished, generation=2, suspend=True)).status
    assert status.phase is Phase.SUCCEEDED
    assert status.observed_generation == 2
    ready = conditions_by_type(status)[ConditionType.READY]
    assert (ready.status, ready.reason, ready.observed_generation) == ("True", "TrainingSucceeded", 2)
    again = decide(observe(status, generation=2, suspend=True)).status
    assert again == status  # nothing more to write on the next resync
