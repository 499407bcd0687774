"""A real `spacer serve` subprocess and what /proc says about it.

Used by the fault tests and `benchmarks/soak.py`, which measure the server's
own threads and memory, so the server must be a process of its own.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent.parent


@dataclass(frozen=True)
class ProcStatus:
    """Resident memory now and at its peak (MiB), thread count and CPU seconds used of one process."""

    rss_mib: float
    peak_rss_mib: float
    threads: int
    cpu_s: float


def proc_status(pid: int) -> ProcStatus:
    """Read VmRSS, VmHWM and Threads from /proc/<pid>/status, user + system time from /proc/<pid>/stat."""
    fields: dict[str, str] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, value = line.partition(":")
        fields[name] = value.strip()
    # The command name (field 2) may hold spaces; count fields after its ')'.
    stat = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    stat = ["pid", "comm", *stat]
    return ProcStatus(
        rss_mib=int(fields["VmRSS"].split()[0]) / 1024,
        peak_rss_mib=int(fields["VmHWM"].split()[0]) / 1024,
        threads=int(fields["Threads"]),
        cpu_s=(int(stat[13]) + int(stat[14])) / os.sysconf("SC_CLK_TCK"),
    )


class ServeProcess:
    """`python -m shell serve --port 0` in `workdir` (also its data root), logging to workdir/serve.log."""

    def __init__(self, workdir: Path, *args: str, env: dict[str, str] | None = None, port: int = 0):
        self.workdir = Path(workdir)
        self.args = args
        self.env = {**os.environ, **(env or {}), "PYTHONPATH": str(ROOT)}
        self.port = port
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 120) -> ServeProcess:
        port_file = self.workdir / "port"
        port_file.unlink(missing_ok=True)
        log = open(self.workdir / "serve.log", "ab")
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "shell",
                "serve",
                "--port",
                str(self.port),
                "--port-file",
                str(port_file),
                "--data-root",
                str(self.workdir),
                *self.args,
            ],
            cwd=self.workdir,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=self.env,
        )
        log.close()
        deadline = time.monotonic() + timeout
        while not (port_file.exists() and port_file.read_text().strip()):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"spacer serve did not start:\n{self.log()[-4000:]}")
            time.sleep(0.05)
        self.port = int(port_file.read_text())
        return self

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def status(self) -> ProcStatus:
        return proc_status(self.pid)

    def log(self) -> str:
        path = self.workdir / "serve.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def stop(self) -> None:
        """SIGTERM, then SIGKILL if it has not exited within 30 s."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)

    def __enter__(self) -> ServeProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
