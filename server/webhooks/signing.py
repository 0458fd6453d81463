"""Standard Webhooks signatures (https://www.standardwebhooks.com), made by the reference library.

Every attempt of a delivery carries the same `webhook-id` (the delivery's id: receivers
deduplicate on it) and body, a fresh `webhook-timestamp` (receivers refuse stale ones), and
`webhook-signature`: one `v1,<base64 HMAC-SHA256>` per valid secret (the current one, and the
previous one for `webhook_secret_grace_s` after a rotation), space-separated as the spec allows.
"""

from __future__ import annotations

import base64
import secrets
from collections.abc import Iterable
from datetime import datetime

from standardwebhooks.webhooks import Webhook

SECRET_PREFIX = "whsec_"


def new_secret() -> str:
    return SECRET_PREFIX + base64.b64encode(secrets.token_bytes(32)).decode()


def headers(message_id: str, body: str, when: datetime, signing_secrets: Iterable[str]) -> dict[str, str]:
    signatures = [Webhook(secret).sign(message_id, when, body) for secret in signing_secrets]
    return {
        "webhook-id": message_id,
        "webhook-timestamp": str(int(when.timestamp())),
        "webhook-signature": " ".join(signatures),
        "content-type": "application/json",
        "user-agent": "halos-server-webhooks/1",
    }
