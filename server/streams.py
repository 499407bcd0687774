"""Bidirectional streams: requests handled concurrently, replies bounded by a window."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from functools import partial
from typing import Any, TypeVar

Req = TypeVar("Req")
Resp = TypeVar("Resp")
Held = TypeVar("Held")


def _release(release: Callable[[Held], None], held: Held, _: object) -> None:
    release(held)


async def windowed(
    requests: AsyncIterator[Req],
    handle: Callable[[Req], Awaitable[Resp]],
    window: int,
    *,
    receive: Callable[[Req], Awaitable[Held]] | None = None,
    release: Callable[[Held], None] | None = None,
) -> AsyncIterator[Resp]:
    """`handle(request)` for each request, replies in completion order.

    At most `window` requests are being handled or have replies not yet
    handed to gRPC: a slot is freed only once its reply is yielded, so a
    client that reads no replies stops having its requests read
    (backpressure). `handle` turns its own failures into replies; an error of
    the request stream itself ends the call. When the call ends (client gone,
    deadline passed, server stopping) the requests still running are cancelled.

    `receive(request)`, when given, is awaited as each request is read, before
    the next one is: what it returns (memory charged for the request) is
    handed to `release` once the request is done with, or cancelled, or never
    handled because the call ended.
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
                held = await receive(request) if receive is not None else None
                task = asyncio.create_task(one(request))
                running.add(task)
                task.add_done_callback(running.discard)
                if release is not None and held is not None:
                    # A done callback runs even for a task cancelled before it started.
                    task.add_done_callback(partial(_release, release, held))
                del request, held  # the task alone keeps them
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
