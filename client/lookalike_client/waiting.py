"""Polling until something is ready: the one loop behind every "wait until ready" in lookalike (the
client's `wait_until_ready`, the launcher's, and the scripts')."""

from __future__ import annotations

import asyncio
import time
from typing import Awaitable, Callable

from .errors import ServerUnavailableError


def wait_for(
    ready: Callable[[], bool],
    timeout_s: float,
    *,
    what: str,
    interval_s: float = 0.25,
    abort: Callable[[], "str | None"] | None = None,
) -> float:
    """Calls `ready` every `interval_s` until it returns True; returns the seconds waited. Raises
    ServerUnavailableError when `timeout_s` passes, or at once with the reason `abort` returns when it
    returns one (e.g. the server process exited)."""
    started = time.monotonic()
    while not ready():
        reason = abort() if abort is not None else None
        if reason:
            raise ServerUnavailableError(reason)
        if time.monotonic() - started > timeout_s:
            raise ServerUnavailableError(f"{what} not ready after {timeout_s:.0f} s")
        time.sleep(interval_s)
    return time.monotonic() - started


async def wait_for_async(ready: Callable[[], Awaitable[bool]], timeout_s: float, *, what: str,
                         interval_s: float = 0.25) -> float:
    """`wait_for` for an event loop: awaits `ready()` every `interval_s` without blocking the loop."""
    started = time.monotonic()
    while not await ready():
        if time.monotonic() - started > timeout_s:
            raise ServerUnavailableError(f"{what} not ready after {timeout_s:.0f} s")
        await asyncio.sleep(interval_s)
    return time.monotonic() - started
