"""What the Replicate API tests need besides the FineTuneJob harness: callers with tokens, a webhook receiver that
verifies every delivery as a user's receiver would (the `standardwebhooks` library), and the servers' addresses."""

from __future__ import annotations

import base64
import json
import secrets
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from kubernetes import client
from kwokpods import wait_for
from standardwebhooks import Webhook
from testcluster import free_port

# The settings that let a test's webhooks reach the receiver on loopback.
LOOPBACK_WEBHOOKS = {"FINETUNE_WEBHOOK_ALLOWED_NETWORKS": '["127.0.0.0/8"]'}
SIGNING_SECRET = "finetune-webhook-signing-key"
TERMINAL = ("succeeded", "failed", "canceled")


def new_signing_key() -> str:
    return "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()


def create_signing_secret(api: client.ApiClient, namespace: str, key: str) -> None:
    """The namespace's webhook signing key, in the Secret the operator reads by default."""
    client.CoreV1Api(api).create_namespaced_secret(
        namespace, {"metadata": {"name": SIGNING_SECRET}, "stringData": {"key": key}}
    )


def service_account_token(api: client.ApiClient, namespace: str, name: str, verbs: tuple[str, ...] = ()) -> str:
    """A bound token of a new ServiceAccount that may do `verbs` to FineTuneJobs in `namespace` (nothing else)."""
    core = client.CoreV1Api(api)
    core.create_namespaced_service_account(namespace, {"metadata": {"name": name}})
    if verbs:
        rbac = client.RbacAuthorizationV1Api(api)
        rule = {"apiGroups": ["finetune.dev"], "resources": ["finetunejobs"], "verbs": list(verbs)}
        rbac.create_namespaced_role(namespace, {"metadata": {"name": name}, "rules": [rule]})
        rbac.create_namespaced_role_binding(
            namespace,
            {
                "metadata": {"name": name},
                "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": name},
                "subjects": [{"kind": "ServiceAccount", "name": name, "namespace": namespace}],
            },
        )
    request = core.create_namespaced_service_account_token(name, namespace, {"spec": {"expirationSeconds": 3600}})
    return str(request.status.token)


def wait_until_serving(url: str) -> None:
    """Until something answers HTTP at `url` (any status)."""

    def answers() -> bool:
        try:
            with urllib.request.urlopen(url, timeout=5):
                return True
        except urllib.error.HTTPError:
            return True
        except OSError:
            return False

    wait_for(answers, timeout=60, interval=0.25, description=f"a server at {url}")


@dataclass(frozen=True)
class Delivery:
    message_id: str
    body: dict[str, Any]
    answered: int


@dataclass
class WebhookReceiver:
    """Verifies each delivery with the signing key; answers 500 to the first `failures` deliveries (with
    `fail_terminal_only`, to those of finished trainings only) and 200 to the others."""

    key: str
    failures: int = 0
    fail_terminal_only: bool = False
    deliveries: list[Delivery] = field(default_factory=list)
    unverified: list[str] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    url: str = ""

    def answer(self, raw: bytes, headers: dict[str, str]) -> int:
        try:
            body = Webhook(self.key).verify(raw, headers)
        except Exception as error:
            with self._lock:
                self.unverified.append(f"{error}: {headers}")
            return 400
        with self._lock:
            chosen = not self.fail_terminal_only or body["status"] in TERMINAL
            status = 500 if chosen and self.failures > 0 else 200
            if status == 500:
                self.failures -= 1
            self.deliveries.append(Delivery(headers["webhook-id"], body, status))
        return status

    def accepted(self, training_id: str | None = None) -> list[Delivery]:
        with self._lock:
            return [
                d for d in self.deliveries if d.answered == 200 and (training_id is None or d.body["id"] == training_id)
            ]

    def attempts(self, message_id: str) -> list[int]:
        with self._lock:
            return [d.answered for d in self.deliveries if d.message_id == message_id]


@contextmanager
def running_receiver(receiver: WebhookReceiver) -> Iterator[WebhookReceiver]:
    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            raw = self.rfile.read(int(self.headers.get("Content-Length", "0")))
            status = receiver.answer(raw, {name.lower(): value for name, value in self.headers.items()})
            self.send_response(status)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, format: str, *args: Any) -> None:
            return None

    server = ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
    receiver.url = f"http://127.0.0.1:{server.server_address[1]}/hooks/replicate"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield receiver
    finally:
        server.shutdown()
        server.server_close()


def statuses(deliveries: list[Delivery]) -> list[str]:
    return [str(d.body["status"]) for d in deliveries]


def dumps(deliveries: list[Delivery]) -> str:
    return json.dumps([{"id": d.message_id, "status": d.body["status"], "answered": d.answered} for d in deliveries])
