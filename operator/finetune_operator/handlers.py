"""kopf glue: watch events become work-queue keys; the reconciler does the rest.

Only `on.event` handlers are used, as controller-runtime does: no finalizers (deleting a FineTuneJob never waits
for the operator) and no kopf annotations on users' objects (GitOps tools see no drift).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import kopf

from finetune_operator.api import GROUP, PLURAL, VERSION
from finetune_operator.conventions import JOB_NAME_LABEL, MANAGED_BY_LABEL, MANAGER_NAME
from finetune_operator.kube import KubeApi, load_client
from finetune_operator.log_follower import LogFollowers, Stream
from finetune_operator.reconciler import Reconciler
from finetune_operator.settings import Settings
from finetune_operator.workqueue import WorkQueue


def _child_labels() -> Any:
    # kopf does not export the type of its PRESENT marker.
    return {MANAGED_BY_LABEL: MANAGER_NAME, JOB_NAME_LABEL: kopf.PRESENT}


@dataclass
class Runtime:
    queue: WorkQueue
    followers: LogFollowers


@kopf.on.startup()
async def start(settings: kopf.OperatorSettings, memo: kopf.Memo, **_: Any) -> None:
    settings.posting.level = logging.WARNING
    settings.watching.server_timeout = 300
    settings.watching.client_timeout = 330
    operator_settings = Settings()
    api = KubeApi(load_client())

    def stream_ended(stream: Stream) -> None:
        # The trainer stopped: look at the job again now rather than at the next resync.
        queue.add_threadsafe((stream.namespace, stream.finetunejob))

    followers = LogFollowers(api, operator_settings, on_end=stream_ended)
    queue = WorkQueue(Reconciler(api, operator_settings, followers).reconcile)
    queue.start()
    memo["runtime"] = Runtime(queue=queue, followers=followers)


@kopf.on.cleanup()
async def stop(memo: kopf.Memo, **_: Any) -> None:
    runtime: Runtime = memo["runtime"]
    runtime.followers.stop_all()
    await runtime.queue.stop()


@kopf.on.event(GROUP, VERSION, PLURAL)
def finetunejob_changed(namespace: str | None, name: str, memo: kopf.Memo, **_: Any) -> None:
    if namespace:
        _runtime(memo).queue.add((namespace, name))


@kopf.on.event("batch", "v1", "jobs", labels=_child_labels())
def job_changed(namespace: str | None, labels: kopf.Labels, memo: kopf.Memo, **_: Any) -> None:
    if namespace:
        _runtime(memo).queue.add((namespace, labels[JOB_NAME_LABEL]))


@kopf.on.event("", "v1", "pods", labels=_child_labels())
def pod_changed(namespace: str | None, labels: kopf.Labels, memo: kopf.Memo, **_: Any) -> None:
    if namespace:
        _runtime(memo).queue.add((namespace, labels[JOB_NAME_LABEL]))


def _runtime(memo: kopf.Memo) -> Runtime:
    runtime: Runtime = memo["runtime"]
    return runtime
