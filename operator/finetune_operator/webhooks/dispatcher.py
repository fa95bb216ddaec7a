"""Sends each FineTuneJob's webhook messages from the operator's event loop; the only writer of `status.webhook`.

One task a job, woken by watch events of its FineTuneJob and by its next due time. Each step notices new events
(`deliveries.notice`), sends what is due, and writes the new state with one status patch. The state lives in the
FineTuneJob, so an operator that restarts (even after kill -9) goes on where the last one stopped; a message
sent whose success was not yet written is sent again with the same `webhook-id`, which receivers use to drop
duplicates, as Standard Webhooks asks them to.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol

import aiohttp
from pydantic import ValidationError

from finetune_operator import metrics
from finetune_operator.api.spec import DEFAULT_SIGNING_KEY, WebhookSpec
from finetune_operator.api.status import FineTuneJobStatus, WebhookDelivery, WebhookStatus
from finetune_operator.cache import cached_form
from finetune_operator.replicate_api.mapping import to_training
from finetune_operator.settings import Settings
from finetune_operator.webhooks import deliveries
from finetune_operator.webhooks.addresses import GuardedResolver, RefusedAddress, url_refusal
from finetune_operator.webhooks.deliveries import RetryPolicy
from finetune_operator.webhooks.signing import signed_headers, signing_key

log = logging.getLogger(__name__)
USER_AGENT = "finetune-operator-webhooks"
SEND_TIMEOUT_SECONDS = 15.0
CONCURRENT_SENDS = 16
Obj = dict[str, Any]


class WebhookApi(Protocol):
    """The API calls the dispatcher makes (kube.KubeApi has them)."""

    def patch_webhook_state(self, namespace: str, name: str, uid: str, fields: Mapping[str, Any]) -> None: ...

    def read_secret_key(self, namespace: str, name: str, key: str) -> str: ...


class SendFailed(Exception):
    """This attempt failed; `permanent` ones are not retried."""

    def __init__(self, message: str, permanent: bool = False) -> None:
        super().__init__(message)
        self.permanent = permanent


@dataclass
class _Job:
    body: Obj
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    state: WebhookStatus | None = None
    written: WebhookStatus | None = None
    task: asyncio.Task[None] | None = None


class WebhookDispatcher:
    def __init__(
        self,
        api: WebhookApi,
        settings: Settings,
        policy: RetryPolicy | None = None,
        clock: Callable[[], datetime] | None = None,
    ) -> None:
        self._api = api
        self._settings = settings
        self._policy = policy or RetryPolicy()
        self._clock = clock or (lambda: datetime.now(UTC))
        self._jobs: dict[str, _Job] = {}
        self._session: aiohttp.ClientSession | None = None
        self._sends = asyncio.Semaphore(CONCURRENT_SENDS)

    async def start(self) -> None:
        connector = aiohttp.TCPConnector(resolver=GuardedResolver(self._settings.webhook_allowed_networks))
        self._session = aiohttp.ClientSession(
            connector=connector,
            timeout=aiohttp.ClientTimeout(total=SEND_TIMEOUT_SECONDS),
            headers={"User-Agent": USER_AGENT},
        )

    async def stop(self) -> None:
        tasks = [job.task for job in self._jobs.values() if job.task is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._jobs.clear()
        if self._session is not None:
            await self._session.close()

    def observe(self, body: Mapping[str, Any], deleted: bool = False) -> None:
        """A watch event of a FineTuneJob: its latest state, or its deletion."""
        uid = body["metadata"]["uid"]
        if deleted:
            gone = self._jobs.pop(uid, None)
            if gone is not None and gone.task is not None:
                gone.task.cancel()
            return
        job = self._jobs.get(uid)
        if job is None:
            if not (body.get("spec") or {}).get("webhook"):
                return
            job = self._jobs[uid] = _Job(body=cached_form("FineTuneJob", body))
        else:
            job.body = cached_form("FineTuneJob", body)
        job.wake.set()
        if job.task is None or job.task.done():
            job.task = asyncio.create_task(self._run(job), name=f"webhooks-{uid}")

    async def _run(self, job: _Job) -> None:
        failures = 0
        while True:
            job.wake.clear()
            try:
                wait = await self._step(job)
                failures = 0
            except Exception as error:  # a failed status patch: the state is written again at the next step
                failures += 1
                wait = min(60.0, 2.0**failures)
                log.warning("webhooks of %s: %s", job.body["metadata"]["name"], error)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(job.wake.wait(), timeout=wait)

    async def _step(self, job: _Job) -> float | None:
        """Notice, send what is due, write the state; returns seconds until the next message falls due."""
        body = job.body
        try:
            spec = WebhookSpec.model_validate((body.get("spec") or {}).get("webhook"))
        except ValidationError:
            return None  # no (readable) spec.webhook: nothing to send
        status = _status(body.get("status"))
        if job.state is None:
            job.state = job.written = status.webhook or WebhookStatus()
        metadata = body["metadata"]
        state = deliveries.notice(spec, status, job.state, metadata["uid"], self._clock())
        due = deliveries.due(state, self._clock(), self._policy)
        if due:
            payload = to_training(body, self._settings.api_public_url or "").model_dump_json().encode()
            for delivery in due:
                state = await self._attempt(state, spec, metadata, delivery, payload)
        job.state = state
        if state != job.written:
            patch = {"webhook": state.model_dump(mode="json", by_alias=True, exclude_none=True)}
            await asyncio.to_thread(
                self._api.patch_webhook_state, metadata["namespace"], metadata["name"], metadata["uid"], patch
            )
            metrics.STATUS_PATCHES.labels(source="webhooks").inc()
            job.written = state
        next_due = deliveries.next_due(state, self._policy)
        return None if next_due is None else max(0.0, (next_due - self._clock()).total_seconds())

    async def _attempt(
        self,
        state: WebhookStatus,
        spec: WebhookSpec,
        metadata: Mapping[str, Any],
        delivery: WebhookDelivery,
        payload: bytes,
    ) -> WebhookStatus:
        url = deliveries.target_url(spec, delivery.target)
        if url is None:  # spec.webhook.completedUrl was removed since
            return deliveries.attempt_failed(state, delivery, self._clock(), "no URL", self._policy, permanent=True)
        try:
            await self._send(url, spec, metadata["namespace"], delivery.id, payload)
        except SendFailed as error:
            metrics.WEBHOOK_ATTEMPTS.labels(event=delivery.event, result="failed").inc()
            log.info("webhook %s (%s) to %s failed: %s", delivery.id, delivery.event, url, error)
            return deliveries.attempt_failed(
                state, delivery, self._clock(), str(error), self._policy, permanent=error.permanent
            )
        metrics.WEBHOOK_ATTEMPTS.labels(event=delivery.event, result="delivered").inc()
        return deliveries.delivered(state, delivery, self._clock())

    async def _send(self, url: str, spec: WebhookSpec, namespace: str, message_id: str, payload: bytes) -> None:
        refusal = url_refusal(url, self._settings.webhook_allowed_networks)
        if refusal is not None:
            raise SendFailed(f"refused: {refusal}", permanent=True)
        key = await self._signing_key(spec, namespace)
        headers = {"Content-Type": "application/json", **signed_headers(key, message_id, int(time.time()), payload)}
        assert self._session is not None, "start() first"
        try:
            async with (
                self._sends,
                self._session.post(url, data=payload, headers=headers, allow_redirects=False) as response,
            ):
                if not 200 <= response.status < 300:
                    redirect = " (redirects are not followed)" if 300 <= response.status < 400 else ""
                    raise SendFailed(f"HTTP {response.status}{redirect}")
        except RefusedAddress as error:
            raise SendFailed(f"refused: {error}", permanent=True) from None
        except (aiohttp.ClientError, TimeoutError) as error:
            raise SendFailed(f"{type(error).__name__}: {error}") from None

    async def _signing_key(self, spec: WebhookSpec, namespace: str) -> bytes:
        reference = spec.signing_key_secret_ref
        name = reference.name if reference is not None else self._settings.webhook_signing_secret
        key = reference.key if reference is not None else DEFAULT_SIGNING_KEY
        try:
            text = await asyncio.to_thread(self._api.read_secret_key, namespace, name, key)
            return signing_key(text)
        except Exception as error:  # no Secret, no key, no right to read it, or no key in it: retried later
            hint = ""
            if name != self._settings.webhook_signing_secret:
                hint = f"; the operator may read only Secrets named {self._settings.webhook_signing_secret}"
            raise SendFailed(f"signing key {key!r} of Secret {namespace}/{name}: {error}{hint}") from None


def _status(raw: Any) -> FineTuneJobStatus:
    try:
        return FineTuneJobStatus.model_validate(raw or {})
    except ValidationError:
        return FineTuneJobStatus()
