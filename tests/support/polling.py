"""Waiting for a condition instead of sleeping: free loopback ports, HTTP status probes, polling a predicate until
it holds (async and blocking forms, each bounded in time), and waiting for a process's /readyz."""

from __future__ import annotations

import asyncio
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Awaitable, Callable

import aiohttp


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (the OS's choice)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def http_status(url: str, timeout: float = 2.0) -> int | None:
    """The status a GET of ``url`` answers, or None when nothing answers."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return int(resp.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)
    except OSError:
        return None


async def eventually(cond: Callable[[], bool], timeout: float = 10.0, step: float = 0.02) -> bool:
    """Poll ``cond`` every ``step`` seconds until it holds (True) or ``timeout`` passes (its last value)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        await asyncio.sleep(step)
    return bool(cond())


async def wait_for(cond: Callable[[], bool], timeout: float = 10.0, step: float = 0.02, what: str = "") -> bool:
    """Poll ``cond`` until it holds; AssertionError (naming ``what``) if it does not within ``timeout``."""
    if not await eventually(cond, timeout, step):
        raise AssertionError(f"condition not met in {timeout} s{': ' + what if what else ''}")
    return True


async def wait_for_async(
    cond: Callable[[], Awaitable[bool]], timeout: float = 10.0, step: float = 0.02, what: str = ""
) -> None:
    """As ``wait_for``, for a predicate that must await (a Redis read, an HTTP call)."""
    deadline = time.monotonic() + timeout
    while not await cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met in {timeout} s{': ' + what if what else ''}")
        await asyncio.sleep(step)


def wait_until(cond: Callable[[], bool], timeout: float = 20.0, step: float = 0.05, what: str = "") -> None:
    """Blocking form of ``wait_for`` (for tests that drive subprocesses from synchronous code)."""
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met in {timeout} s{': ' + what if what else ''}")
        time.sleep(step)


def wait_ready(base: str, proc: subprocess.Popen[bytes] | None = None, timeout: float = 30.0) -> None:
    """Block until ``base``/readyz answers 200; RuntimeError if ``proc`` exits first or time runs out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"the service exited with {proc.returncode} during start-up")
        if http_status(base + "/readyz") == 200:
            return
        time.sleep(0.05)
    raise RuntimeError(f"{base} did not become ready in {timeout} s")


async def wait_ready_async(base: str, proc: subprocess.Popen[bytes] | None = None, timeout: float = 30.0) -> None:
    """``wait_ready`` without blocking the event loop (the test's own servers keep answering meanwhile)."""
    deadline = time.monotonic() + timeout
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as http:
        while time.monotonic() < deadline:
            if proc is not None and proc.poll() is not None:
                raise RuntimeError(f"the service exited with {proc.returncode} during start-up")
            try:
                async with http.get(base + "/readyz") as r:
                    if r.status == 200:
                        return
            except (aiohttp.ClientError, TimeoutError):
                pass
            await asyncio.sleep(0.05)
    raise RuntimeError(f"{base} did not become ready in {timeout} s")
