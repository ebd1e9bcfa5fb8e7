"""Builds each LA's delivery channels from the registry (webhook, FHIR Communication); the pull inbox needs none.
A channel that cannot work (missing secret, unsupported auth) still exists and fails transiently, so its
notifications wait (and reach the dead letters at the maximum age) instead of being dropped."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import aiohttp

from cpis_bridge.core.nhs import NhsNumber
from cpis_bridge.core.ports import Channel, DeliveryOutcome, DeliveryResult
from cpis_bridge.core.registry import LocalAuthority, Registry
from cpis_bridge.fhir.client import Auth, make_auth
from cpis_bridge.notify.fhir import FhirCommunicationChannel
from cpis_bridge.notify.webhook import WebhookChannel, WebhookSecretError

log = logging.getLogger("cpis_bridge.delivery")


class MisconfiguredChannel:
    def __init__(self, name: str, detail: str) -> None:
        self.name = name
        self.detail = detail

    async def deliver(self, la: str, notification_id: str, nhs: NhsNumber, body: bytes) -> DeliveryResult:
        return DeliveryResult(DeliveryOutcome.TRANSIENT, None, None, self.detail)


def channel_names(la: LocalAuthority) -> list[str]:
    return (["webhook"] if la.webhook else []) + (["fhir"] if la.fhir else [])


def fhir_auth(options: Mapping[str, str], env: Callable[[str], str | None]) -> Auth:
    """An LA's FHIR channel auth from its registry ``auth`` block: the options of CPIS_FHIR_AUTH_MODE, secrets by
    environment variable name (``tokenEnv``, ``clientSecretEnv``), e.g. ``{mode: private-key-jwt, tokenUrl: ...,
    clientId: ..., privateKeyFile: /secrets/la001.pem, kid: k1, alg: RS384, scope: system/Communication.write}``."""
    key_file = options.get("privateKeyFile")
    return make_auth(
        options.get("mode", "none"),
        token=env(options["tokenEnv"]) if options.get("tokenEnv") else None,
        token_url=options.get("tokenUrl"),
        client_id=options.get("clientId"),
        client_secret=env(options["clientSecretEnv"]) if options.get("clientSecretEnv") else None,
        private_key_file=Path(key_file) if key_file else None,
        kid=options.get("kid"),
        alg=options.get("alg", "RS384"),
        scope=options.get("scope"),
    )


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
                channels.append(
                    WebhookChannel(session, la.webhook.url, env(la.webhook.secret_env) or "", timeout_s=timeout_s)
                )
            except WebhookSecretError as exc:
                log.error("delivery.webhook_misconfigured", extra={"la": la.ods, "env": la.webhook.secret_env})
                channels.append(MisconfiguredChannel("webhook", str(exc)))
        if la.fhir is not None:
            try:
                auth = fhir_auth(la.fhir.auth, env)
            except (ValueError, OSError) as exc:
                log.error("delivery.fhir_misconfigured", extra={"la": la.ods, "error": str(exc)})
                channels.append(MisconfiguredChannel("fhir", str(exc)))
            else:
                channels.append(FhirCommunicationChannel(session, la.fhir.base_url, auth=auth, timeout_s=timeout_s))
        out[la.ods] = channels
    return out
