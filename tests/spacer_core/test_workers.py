"""Worker threads over whole images (`workers.each_image`) and the held Ctrl-C (`cancellation.HeldInterrupts`)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from spacer_core.cancellation import HeldInterrupts
from spacer_core.inference.backends import _SlotPool
from spacer_core.workers import each_image

ROOT = Path(__file__).resolve().parents[2]


def _ctrl_c() -> None:
    """A Ctrl-C to this process, handled (as Python does) in the main thread."""
    os.kill(os.getpid(), signal.SIGINT)
    time.sleep(0.05)  # the handler runs at the main thread's next instruction


def _python(code: str, *argv: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """`python -c code argv...` in a new interpreter at the checkout's root; it must exit 0."""
    result = subprocess.run(
        [sys.executable, "-c", code, *argv],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]
    return result


# ---------------------------------------------------------------- each_image


@pytest.mark.parametrize("workers", [1, 3])
def test_every_item_once_in_order_when_asked(workers):
    def slow_first(i: int) -> int:
        time.sleep(0.05 if i == 0 else 0.0)
        return i * 10

    ordered = list(each_image(slow_first, range(8), workers, name="t", ordered=True))
    assert ordered == [i * 10 for i in range(8)]
    finished = list(each_image(slow_first, range(8), workers, name="t"))
    assert sorted(finished) == ordered
    if workers > 1:
        assert finished[-1] == 0  # as they finish: the slow first item comes last


@pytest.mark.parametrize("workers", [1, 2])
def test_an_error_comes_out_where_its_result_would(workers):
    def work(i: int) -> int:
        if i == 2:
            raise ValueError("item 2")
        return i

    seen = []
    with pytest.raises(ValueError, match="item 2"):
        for value in each_image(work, range(5), workers, name="t", ordered=True):
            seen.append(value)
    assert seen == [0, 1]


def test_closing_early_starts_nothing_more_and_leaves_no_thread():
    started = []

    def work(i: int) -> int:
        started.append(i)
        time.sleep(0.02)
        return i

    results = each_image(work, range(50), 2, name="closing-test")
    next(results)
    results.close()
    assert len(started) <= 4
    assert not [t for t in threading.enumerate() if t.name.startswith("closing-test")]


def test_workers_keep_to_one_session_each():
    from spacer_core.inference.backends import in_one_session

    assert set(each_image(lambda _: in_one_session(), range(6), 2, name="t")) == {True}
    assert set(each_image(lambda _: in_one_session(), range(6), 1, name="t")) == {False}


def _ctrl_c_lets_items_under_way_finish_then_raises(workers):
    done = []

    def work(i: int) -> int:
        if i == 0:
            threading.Thread(target=os.kill, args=(os.getpid(), signal.SIGINT)).start()
        time.sleep(0.3)
        done.append(i)
        return i

    got = []
    with pytest.raises(KeyboardInterrupt):
        for value in each_image(work, range(10), workers, name="t"):
            got.append(value)
    assert sorted(got) == sorted(done)  # nothing finished unseen
    assert 1 <= len(done) <= workers + 1
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def _a_second_ctrl_c_does_not_wait_for_the_items_under_way():
    release = threading.Event()
    ended = []

    def work(i: int) -> int:
        if i == 0:
            threading.Thread(target=_two_ctrl_c).start()
        release.wait(60)
        ended.append(i)
        return i

    with pytest.raises(KeyboardInterrupt):
        list(each_image(work, range(10), 2, name="second-ctrl-c"))
    assert ended == []  # out while both items were still under way
    release.set()
    for thread in threading.enumerate():
        if thread.name.startswith("second-ctrl-c"):
            thread.join(10)
    assert sorted(ended) == [0, 1]  # they ended on their threads; nothing else started


def _two_ctrl_c() -> None:
    for _ in range(2):
        time.sleep(0.3)  # apart, or the process may see one
        os.kill(os.getpid(), signal.SIGINT)


# A Ctrl-C raised inside `concurrent.futures.as_completed` left a future's lock held by the main
# thread; the worker finishing that future waited on it for good, the main thread on the worker.
_STRESS = """
import faulthandler, os, random, signal, sys, threading, time
from spacer_core.bulk import local


def work(item):
    time.sleep(random.random() * 0.001)
    return item


local.process_image = lambda task, item, rt: work(item)  # the engine's own loop, without images
rounds = int(sys.argv[1])
for n in range(rounds):
    faulthandler.dump_traceback_later(10, exit=True)  # a round stuck for 10 s: the stacks, and out
    fired = threading.Event()

    def fire():
        time.sleep(random.random() * 0.02)
        os.kill(os.getpid(), signal.SIGINT)
        fired.set()

    threading.Thread(target=fire, daemon=True).start()
    try:
        got = list(local.local_outcomes(None, range(3000), None, workers=2))
        assert sorted(got) == list(range(3000))
    except KeyboardInterrupt:
        pass
    while True:  # the Ctrl-C may come after the run ended
        try:
            fired.wait()
            time.sleep(0.002)
            break
        except KeyboardInterrupt:
            pass
    faulthandler.cancel_dump_traceback_later()
print("rounds", rounds)
"""


@pytest.mark.slow
def test_ctrl_c_at_any_moment_never_leaves_the_engine_stuck():
    # Before the fix this hung (or broke a lock) within ten rounds, every time.
    result = _python(_STRESS, "100", timeout=240)
    assert "rounds 100" in result.stdout


# ---------------------------------------------------------------- HeldInterrupts


def _a_held_ctrl_c_waits_for_check_and_comes_once():
    with HeldInterrupts() as ctrl_c:
        ctrl_c.check()
        _ctrl_c()
        with pytest.raises(KeyboardInterrupt):
            ctrl_c.check()
        ctrl_c.check()  # once
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def _a_second_ctrl_c_raises_at_once():
    with HeldInterrupts():
        _ctrl_c()
        with pytest.raises(KeyboardInterrupt):
            _ctrl_c()


def _a_ctrl_c_still_held_at_the_end_is_raised_there_not_lost():
    with pytest.raises(KeyboardInterrupt):
        with HeldInterrupts():
            with HeldInterrupts():  # inner blocks leave it to the outermost
                _ctrl_c()
            reached = True
    assert reached


def _an_error_on_its_way_out_is_not_replaced_by_a_held_ctrl_c():
    with pytest.raises(ValueError):
        with HeldInterrupts():
            _ctrl_c()
            raise ValueError("first")
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def _a_programs_own_handler_and_other_threads_are_left_alone():
    calls = []
    previous = signal.signal(signal.SIGINT, lambda *_: calls.append(1))
    try:
        with HeldInterrupts() as ctrl_c:
            assert signal.getsignal(signal.SIGINT) is not signal.default_int_handler
            _ctrl_c()
            ctrl_c.check()
        assert calls == [1]
    finally:
        signal.signal(signal.SIGINT, previous)

    seen = []

    def in_thread():
        with HeldInterrupts() as ctrl_c:
            seen.append(signal.getsignal(signal.SIGINT))
            ctrl_c.check()

    thread = threading.Thread(target=in_thread)
    thread.start()
    thread.join()
    assert seen == [signal.default_int_handler]


# ---------------------------------------------------------------- the sessions' pool


def _a_ctrl_c_during_a_network_call_leaves_every_session_free():
    slots = [object(), object()]
    pool = _SlotPool(slots, "ctrl-c-test", 2)

    def call(slot, piece):
        time.sleep(0.01)
        return np.full((len(piece), 3), 1.0, np.float32)

    patches = np.zeros((40, 224, 224, 3), np.uint8)
    threading.Timer(0.05, os.kill, args=(os.getpid(), signal.SIGINT)).start()
    with pytest.raises(KeyboardInterrupt):
        pool.run(patches, 2, call)
    assert pool._free.qsize() == len(slots)
    assert pool.run(patches, 2, call).shape == (40, 3)  # and it still works


def _after_a_second_ctrl_c_each_session_comes_back_when_its_thread_ends():
    slots = [object(), object()]
    pool = _SlotPool(slots, "second-ctrl-c-pool", 2)
    release = threading.Event()

    def call(slot, piece):
        if threading.current_thread() is not threading.main_thread():
            release.wait(60)  # the other session's thread is slow
        return np.full((len(piece), 3), 1.0, np.float32)

    threading.Thread(target=_two_ctrl_c).start()
    with pytest.raises(KeyboardInterrupt):
        pool.run(np.zeros((8, 224, 224, 3), np.uint8), 2, call)
    assert pool._free.qsize() == 1  # the caller's; the other is still in use
    release.set()
    deadline = time.monotonic() + 10
    while pool._free.qsize() < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert pool._free.qsize() == 2
    assert pool.run(np.zeros((8, 224, 224, 3), np.uint8), 2, call).shape == (8, 3)


# scikit-learn's MLP catches a KeyboardInterrupt raised inside its own loop, warns "Training interrupted
# by user." and goes on; `train` must stop instead. The Ctrl-C comes from inside that loop (_backprop).
_TRAIN = """
import os, signal, sys
import numpy as np
from spacer_core import train_utils

rng = np.random.default_rng(0)
x = rng.normal(size=(600, 16)).astype(np.float32)
y = np.arange(600) % 3
data = train_utils.LabelledFeatures(x, y, np.arange(0, 601, 10))
clf = train_utils.make_classifier("MLP", 600)
original = clf._backprop
calls = []

def backprop(*args, **kwargs):
    calls.append(1)
    if len(calls) == 3:
        os.kill(os.getpid(), signal.SIGINT)
    return original(*args, **kwargs)

clf._backprop = backprop
try:
    train_utils.train(clf, data, data, [0, 1, 2], nbr_epochs=50, batch_size=20)
except KeyboardInterrupt:
    print("stopped after", len(calls), "batches")
    sys.exit(0)
print("trained", len(calls), "batches")
sys.exit(1)
"""


def test_a_ctrl_c_inside_the_mlps_own_loop_stops_the_training():
    result = _python(_TRAIN)
    assert "stopped after 3 batches" in result.stdout, result.stdout
    assert "Training interrupted" not in result.stderr


# ---------------------------------------------------------------- each Ctrl-C scenario in a new interpreter

# A Ctrl-C sent to the test process would also reach whatever earlier tests left running in
# it (threads of native libraries among them), so each scenario above runs in its own Python.
SCENARIOS = [
    ("_ctrl_c_lets_items_under_way_finish_then_raises", 1),
    ("_ctrl_c_lets_items_under_way_finish_then_raises", 2),
    ("_a_second_ctrl_c_does_not_wait_for_the_items_under_way", None),
    ("_a_held_ctrl_c_waits_for_check_and_comes_once", None),
    ("_a_second_ctrl_c_raises_at_once", None),
    ("_a_ctrl_c_still_held_at_the_end_is_raised_there_not_lost", None),
    ("_an_error_on_its_way_out_is_not_replaced_by_a_held_ctrl_c", None),
    ("_a_programs_own_handler_and_other_threads_are_left_alone", None),
    ("_a_ctrl_c_during_a_network_call_leaves_every_session_free", None),
    ("_after_a_second_ctrl_c_each_session_comes_back_when_its_thread_ends", None),
]


@pytest.mark.parametrize(
    ("scenario", "arg"), SCENARIOS, ids=[f"{n[1:]}{'' if a is None else a}" for n, a in SCENARIOS]
)
def test_ctrl_c_scenario(scenario, arg):
    call = f"{scenario}()" if arg is None else f"{scenario}({arg!r})"
    _python(f"from tests.spacer_core.test_workers import {scenario}; {call}")
