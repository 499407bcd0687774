"""Whole images on worker threads, and a Ctrl-C that stops them between images.

The local bulk engine and the survey workflows give each worker thread
whole images (read, decode, network, store), one network session per worker.
While they work, a Ctrl-C is held (`cancellation.HeldInterrupts`) and
raised in the caller's thread between results: no further image starts and
those under way finish first, so the caller's record of what finished is
whole and no thread is left waiting on a lock the main thread held when
Python raised the Ctrl-C.
"""

from __future__ import annotations

import concurrent.futures
import functools
import queue
from collections.abc import Callable, Generator, Iterator, Sequence
from typing import TypeVar

from spacer_core.cancellation import HeldInterrupts
from spacer_core.inference.backends import one_session

T = TypeVar("T")
R = TypeVar("R")

# How often a waiting caller looks for a held Ctrl-C (seconds).
_CTRL_C_POLL = 0.1


def each_image(
    work: Callable[[T], R], items: Sequence[T], workers: int, *, name: str, ordered: bool = False
) -> Generator[R, None, None]:
    """`work(item)` for every item, `workers` at a time, each result as it finishes (in item order with `ordered`).

    Items start in the order given. With more than one worker each runs on
    a thread of its own (named `name`) and keeps to one network session;
    one worker runs them in the caller's thread on every session. An
    exception from `work` comes out where its result would. A Ctrl-C in the
    main thread starts no further item, hands back the results of those
    under way as they finish, then raises KeyboardInterrupt; a second
    Ctrl-C raises at once and leaves the items under way to end on their
    threads. Closing the iterator early cancels what has not started and
    waits for the rest.
    """
    items = list(items)
    count = max(1, min(workers, len(items)))
    with HeldInterrupts() as ctrl_c:
        if count == 1:
            for item in items:
                ctrl_c.check()
                yield work(item)
        else:
            yield from _on_threads(work, items, count, name, ordered, ctrl_c)
        ctrl_c.check()


def _on_threads(
    work: Callable[[T], R], items: list[T], count: int, name: str, ordered: bool, ctrl_c: HeldInterrupts
) -> Iterator[R]:
    def one(item: T) -> R:
        with one_session():  # each worker keeps to one core's session
            return work(item)

    finished: queue.SimpleQueue[int] = queue.SimpleQueue()
    pool = concurrent.futures.ThreadPoolExecutor(count, thread_name_prefix=name)
    futures: list[concurrent.futures.Future[R]] = []
    wait = True
    try:
        for i, item in enumerate(items):
            future = pool.submit(one, item)
            future.add_done_callback(functools.partial(_put_index, finished, i))
            futures.append(future)
        ready: set[int] = set()
        following = 0  # with `ordered`: the next item to hand back
        for i in _as_finished(futures, finished, ctrl_c):
            if not ordered:
                yield futures[i].result()
                continue
            ready.add(i)
            while following in ready:
                ready.discard(following)
                following += 1
                yield futures[following - 1].result()
    except KeyboardInterrupt:
        # The first Ctrl-C comes out only once nothing runs: this one asks not to wait.
        wait = False
        raise
    finally:  # an error or a caller that stops early leaves nothing queued
        for future in futures:
            future.cancel()
        pool.shutdown(wait=wait)


def _as_finished(
    futures: Sequence[concurrent.futures.Future[R]], finished: queue.SimpleQueue[int], ctrl_c: HeldInterrupts
) -> Iterator[int]:
    """Indices of `futures` as they finish (each future's callback puts its index in `finished`).

    After a Ctrl-C, futures not started are cancelled and those under way
    still come; then the KeyboardInterrupt is raised.
    """
    interrupted: KeyboardInterrupt | None = None
    for _ in futures:
        while True:
            if interrupted is None:
                try:
                    ctrl_c.check()
                except KeyboardInterrupt as exc:
                    interrupted = exc
                    for future in futures:
                        future.cancel()
            try:
                i = finished.get(timeout=_CTRL_C_POLL)
                break
            except queue.Empty:
                pass
        if not futures[i].cancelled():
            yield i
    if interrupted is not None:
        raise interrupted


def _put_index(finished: queue.SimpleQueue[int], i: int, _future: object) -> None:
    finished.put(i)
