"""Leader election with a `coordination.k8s.io/v1` Lease, as every Kubernetes controller does it (client-go).

Candidates try to take the Lease every `retry_period`; a Lease held by another is free once its record has not
changed for `lease_duration` as this candidate observed it (its own clock, never the holder's timestamps, so
clock skew between nodes does not matter). The leader renews every `retry_period`; one that cannot renew within
`renew_deadline` must stop at once, before another may take over. Writes are optimistic (resourceVersion), so two
candidates never both win.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from kubernetes.client import CoordinationV1Api
from kubernetes.client.exceptions import ApiException

log = logging.getLogger(__name__)


def _micro_time(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


@dataclass(frozen=True)
class LeaseConfig:
    namespace: str
    name: str
    identity: str
    lease_duration: float = 15.0
    renew_deadline: float = 10.0
    retry_period: float = 2.0


class LeaderElector:
    def __init__(
        self,
        api: CoordinationV1Api,
        config: LeaseConfig,
        clock: Callable[[], float] = time.monotonic,
        timeout: float = 10.0,
    ) -> None:
        self._api = api
        self._config = config
        self._clock = clock
        self._timeout = timeout
        self._observed_record: tuple[Any, ...] | None = None
        self._observed_at = 0.0
        self._last_renewal = 0.0

    def try_acquire_or_renew(self) -> bool:
        """One attempt: True when this candidate holds the Lease afterwards."""
        config = self._config
        now_wall = datetime.now(UTC)
        now = self._clock()
        try:
            lease = self._api.read_namespaced_lease(config.name, config.namespace, _request_timeout=self._timeout)
        except ApiException as error:
            if error.status != 404:
                log.warning("cannot read Lease %s/%s: %s", config.namespace, config.name, error.reason)
                return False
            return self._create(now_wall, now)
        except Exception as error:  # an outage: try again at the next period
            log.warning("cannot read Lease %s/%s: %s", config.namespace, config.name, error)
            return False
        spec = lease.spec
        record = (spec.holder_identity, spec.renew_time, spec.lease_transitions)
        if record != self._observed_record:
            self._observed_record, self._observed_at = record, now
        holder = spec.holder_identity
        held_by_other = bool(holder) and holder != config.identity
        if held_by_other and self._observed_at + (spec.lease_duration_seconds or config.lease_duration) > now:
            return False
        body = {
            "metadata": {"resourceVersion": lease.metadata.resource_version},
            "spec": {
                "holderIdentity": config.identity,
                "leaseDurationSeconds": int(config.lease_duration),
                "renewTime": _micro_time(now_wall),
                **(
                    {
                        "acquireTime": _micro_time(now_wall),
                        "leaseTransitions": (spec.lease_transitions or 0) + (1 if holder else 0),
                    }
                    if holder != config.identity
                    else {}
                ),
            },
        }
        try:
            self._patch_lease(body)
        except Exception as error:  # 409: someone else wrote first; anything else: an outage
            log.info("cannot take or renew Lease %s/%s: %s", config.namespace, config.name, error)
            return False
        self._last_renewal = now
        if holder != config.identity:
            log.info("%s now leads (Lease %s/%s)", config.identity, config.namespace, config.name)
        return True

    def _patch_lease(self, body: dict[str, Any]) -> None:
        """A merge patch of the Lease; with a resourceVersion in `body`, only of the Lease as it was read."""
        self._api.patch_namespaced_lease(
            self._config.name,
            self._config.namespace,
            body,
            _content_type="application/merge-patch+json",
            _request_timeout=self._timeout,
        )

    def _create(self, now_wall: datetime, now: float) -> bool:
        config = self._config
        body = {
            "apiVersion": "coordination.k8s.io/v1",
            "kind": "Lease",
            "metadata": {"name": config.name, "namespace": config.namespace},
            "spec": {
                "holderIdentity": config.identity,
                "leaseDurationSeconds": int(config.lease_duration),
                "acquireTime": _micro_time(now_wall),
                "renewTime": _micro_time(now_wall),
                "leaseTransitions": 0,
            },
        }
        try:
            self._api.create_namespaced_lease(config.namespace, body, _request_timeout=self._timeout)
        except Exception as error:
            log.info("cannot create Lease %s/%s: %s", config.namespace, config.name, error)
            return False
        self._last_renewal = now
        log.info("%s now leads (new Lease %s/%s)", config.identity, config.namespace, config.name)
        return True

    def wait_until_leading(self, stop: threading.Event | None = None) -> bool:
        """Block until this candidate holds the Lease (True), or `stop` is set (False)."""
        stop = stop or threading.Event()
        while not stop.is_set():
            if self.try_acquire_or_renew():
                return True
            stop.wait(self._config.retry_period)
        return False

    def keep_leading(self, on_lost: Callable[[], None], stop: threading.Event) -> threading.Thread:
        """Renew on a daemon thread; call `on_lost` when renewal has failed for `renew_deadline`."""

        def renew() -> None:
            while not stop.wait(self._config.retry_period):
                if self.try_acquire_or_renew():
                    continue
                if self._clock() - self._last_renewal >= self._config.renew_deadline:
                    log.error("%s lost the Lease: stopping", self._config.identity)
                    on_lost()
                    return

        thread = threading.Thread(target=renew, name="leader-election", daemon=True)
        thread.start()
        return thread

    def release(self) -> None:
        """Give the Lease up at a clean shutdown, so that a standby takes over at once instead of waiting."""
        config = self._config
        try:
            lease = self._api.read_namespaced_lease(config.name, config.namespace, _request_timeout=self._timeout)
            if lease.spec.holder_identity != config.identity:
                return
            body = {
                "metadata": {"resourceVersion": lease.metadata.resource_version},
                "spec": {
                    "holderIdentity": None,
                    "leaseDurationSeconds": 1,
                    "renewTime": _micro_time(datetime.now(UTC)),
                },
            }
            self._patch_lease(body)
        except Exception as error:
            log.warning("could not release Lease %s/%s: %s", config.namespace, config.name, error)
