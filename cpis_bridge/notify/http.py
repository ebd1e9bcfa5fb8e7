"""What the delivery channels share: one HTTP attempt (with a tenacity retry for a dropped keep-alive connection)
and the classification of its answer into a DeliveryResult (2xx, 410, other 4xx, transient)."""

from __future__ import annotations

from collections.abc import Callable, Mapping

import aiohttp
from tenacity import AsyncRetrying, retry_if_exception_type, stop_after_attempt, wait_fixed

from cpis_bridge.core.backoff import retry_after_s
from cpis_bridge.core.ports import DeliveryOutcome, DeliveryResult

TRANSIENT_4XX = frozenset({408, 425, 429})


def classify(status: int, headers: Mapping[str, str]) -> DeliveryResult:
    if 200 <= status < 300:
        return DeliveryResult(DeliveryOutcome.DELIVERED, status)
    if status == 410:
        return DeliveryResult(DeliveryOutcome.GONE, status)
    ra = retry_after_s(headers.get("Retry-After"))
    if 400 <= status < 500 and status not in TRANSIENT_4XX:
        return DeliveryResult(DeliveryOutcome.CLIENT_ERROR, status, ra)
    return DeliveryResult(DeliveryOutcome.TRANSIENT, status, ra)


async def send(
    session: aiohttp.ClientSession,
    method: str,
    url: str,
    body: bytes,
    headers: Callable[[], dict[str, str]],
    timeout_s: float,
) -> DeliveryResult:
    """One delivery attempt. ``headers`` is called per HTTP try, so signatures carry the current timestamp. A
    connection the server closed under us is retried at once (a keep-alive race, not a receiver failure); tenacity
    is entered only on that path, so the common case pays nothing for it."""
    timeout = aiohttp.ClientTimeout(total=timeout_s)

    async def once() -> DeliveryResult:
        async with session.request(
            method, url, data=body, headers=headers(), timeout=timeout, allow_redirects=False
        ) as resp:
            await resp.read()
            return classify(resp.status, resp.headers)

    try:
        try:
            return await once()
        except aiohttp.ServerDisconnectedError:
            async for attempt in AsyncRetrying(
                retry=retry_if_exception_type(aiohttp.ServerDisconnectedError),
                stop=stop_after_attempt(2),
                wait=wait_fixed(0.01),
                reraise=True,
            ):
                with attempt:
                    return await once()
    except TimeoutError:
        return DeliveryResult(DeliveryOutcome.TRANSIENT, None, None, "timeout")
    except aiohttp.ClientError as exc:
        return DeliveryResult(DeliveryOutcome.TRANSIENT, None, None, type(exc).__name__)
    raise AssertionError("unreachable")  # pragma: no cover
