"""Who calls, and what they may do, as the Kubernetes API server says: TokenReview, then SubjectAccessReview.

A caller may do through the API what it may do to FineTuneJobs in the namespace: create a training if it may
create FineTuneJobs there, get or list them if it may get or list them, cancel one if it may patch it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from kubernetes.client import ApiClient, AuthenticationV1Api, AuthorizationV1Api
from kubernetes.client.exceptions import ApiException

from finetune_operator.api import GROUP, PLURAL


@dataclass(frozen=True)
class Identity:
    username: str
    uid: str = ""
    groups: tuple[str, ...] = ()
    extra: Mapping[str, list[str]] = field(default_factory=dict)


class ReviewFailed(RuntimeError):
    """The API server did not answer a review (the operator lacks the right, or it is down)."""


def bearer_token(authorization: str | None) -> str | None:
    """The token of `Authorization: Bearer <token>` or `Token <token>` (Replicate's clients send either)."""
    scheme, _, token = (authorization or "").strip().partition(" ")
    token = token.strip()
    return token if scheme.lower() in ("bearer", "token") and token else None


class KubernetesAuth:
    def __init__(self, client: ApiClient) -> None:
        self._authentication = AuthenticationV1Api(client)
        self._authorization = AuthorizationV1Api(client)

    def authenticate(self, token: str) -> Identity | None:
        """The token's identity, or None when the API server does not accept the token."""
        review: Any = self._review(
            self._authentication.create_token_review,
            {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview", "spec": {"token": token}},
        )
        if not review.status or not review.status.authenticated or review.status.user is None:
            return None
        user = review.status.user
        return Identity(
            username=user.username or "",
            uid=user.uid or "",
            groups=tuple(user.groups or ()),
            extra=dict(user.extra or {}),
        )

    def allowed(self, identity: Identity, verb: str, namespace: str) -> bool:
        """Whether `identity` may `verb` FineTuneJobs in `namespace`."""
        spec: dict[str, Any] = {
            "user": identity.username,
            "groups": list(identity.groups),
            "resourceAttributes": {"namespace": namespace, "verb": verb, "group": GROUP, "resource": PLURAL},
        }
        if identity.uid:
            spec["uid"] = identity.uid
        if identity.extra:
            spec["extra"] = dict(identity.extra)
        review: Any = self._review(
            self._authorization.create_subject_access_review,
            {"apiVersion": "authorization.k8s.io/v1", "kind": "SubjectAccessReview", "spec": spec},
        )
        return bool(review.status and review.status.allowed)

    @staticmethod
    def _review(create: Any, body: dict[str, Any]) -> Any:
        try:
            return create(body)
        except ApiException as error:
            raise ReviewFailed(f"the API server refused a {body['kind']} ({error.status} {error.reason})") from None
