"""Chaos harness: a load driver of unscheduled look-ups and the moment to inject a fault (the webhook receiver,
the registry writer and polling come from tests/support). Loopback only; every loop is bounded in count and time."""

from __future__ import annotations

import asyncio
import itertools
import random
import secrets
import time
from dataclasses import dataclass, field

import aiohttp
import orjson

from cpis_bridge.core.nhs import iter_test_numbers
from tests.support.polling import eventually
from tests.support.world import NHS_SYSTEM, auth, record

ED = auth("care-setting", "RXX01", name="Dr Chaos Example", role_code="R8000")
LA1 = auth("local-authority", "LA001")


def children(n: int, start: int = 0) -> list[str]:
    return [str(x) for x in itertools.islice(iter_test_numbers(start), n)]


async def load_children(
    session: aiohttp.ClientSession,
    base: str,
    nhs_numbers: list[str],
    sequence: int = 1,
    la_headers: dict[str, str] = LA1,
) -> None:
    records = [record(f"K{i}", nhs) for i, nhs in enumerate(nhs_numbers)]
    body = orjson.dumps({"sequence": sequence, "mode": "delta", "recordCount": len(records), "records": records})
    async with session.post(
        f"{base}/v1/uploads", data=body, headers={**la_headers, "Content-Type": "application/json"}
    ) as r:
        assert r.status == 200, await r.text()
        assert (await r.json())["accepted"] == len(records)


@dataclass
class LoadResult:
    acknowledged: dict[str, str] = field(default_factory=dict)  # TraceID -> NHS number
    failed: int = 0
    answers: list[tuple[int, float]] = field(default_factory=list)  # (status, seconds) of each answer; 0: no answer


async def drive_accesses(
    base_urls: list[str],
    nhs_numbers: list[str],
    total: int,
    *,
    concurrency: int = 16,
    deadline_s: float = 120.0,
    pause_s: float = 0.0,
    result: LoadResult | None = None,
) -> LoadResult:
    """``total`` unscheduled CareTeam look-ups with distinct TraceIDs spread over the children and the services.
    ``result``, when given, is filled as answers come (so a scenario can place its fault by progress)."""
    result = LoadResult() if result is None else result
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(total):
        queue.put_nowait(i)
    stop_at = time.monotonic() + deadline_s
    timeout = aiohttp.ClientTimeout(total=10)

    async def worker(session: aiohttp.ClientSession) -> None:
        while time.monotonic() < stop_at:
            try:
                i = queue.get_nowait()
            except asyncio.QueueEmpty:
                return
            nhs = nhs_numbers[i % len(nhs_numbers)]
            trace = f"chaos-{i}-{secrets.token_hex(4)}"
            base = base_urls[i % len(base_urls)]
            started = time.monotonic()
            try:
                async with session.get(
                    f"{base}/fhir/CareTeam",
                    params={"patient:identifier": f"{NHS_SYSTEM}|{nhs}"},
                    headers={**ED, "TraceID": trace, "IsUnscheduledAccessEvent": "true"},
                ) as r:
                    await r.read()
                    result.answers.append((r.status, time.monotonic() - started))
                    if 200 <= r.status < 300:
                        result.acknowledged[trace] = nhs
                    else:
                        result.failed += 1
            except (aiohttp.ClientError, TimeoutError):
                result.answers.append((0, time.monotonic() - started))
                result.failed += 1
            if pause_s:
                await asyncio.sleep(pause_s * random.random())

    async with aiohttp.ClientSession(timeout=timeout) as session:
        await asyncio.gather(*(worker(session) for _ in range(concurrency)))
    return result


async def fault_point(result: LoadResult, total: int, timeout: float = 60.0) -> int:
    """Wait until a random 10-60 % of ``total`` accesses have been answered (the moment to inject a fault, placed by
    progress so a faster service cannot finish first); returns how many had been answered."""
    target = random.randint(total // 10, total * 6 // 10)
    done = await eventually(lambda: len(result.acknowledged) + result.failed >= target, timeout, step=0.005)
    assert done, f"the load did not reach {target} answers within {timeout} s"
    return len(result.acknowledged) + result.failed
