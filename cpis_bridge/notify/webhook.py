"""The webhook channel: POST the notification body to the LA's URL, signed per Standard Webhooks (webhook-id,
webhook-timestamp, webhook-signature "v1,<base64 HMAC-SHA256 of id.timestamp.body>"), signed anew on every try."""

from __future__ import annotations

import base64
import hashlib
import hmac
import time
from collections.abc import Callable

import aiohttp

from cpis_bridge.core.nhs import NhsNumber
from cpis_bridge.core.ports import DeliveryResult
from cpis_bridge.notify.http import send

SECRET_PREFIX = "whsec_"


class WebhookSecretError(ValueError):
    """The configured secret is not a whsec_ secret (the message never contains the secret)."""


def signing_key(secret: str) -> bytes:
    if not secret.startswith(SECRET_PREFIX):
        raise WebhookSecretError("a webhook secret must start with whsec_")
    try:
        return base64.b64decode(secret[len(SECRET_PREFIX) :], validate=True)
    except ValueError:
        raise WebhookSecretError("a webhook secret must be whsec_ followed by base64") from None


def sign(key: bytes, msg_id: str, timestamp: int, body: bytes) -> str:
    mac = hmac.new(key, f"{msg_id}.{timestamp}.".encode() + body, hashlib.sha256).digest()
    return "v1," + base64.b64encode(mac).decode()


class WebhookChannel:
    name = "webhook"

    def __init__(
        self,
        session: aiohttp.ClientSession,
        url: str,
        secret: str,
        *,
        timeout_s: float = 10.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.session = session
        self.url = url
        self.key = signing_key(secret)
        self.timeout_s = timeout_s
        self.clock = clock

    async def deliver(self, la: str, notification_id: str, nhs: NhsNumber, body: bytes) -> DeliveryResult:
        def headers() -> dict[str, str]:
            ts = int(self.clock())
            return {
                "Content-Type": "application/json",
                "webhook-id": notification_id,
                "webhook-timestamp": str(ts),
                "webhook-signature": sign(self.key, notification_id, ts, body),
            }

        return await send(self.session, "POST", self.url, body, headers, self.timeout_s)
