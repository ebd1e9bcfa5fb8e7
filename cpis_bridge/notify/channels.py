"""Builds each LA's delivery channels from the registry (webhook, FHIR Communication); the pull inbox needs none.
A channel that cannot work (missing secret, unsupported auth) still exists and fails transiently, so its
notifications wait (and reach the dead letters at the maximum age) instead of being dropped."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import aiohttp

from cpis_bridge.core.ports import Channel, DeliveryResult
from cpis_bridge.core.registry import LocalAuthority, Registry
from cpis_bridge.notify.fhir import FhirCommunicationChannel
from cpis_bridge.notify.webhook import WebhookChannel, WebhookSecretError

log = logging.getLogger("cpis_bridge.delivery")


class MisconfiguredChannel:
    def __init__(self, name: str, detail: str) -> None:
        self.name = name
        self.detail = detail

    async def deliver(self, la: str, notification_id: str, nhs: str, body: bytes) -> DeliveryResult:
        return DeliveryResult("transient", None, None, self.detail)


def channel_names(la: LocalAuthority) -> list[str]:
    return (["webhook"] if la.webhook else []) + (["fhir"] if la.fhir else [])


def build_channels(
    registry: Registry,
    session: aiohttp.ClientSession,
    env: Callable[[str], str | None],
    *,
    timeout_s: float,
) -> dict[str, Sequence[Channel]]:
    out: dict[str, Sequence[Channel]] = {}
    for la in registry.local_authorities.values():
        channels: list[Channel] = []
        if la.webhook is not None:
            try:
                channels.append(WebhookChannel(session, la.webhook.url, env(la.webhook.secret_env) or "",
                                               timeout_s=timeout_s))
            except WebhookSecretError as exc:
                log.error("delivery.webhook_misconfigured", extra={"la": la.ods, "env": la.webhook.secret_env})
                channels.append(MisconfiguredChannel("webhook", str(exc)))
        if la.fhir is not None:
            mode = la.fhir.auth.get("mode", "none")
            if mode == "none":
                channels.append(FhirCommunicationChannel(session, la.fhir.base_url, timeout_s=timeout_s))
            elif mode == "bearer" and env(la.fhir.auth.get("tokenEnv", "")):
                token = env(la.fhir.auth.get("tokenEnv", ""))
                channels.append(FhirCommunicationChannel(session, la.fhir.base_url, timeout_s=timeout_s,
                                                         auth_headers={"Authorization": f"Bearer {token}"}))
            else:
                log.error("delivery.fhir_misconfigured", extra={"la": la.ods, "mode": mode})
                channels.append(MisconfiguredChannel("fhir", f"FHIR auth mode {mode} is not available"))
        out[la.ods] = channels
    return out
