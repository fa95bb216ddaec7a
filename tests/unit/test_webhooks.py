"""Webhooks, pure: Standard Webhooks signatures, the address rules, and the delivery plan kept in status.webhook."""

from __future__ import annotations

import asyncio
import base64
import itertools
import socket
from datetime import UTC, datetime, timedelta
from ipaddress import ip_address, ip_network
from typing import Any

import pytest
from aiohttp.abc import AbstractResolver, ResolveResult
from replicate.webhook import Webhooks, WebhookSigningSecret
from standardwebhooks import Webhook

from finetune_contract.protocol import Output
from finetune_operator.api.spec import WebhookSpec
from finetune_operator.api.status import (
    FineTuneJobStatus,
    Phase,
    WebhookStatus,
)
from finetune_operator.webhooks.addresses import GuardedResolver, RefusedAddress, address_refusal, url_refusal
from finetune_operator.webhooks.deliveries import (
    RetryPolicy,
    attempt_failed,
    delivered,
    due,
    next_due,
    notice,
    stamp,
)
from finetune_operator.webhooks.signing import signature, signed_headers, signing_key

KEY_TEXT = "whsec_" + base64.b64encode(b"0123456789abcdef0123456789abcdef").decode()
UID = "0b7e4c2a-1111-2222-3333-444455556666"
T0 = datetime(2026, 11, 29, 10, 0, 0, tzinfo=UTC)
POLICY = RetryPolicy()


# --------------------------------------------------------------------------------------------- signatures


def test_signatures_verify_with_the_standard_webhooks_library_and_replicates_client() -> None:
    body = b'{"id": "alice.bot-1", "status": "succeeded"}'
    now = int(datetime.now(UTC).timestamp())
    headers = signed_headers(signing_key(KEY_TEXT), "msg_1", now, body)
    assert Webhook(KEY_TEXT).verify(body, headers) == {"id": "alice.bot-1", "status": "succeeded"}
    Webhooks.validate(headers=headers, body=body.decode(), secret=WebhookSigningSecret(key=KEY_TEXT))
    tampered = body.replace(b"succeeded", b"failed")
    with pytest.raises(Exception, match="signature"):
        Webhook(KEY_TEXT).verify(tampered, headers)


def test_signature_of_the_standard_webhooks_reference_example() -> None:
    # The example of the Standard Webhooks specification's reference implementations.
    key = signing_key("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw")
    body = b'{"test": 2432232314}'
    assert signature(key, "msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330, body) == (
        "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="
    )


@pytest.mark.parametrize("text", ["", "whsec_", "whsec_not base64!", "whsec_" + base64.b64encode(b"short").decode()])
def test_malformed_signing_keys_are_refused(text: str) -> None:
    with pytest.raises(ValueError, match="signing key"):
        signing_key(text)


# --------------------------------------------------------------------------------------------- addresses


@pytest.mark.parametrize(
    ("address", "kind"),
    [
        ("127.0.0.1", "loopback"),
        ("::1", "loopback"),
        ("::ffff:127.0.0.1", "loopback"),
        ("169.254.169.254", "link-local"),
        ("fe80::1", "link-local"),
        ("10.96.0.1", "private or cluster-internal"),
        ("192.168.1.10", "private or cluster-internal"),
        ("100.64.0.1", "private or cluster-internal"),
        ("fd00::1", "private or cluster-internal"),
        ("0.0.0.0", "not a unicast"),
        ("224.0.0.1", "not a unicast"),
    ],
)
def test_inside_addresses_are_refused(address: str, kind: str) -> None:
    refusal = address_refusal(ip_address(address), [])
    assert refusal is not None
    assert kind in refusal
    assert "webhookAllowedNetworks" in refusal


def test_public_addresses_and_allowed_networks_pass() -> None:
    assert address_refusal(ip_address("93.184.216.34"), []) is None
    assert address_refusal(ip_address("2606:2800:220:1::1"), []) is None
    assert address_refusal(ip_address("127.0.0.1"), [ip_network("127.0.0.0/8")]) is None
    assert address_refusal(ip_address("10.1.2.3"), [ip_network("127.0.0.0/8")]) == (
        "10.1.2.3 is a private or cluster-internal address; the operator's webhookAllowedNetworks setting does not "
        "allow it"
    )


def test_urls_are_judged_by_scheme_and_written_address_and_names_wait_for_their_lookup() -> None:
    assert (
        url_refusal("ftp://hooks.example.com/", [])
        == "must be an http:// or https:// URL, got 'ftp://hooks.example.com/'"
    )
    assert (url_refusal("http://[::1]:8080/hook", []) or "").startswith("::1 is a loopback address")
    assert (url_refusal("http://169.254.169.254/latest/meta-data/", []) or "").startswith(
        "169.254.169.254 is a link-local address"
    )
    assert url_refusal("https://hooks.example.com/replicate", []) is None
    assert url_refusal("http://receiver.team-a.svc.cluster.local/", []) is None  # refused once it resolves


class FixedResolver(AbstractResolver):
    def __init__(self, address: str) -> None:
        self._address = address

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        return [{"hostname": host, "host": self._address, "port": port, "family": family, "proto": 0, "flags": 0}]

    async def close(self) -> None:
        return None


def test_names_that_resolve_to_inside_addresses_are_refused_at_connect_time() -> None:
    inside = GuardedResolver([], FixedResolver("10.96.0.10"))
    with pytest.raises(RefusedAddress, match=r"receiver\.team-a\.svc resolves to 10\.96\.0\.10"):
        asyncio.run(inside.resolve("receiver.team-a.svc", 80))
    public = GuardedResolver([], FixedResolver("93.184.216.34"))
    assert asyncio.run(public.resolve("hooks.example.com", 443))[0]["host"] == "93.184.216.34"


# --------------------------------------------------------------------------------------------- the plan


def spec(**fields: Any) -> WebhookSpec:
    return WebhookSpec.model_validate({"url": "https://hooks.example.com/r", **fields})


def status(phase: Phase = Phase.PENDING, **fields: Any) -> FineTuneJobStatus:
    return FineTuneJobStatus(phase=phase, **fields)


def events_of(state: WebhookStatus) -> list[tuple[str, str]]:
    return [(d.event, d.target) for d in state.pending]


def deliver_all(state: WebhookStatus, now: datetime) -> WebhookStatus:
    for delivery in due(state, now, POLICY):
        state = delivered(state, delivery, now)
    return state


def test_start_is_sent_once_when_the_job_is_first_seen() -> None:
    state = notice(spec(), status(), WebhookStatus(), UID, T0)
    assert events_of(state) == [("start", "url")]
    assert state.pending[0].id == "msg_0b7e4c2a111122223333444455556666_1"
    assert notice(spec(), status(), state, UID, T0) == state
    after = deliver_all(state, T0)
    assert notice(spec(), status(), after, UID, T0 + timedelta(seconds=5)) == after


def test_logs_and_output_become_one_waiting_message_each_that_sends_the_latest_object() -> None:
    state = deliver_all(notice(spec(), status(), WebhookStatus(), UID, T0), T0)
    running = status(Phase.RUNNING, logs="step 1")
    state = notice(spec(), running, state, UID, T0)
    state = notice(spec(), status(Phase.RUNNING, logs="step 1\nstep 2"), state, UID, T0)
    assert events_of(state) == [("logs", "url")]
    output = Output(weights="s3://out/")
    state = notice(spec(), status(Phase.RUNNING, logs="step 1\nstep 2", output=output), state, UID, T0)
    assert events_of(state) == [("logs", "url"), ("output", "url")]


def test_output_and_logs_go_at_most_one_per_500_ms() -> None:
    state = deliver_all(notice(spec(), status(), WebhookStatus(), UID, T0), T0)
    state = notice(spec(), status(Phase.RUNNING, logs="a"), state, UID, T0)
    state = deliver_all(state, T0)
    state = notice(spec(), status(Phase.RUNNING, logs="a\nb"), state, UID, T0 + timedelta(milliseconds=100))
    assert due(state, T0 + timedelta(milliseconds=499), POLICY) == []
    assert next_due(state, POLICY) == T0 + timedelta(milliseconds=500)
    assert [d.event for d in due(state, T0 + timedelta(milliseconds=500), POLICY)] == ["logs"]


def test_completed_is_sent_once_and_supersedes_waiting_logs_and_output() -> None:
    state = deliver_all(notice(spec(), status(), WebhookStatus(), UID, T0), T0)
    state = notice(spec(), status(Phase.RUNNING, logs="a"), state, UID, T0)
    finished = status(Phase.SUCCEEDED, logs="a\nb", output=Output(weights="s3://out/"))
    state = notice(spec(), finished, state, UID, T0)
    assert events_of(state) == [("completed", "url")]
    state = deliver_all(state, T0)
    later = status(Phase.SUCCEEDED, logs="a\nb\nc", output=Output(weights="s3://out/"))
    assert notice(spec(), later, state, UID, T0 + timedelta(minutes=1)) == state
    assert state.delivered == 2
    assert state.sequence == 3


def test_events_outside_the_filter_are_not_sent_and_completed_url_gets_completed() -> None:
    only_completed = spec(events=["completed"], completedUrl="https://other.example.com/done")
    state = notice(only_completed, status(), WebhookStatus(), UID, T0)
    assert state.pending == []
    state = notice(only_completed, status(Phase.RUNNING, logs="x"), state, UID, T0)
    assert state.pending == []
    state = notice(only_completed, status(Phase.FAILED), state, UID, T0)
    assert events_of(state) == [("completed", "url"), ("completed", "completedUrl")]
    same_url = spec(events=["completed"], completedUrl="https://hooks.example.com/r")
    assert events_of(notice(same_url, status(Phase.FAILED), WebhookStatus(), UID, T0)) == [("completed", "url")]


def test_a_failing_message_is_retried_with_exponential_backoff_for_at_least_an_hour_then_given_up() -> None:
    state = notice(spec(), status(), WebhookStatus(), UID, T0)
    now = T0
    attempts_at = []
    while state.pending:
        (delivery,) = due(state, now, POLICY)
        attempts_at.append(now)
        state = attempt_failed(state, delivery, now, "HTTP 500", POLICY)
        following = next_due(state, POLICY)
        if following is not None:
            now = following
    gaps = [(b - a).total_seconds() for a, b in itertools.pairwise(attempts_at)]
    assert gaps[:4] == [1, 2, 4, 8]
    assert max(gaps) == 600
    assert attempts_at[-1] - attempts_at[0] >= timedelta(hours=1)
    assert state.failed == 1
    assert "given up" in (state.last_error or "")


def test_each_url_gets_its_messages_in_order_while_one_is_retried() -> None:
    both = spec(completedUrl="https://other.example.com/done")
    state = notice(both, status(), WebhookStatus(), UID, T0)
    (start,) = due(state, T0, POLICY)
    state = attempt_failed(state, start, T0, "HTTP 500", POLICY)
    state = notice(both, status(Phase.SUCCEEDED), state, UID, T0)
    assert events_of(state) == [("start", "url"), ("completed", "url"), ("completed", "completedUrl")]
    assert [(d.event, d.target) for d in due(state, T0, POLICY)] == [("completed", "completedUrl")]
    retried = due(state, T0 + timedelta(seconds=1), POLICY)
    assert (retried[0].event, retried[0].target, retried[0].attempts, retried[0].id) == ("start", "url", 1, start.id)


def test_a_refused_address_is_given_up_at_once() -> None:
    state = notice(spec(), status(), WebhookStatus(), UID, T0)
    state = attempt_failed(state, state.pending[0], T0, "refused: loopback", POLICY, permanent=True)
    assert state.pending == []
    assert state.failed == 1


def test_times_are_written_to_the_millisecond() -> None:
    assert stamp(T0 + timedelta(microseconds=123456)) == "2026-11-29T10:00:00.123Z"
