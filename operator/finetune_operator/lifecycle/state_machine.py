"""`decide`: the phase step, then the bookkeeping every phase shares (conditions, times, GPU-seconds, resolved).

A status write is worth making only when a user learns something from it: a passing note (phase.PASSING_NOTES)
waits for the next write, and gpuSeconds for a transition or a minute of running time.
"""

from __future__ import annotations

from finetune_operator.api.status import FineTuneJobStatus, Phase, Workload
from finetune_operator.lifecycle.conditions import set_condition
from finetune_operator.lifecycle.gpu_seconds import gpu_seconds
from finetune_operator.lifecycle.kstatus import with_kstatus_conditions
from finetune_operator.lifecycle.notices import disruption_notices, retry_notices, transition_notices
from finetune_operator.lifecycle.observation import Action, Decision, Observation
from finetune_operator.lifecycle.observed import deleting, disrupted_pods, job_failed_pods, rank0_output, trainer_state
from finetune_operator.lifecycle.phase import PASSING_NOTES, Step, evaluate
from finetune_operator.lifecycle.resolved import batch_notices, resolve_status
from finetune_operator.lifecycle.ttl import ttl_after_finished
from finetune_operator.timestamps import parse_timestamp, timestamp

# While a job is active, look again this often even without events: gpuSeconds and timeouts move with time.
ACTIVE_RESYNC_SECONDS = 30.0
# gpuSeconds moves with the clock; it is written at a transition, or when it has grown by this much running time.
GPU_SECONDS_REFRESH = 60.0


def decide(obs: Observation) -> Decision:
    """The status the state machine owns, the actions to take and the Events to record, from one observation."""
    previous = obs.status
    if previous.phase.finished:
        return _after_finish(obs)
    step = evaluate(obs)
    status = _held_note(previous, _bookkeep(obs, step))
    notices = [
        *transition_notices(previous, status, step),
        *disruption_notices(obs),
        *retry_notices(obs, previous, status),
    ]
    if obs.spec is not None and previous.resolved is None and status.resolved is not None:
        notices.extend(batch_notices(obs.spec, status.resolved))
    actions = step.actions
    requeue: float | None = ACTIVE_RESYNC_SECONDS
    if status.phase.finished:
        ttl = ttl_after_finished(obs.spec, status, obs.now)
        actions = (*actions, Action.DELETE_FINETUNEJOB) if ttl.delete_now else actions
        requeue = ttl.requeue_after
    return Decision(status=status, actions=actions, notices=tuple(notices), requeue_after=requeue)


def _after_finish(obs: Observation) -> Decision:
    """Finished is final: keep the status, finish removing a canceled workload, honour the TTL."""
    status = obs.status
    ttl = ttl_after_finished(obs.spec, status, obs.now)
    actions: tuple[Action, ...] = (Action.DELETE_FINETUNEJOB,) if ttl.delete_now else ()
    if status.phase is Phase.CANCELED and (obs.train_job or obs.validation_job):
        actions = (Action.DELETE_WORKLOAD, *actions)
    if status.phase is Phase.SUCCEEDED and status.output is None:
        output = rank0_output(obs.train_pods)
        if output is not None:
            status = status.model_copy(update={"output": output})
    # A spec changed after the finish is observed too, so that kstatus readers see the job settled.
    status = status.model_copy(update={"observed_generation": obs.generation})
    status = with_kstatus_conditions(status, timestamp(obs.now), obs.generation)
    return Decision(status=status, actions=actions, requeue_after=ttl.requeue_after)


def _held_note(previous: FineTuneJobStatus, status: FineTuneJobStatus) -> FineTuneJobStatus:
    """`status`, or `previous` when all that changed is one passing note for the next in the same phase (and the
    conditions that say the same): that note is shown with the next write, not in a write of its own."""
    if (status.phase, status.reason) != (previous.phase, previous.reason):
        return status
    if previous.message not in PASSING_NOTES or status.message not in PASSING_NOTES:
        return status
    held = status.model_copy(update={"message": previous.message, "conditions": previous.conditions})
    return previous if held == previous else status


def _bookkeep(obs: Observation, step: Step) -> FineTuneJobStatus:
    previous = obs.status
    now = timestamp(obs.now)
    conditions = list(previous.conditions)
    for kind, (state, reason, message) in step.conditions.items():
        conditions = set_condition(
            conditions, kind=kind, state=state, reason=reason, message=message, now=now, generation=obs.generation
        )
    started_at = previous.started_at
    if step.phase is Phase.RUNNING and started_at is None:
        started_at = now
    completed_at = previous.completed_at
    if step.phase.finished and completed_at is None:
        completed_at = now
    spec = obs.spec
    if Action.RESTART_TRAINING in step.actions:
        restarts = (previous.restarts or 0) + 1
    else:
        disrupted = obs.known_disruptions | disrupted_pods(obs.train_pods)
        restarts = max(previous.restarts or 0, job_failed_pods(obs.train_job) + len(disrupted))
    gpu_seconds_counted, gpu_seconds_until = _gpu_seconds(obs, step)
    status = previous.model_copy(
        update={
            "phase": step.phase,
            "reason": step.reason,
            "message": step.message,
            "conditions": conditions,
            "observed_generation": obs.generation,
            "created_at": previous.created_at or obs.created_at,
            "started_at": started_at,
            "completed_at": completed_at,
            "gpu_seconds": gpu_seconds_counted,
            "gpu_seconds_until": gpu_seconds_until,
            "restarts": restarts or previous.restarts,
            "resolved": resolve_status(spec, obs) if spec is not None else previous.resolved,
            "error": step.error or (None if step.phase is not Phase.FAILED else previous.error),
            "output": step.output or previous.output,
            "workload": _workload(obs) or previous.workload,
        }
    )
    return with_kstatus_conditions(status, now, obs.generation)


def _workload(obs: Observation) -> Workload | None:
    """The children that run the training, once the training Job exists."""
    if obs.train_job is None or obs.spec is None:
        return None
    names = obs.names
    service = names.service if obs.spec.resources.nodes > 1 else None
    return Workload(job=names.train_job, service=service, config_map=names.config_map)


def _gpu_seconds(obs: Observation, step: Step) -> tuple[int | None, str | None]:
    """gpuSeconds and the time it counts up to: the GPU time since the last count is added at a transition, once
    it reaches GPU_SECONDS_REFRESH of running time, or when a pod whose trainer stopped is being deleted (its
    time would go with it).

    A write for every second that passed would make each reconcile write, and each write cause a reconcile. The
    time of a trainer that stopped no longer grows and its pod stays with its Job: it waits for the transition
    that follows (Succeeded, Failed, a retry's Starting).
    """
    previous, counted_until = obs.status.gpu_seconds, obs.status.gpu_seconds_until
    if obs.spec is None:
        return previous, counted_until
    gpus = obs.spec.resources.gpus_per_node
    now = parse_timestamp(timestamp(obs.now))  # whole seconds, as the mark is written
    if previous is not None and counted_until is None:
        # A count written without its mark: it covered the pods then in sight from their start.
        return max(previous, gpu_seconds(gpus, obs.train_pods, None, now)), timestamp(now)
    since = parse_timestamp(counted_until) if counted_until else None
    added = gpu_seconds(gpus, obs.train_pods, since, now)
    transition = step.phase is not obs.status.phase or step.phase.finished
    running = sum(1 for pod in obs.train_pods if trainer_state(pod).get("running"))
    going = any(deleting(pod) and not trainer_state(pod).get("running") for pod in obs.train_pods)
    due = transition or going or (running > 0 and added >= running * gpus * GPU_SECONDS_REFRESH)
    if added == 0 or not due:
        return previous, counted_until
    return (previous or 0) + added, timestamp(now)
