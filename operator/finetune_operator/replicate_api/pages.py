"""Cursor pagination of `GET /v1/trainings`, newest first, as Replicate pages its lists."""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Sequence

from finetune_operator.replicate_api.mapping import InvalidTraining
from finetune_operator.replicate_api.training import Training

PAGE_SIZE = 100


def _key(training: Training) -> tuple[str, str]:
    return (training.created_at or "", training.id)


def encode_cursor(training: Training) -> str:
    return base64.urlsafe_b64encode(json.dumps(_key(training)).encode()).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[str, str]:
    try:
        created_at, identifier = json.loads(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)))
        return str(created_at), str(identifier)
    except (binascii.Error, ValueError, TypeError):
        raise InvalidTraining.of("cursor", "is not a cursor of this server's pages") from None


def page(trainings: Sequence[Training], cursor: str | None, size: int = PAGE_SIZE) -> tuple[list[Training], str | None]:
    """The page after `cursor` (the first page when None), newest first, and the cursor of the next page."""
    ordered = sorted(trainings, key=_key, reverse=True)
    if cursor is not None:
        after = decode_cursor(cursor)
        ordered = [training for training in ordered if _key(training) < after]
    shown = ordered[:size]
    return shown, encode_cursor(shown[-1]) if len(ordered) > size else None
