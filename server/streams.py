"""Bidirectional streams: requests handled concurrently, replies bounded by a window."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

Req = TypeVar("Req")
Resp = TypeVar("Resp")


async def windowed(
    requests: AsyncIterator[Req], handle: Callable[[Req], Awaitable[Resp]], window: int
) -> AsyncIterator[Resp]:
    """`handle(request)` for each request, replies in completion order.

    At most `window` requests are being handled or have replies not yet
    handed to gRPC: a slot is freed only once its reply is yielded, so a
    client that reads no replies stops having its requests read
    (backpressure). `handle` turns its own failures into replies; an error of
    the request stream itself ends the call. When the call ends (client gone,
    deadline passed, server stopping) the requests still running are cancelled.
    """
    slots = asyncio.Semaphore(window)
    results: asyncio.Queue[Any] = asyncio.Queue()
    running: set[asyncio.Task[None]] = set()
    end = object()

    async def one(request: Req) -> None:
        await results.put(await handle(request))

    async def read() -> None:
        try:
            async for request in requests:
                await slots.acquire()
                task = asyncio.create_task(one(request))
                running.add(task)
                task.add_done_callback(running.discard)
            if running:
                await asyncio.gather(*list(running))
            await results.put(end)
        except Exception as exc:  # the request stream itself broke
            await results.put(exc)

    reader = asyncio.create_task(read())
    try:
        while True:
            item = await results.get()
            if item is end:
                break
            if isinstance(item, Exception):
                raise item
            yield item
            slots.release()
    finally:
        reader.cancel()
        for task in list(running):
            task.cancel()
