"""kopf glue: watch events fill the cache and become work-queue keys; the reconciler does the rest.

Only `on.event` handlers are used, as controller-runtime does: no finalizers (deleting a FineTuneJob never waits
for the operator) and no kopf annotations on users' objects (GitOps tools see no drift). They are coroutines, so
they run on the event loop the work queue lives on. Jobs and pods are watched with a server-side label selector:
only the operator's own children are streamed and kept.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import kopf
from aiohttp import web

from finetune_operator import metrics
from finetune_operator.api import GROUP, PLURAL, VERSION
from finetune_operator.api.status import Phase
from finetune_operator.cache import Cache, finetunejob_key
from finetune_operator.conventions import MANAGED_BY_LABEL, MANAGER_NAME
from finetune_operator.health import Health
from finetune_operator.kube import TRANSIENT_API_ERRORS, KubeApi, load_client
from finetune_operator.log_follower import LogFollowers, Stream
from finetune_operator.pod_logs import PodLogs
from finetune_operator.reconciler import Reconciler
from finetune_operator.replicate_api.server import start_server, trainings_api
from finetune_operator.settings import Settings
from finetune_operator.webhooks.dispatcher import WebhookDispatcher
from finetune_operator.workqueue import WorkQueue

log = logging.getLogger(__name__)
CHILD_SELECTOR = f"{MANAGED_BY_LABEL}={MANAGER_NAME}"
# Set by the CLI before kopf starts: the probes read the queue through it.
HEALTH = Health()


class EventsOnlyDiffBase(kopf.AnnotationsDiffBaseStorage):
    """The operator has event handlers only (no on.create/update/delete): the essence kopf builds of every body
    for change detection, a deep copy of it, would go unused."""

    def build(self, *, body: kopf.Body, extra_fields: Iterable[kopf.FieldSpec] | None = None) -> kopf.BodyEssence:
        return kopf.BodyEssence()


@dataclass
class Runtime:
    cache: Cache
    queue: WorkQueue
    reconciler: Reconciler
    followers: LogFollowers
    pod_logs: PodLogs
    api: KubeApi
    resync: asyncio.Task[None]
    webhooks: WebhookDispatcher
    api_server: web.AppRunner | None = None


@kopf.on.startup()
async def start(settings: kopf.OperatorSettings, memo: kopf.Memo, **_: Any) -> None:
    settings.posting.level = logging.WARNING
    settings.persistence.diffbase_storage = EventsOnlyDiffBase()
    settings.watching.server_timeout = 300
    settings.watching.client_timeout = 330
    settings.watching.connect_timeout = 30
    settings.watching.label_selectors["batch", "v1", "jobs"] = CHILD_SELECTOR
    settings.watching.label_selectors["", "v1", "pods"] = CHILD_SELECTOR
    # Warnings only (FailedCreate on a Job, FailedMount on a pod, ...): the rest of the Events are not our business.
    settings.watching.field_selectors["", "v1", "events"] = "type=Warning"
    operator_settings = Settings()
    client = load_client(operator_settings.api_pool_size)
    api = KubeApi(client, timeout=operator_settings.api_timeout_seconds)
    cache = Cache()
    pod_logs = PodLogs(client.configuration)
    loop = asyncio.get_running_loop()

    def stream_ended(stream: Stream) -> None:
        # The trainer stopped: look at the job again now rather than at the next resync.
        queue.add((stream.namespace, stream.finetunejob))

    followers = LogFollowers(pod_logs, api, operator_settings, on_end=stream_ended, loop=loop)
    reconciler = Reconciler(api, cache, operator_settings, followers)
    queue = WorkQueue(reconciler.reconcile, operator_settings.workers, transient=TRANSIENT_API_ERRORS)
    queue.start()
    HEALTH.stalled = lambda: queue.stalled(operator_settings.health_stall_seconds)
    for phase in Phase:
        # Counted when scraped: one pass over the cache, not one per watch event.
        metrics.FINETUNEJOBS.labels(phase=phase.value).set_function(_phase_count(cache, phase.value))
    resync = asyncio.create_task(_resync(api, cache, queue, operator_settings.resync_seconds), name="resync")
    webhooks = WebhookDispatcher(api, operator_settings)
    await webhooks.start()
    runtime = memo["runtime"] = Runtime(cache, queue, reconciler, followers, pod_logs, api, resync, webhooks)
    # `finetune-operator run --api-listen HOST:PORT`: Replicate's trainings API beside the handlers.
    if memo.get("api_listen"):
        server = trainings_api(client, operator_settings, memo.get("namespaces") or ())
        runtime.api_server = await start_server(server, memo["api_listen"])


@kopf.on.cleanup()
async def stop(memo: kopf.Memo, **_: Any) -> None:
    runtime: Runtime = memo["runtime"]
    if runtime.api_server is not None:
        await runtime.api_server.cleanup()
    runtime.resync.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await runtime.resync
    await runtime.followers.stop_all()
    await runtime.queue.stop()
    runtime.reconciler.close()
    await runtime.webhooks.stop()
    await runtime.pod_logs.close()


@kopf.on.event(GROUP, VERSION, PLURAL)
async def finetunejob_changed(event: kopf.RawEvent, memo: kopf.Memo, **_: Any) -> None:
    runtime = _runtime(memo)
    body = _body(event)
    deleted = event["type"] == "DELETED"
    if deleted:
        runtime.cache.remove_finetunejob(body)
        # A FineTuneJob deleted at once (no finalizer) is never seen with a deletionTimestamp by a reconcile.
        runtime.followers.forget(body["metadata"]["uid"])
    else:
        runtime.cache.upsert_finetunejob(body)
    metadata = body["metadata"]
    runtime.queue.add((metadata["namespace"], metadata["name"]))
    runtime.webhooks.observe(body, deleted=deleted)


@kopf.on.event("batch", "v1", "jobs")
async def job_changed(event: kopf.RawEvent, memo: kopf.Memo, **_: Any) -> None:
    runtime = _runtime(memo)
    _child_changed(runtime, event, runtime.cache.upsert_job, runtime.cache.remove_job)


@kopf.on.event("", "v1", "pods")
async def pod_changed(event: kopf.RawEvent, memo: kopf.Memo, **_: Any) -> None:
    runtime = _runtime(memo)
    _child_changed(runtime, event, runtime.cache.upsert_pod, runtime.cache.remove_pod)


@kopf.on.event("", "v1", "events")
async def warning_recorded(event: kopf.RawEvent, memo: kopf.Memo, **_: Any) -> None:
    runtime = _runtime(memo)
    if event["type"] == "DELETED":
        return
    key = runtime.cache.add_warning(_body(event))
    if key is not None:
        runtime.queue.add(key)


async def _resync(api: KubeApi, cache: Cache, queue: WorkQueue, interval: float) -> None:
    """List every child again now and then: a watch that was down may have missed a deletion."""
    while True:
        await asyncio.sleep(interval)
        try:
            jobs, pods = await asyncio.to_thread(api.list_children, CHILD_SELECTOR)
            finetunejobs = await asyncio.to_thread(api.list_finetunejobs)
        except Exception as error:  # an outage: the next resync tries again
            log.warning("resync failed: %s", error)
            continue
        touched = cache.replace_children(jobs, pods) | cache.replace_finetunejobs(finetunejobs)
        for key in touched:
            queue.add(key)


def _phase_count(cache: Cache, phase: str) -> Callable[[], float]:
    return lambda: cache.phase_counts().get(phase, 0)


def _child_changed(
    runtime: Runtime,
    event: kopf.RawEvent,
    upsert: Callable[[dict[str, Any]], None],
    remove: Callable[[dict[str, Any]], None],
) -> None:
    """A Job or pod of ours changed: keep the cache current and reconcile its FineTuneJob."""
    body = _body(event)
    if event["type"] == "DELETED":
        remove(body)
    else:
        upsert(body)
    key = finetunejob_key(body)
    if key is not None:
        runtime.queue.add(key)


def _body(event: kopf.RawEvent) -> dict[str, Any]:
    body: dict[str, Any] = dict(event["object"])
    return body


def _runtime(memo: kopf.Memo) -> Runtime:
    runtime: Runtime = memo["runtime"]
    return runtime
