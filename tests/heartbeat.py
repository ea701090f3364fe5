"""Shows that awaited engine work leaves the event loop free: a heartbeat ticks while it runs."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import TypeVar

T = TypeVar("T")


async def ticks_during(work: Awaitable[T], interval: float = 0.001) -> tuple[int, T]:
    """(heartbeat ticks counted while `work` ran, its result)."""
    ticks, stop = 0, asyncio.Event()

    async def heartbeat() -> None:
        nonlocal ticks
        while not stop.is_set():
            ticks += 1
            await asyncio.sleep(interval)

    beat = asyncio.create_task(heartbeat())
    try:
        result = await work
    finally:
        stop.set()
        await beat
    return ticks, result
