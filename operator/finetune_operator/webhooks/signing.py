"""Standard Webhooks signatures (https://www.standardwebhooks.com): HMAC-SHA256 over `<id>.<timestamp>.<body>`.

A key is written as Standard Webhooks writes it, `whsec_<base64>`; receivers verify with any Standard Webhooks
library (or Replicate's `replicate.webhooks.validate`) given the same key.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac

KEY_PREFIX = "whsec_"


def signing_key(text: str) -> bytes:
    """The key bytes of `whsec_<base64>` (the prefix is optional); ValueError when it is not one."""
    try:
        key = base64.b64decode(text.strip().removeprefix(KEY_PREFIX), validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("a webhook signing key is `whsec_` followed by base64") from None
    if len(key) < 16:
        raise ValueError("a webhook signing key holds at least 16 bytes")
    return key


def signature(key: bytes, message_id: str, timestamp: int, body: bytes) -> str:
    """The `webhook-signature` header value: `v1,<base64 HMAC-SHA256>`."""
    digest = hmac.new(key, f"{message_id}.{timestamp}.".encode() + body, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode()


def signed_headers(key: bytes, message_id: str, timestamp: int, body: bytes) -> dict[str, str]:
    return {
        "webhook-id": message_id,
        "webhook-timestamp": str(timestamp),
        "webhook-signature": signature(key, message_id, timestamp, body),
    }
