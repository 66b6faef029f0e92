"""Memory figures for the benchmarks: RSS and the peak since a reset (Linux ``/proc``)."""

from __future__ import annotations

import os
import resource
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil


def rss_mb(field: str = "VmRSS") -> float:
    """A ``/proc/self/status`` size in MB (``VmRSS`` now, ``VmHWM`` the peak); ru_maxrss elsewhere."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def reset_peak() -> float:
    """Reset the peak RSS to the current RSS (``/proc/self/clear_refs``: 5), so earlier temporaries (the
    data generation's) do not hide what the measured work adds; returns the current RSS (MB)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass
    return rss_mb()


def tree_rss_mb(pid: int) -> float:
    """RSS of a process and all its descendants (Ray workers included), MB."""
    try:
        proc = psutil.Process(pid)
        return sum(p.memory_info().rss for p in [proc, *proc.children(recursive=True)]) / 2**20
    except psutil.Error:
        return 0.0


def run_job(args: list[str], period: float = 0.2, log: str | None = None) -> tuple[float, float]:
    """Run ``python ARGS`` from the repository root on an embedded local Ray; returns (wall s, peak RSS MB of
    its process tree, sampled every ``period`` s). Exits with the job's status if it fails. ``log``: a file
    that takes the job's stdout and stderr (else they are dropped)."""
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled"}
    t0 = time.time()
    out = open(log, "w") if log else subprocess.DEVNULL
    proc = subprocess.Popen(
        [sys.executable, *args],
        cwd=Path(__file__).resolve().parents[1],
        env=env,
        stdout=out,
        stderr=subprocess.STDOUT if log else subprocess.DEVNULL,
    )
    peak = [0.0]

    def sample() -> None:
        while proc.poll() is None:
            peak[0] = max(peak[0], tree_rss_mb(proc.pid))
            time.sleep(period)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    proc.wait()
    thread.join()
    if log:
        out.close()
    if proc.returncode:
        raise SystemExit(f"{' '.join(args[:2])} failed (exit {proc.returncode})" + (f"; see {log}" if log else ""))
    return time.time() - t0, peak[0]
