"""What several benchmarks share: the machine they ran on, and concurrent ClassifyImages streams.

Benchmarks run as `python benchmarks/bench_x.py`, so this folder is first on
the import path and `from _common import ...` finds this module.
"""

from __future__ import annotations

import platform
import threading
import time

from server.client import SpacerClient


def cpu_name() -> str:
    """The CPU's model name (from /proc/cpuinfo where there is one)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def run_streams(address: str, per_stream: list[list]) -> tuple[int, float]:
    """One ClassifyImages stream per request list, all at once; (points classified, seconds).

    Any error item fails the run (after every stream has ended, so none is left running).
    """
    counts = [0] * len(per_stream)
    errors: list[str] = []

    def one(i: int) -> None:
        try:
            with SpacerClient(address, timeout=3600) as client:
                for response in client.classify_images(per_stream[i]):
                    if response.WhichOneof("outcome") != "result":
                        errors.append(f"{response.job_token}: {response.error.message}")
                    else:
                        counts[i] += len(response.result.scores)
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(f"stream {i}: {exc}")

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(per_stream))]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    seconds = time.perf_counter() - start
    if errors:
        raise RuntimeError(f"{len(errors)} failed: {errors[:3]}")
    return sum(counts), seconds
