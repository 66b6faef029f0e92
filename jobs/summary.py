"""Job summaries: counts, per-stage timings and peak memory, printed and stored as JSON."""

from __future__ import annotations

import contextlib
import logging
import resource
import sys
import time
from dataclasses import dataclass, field

from jobs.config import report_stream
from storage.fs import dumps
from storage.summaries import write_summary


def peak_rss_mb() -> float:
    """Peak resident memory of this process (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def show_progress_logs() -> None:
    """Send this project's INFO logs (eigen-solver iterations, k-means, cluster) to stderr, once per process."""
    for name in ("operators", "jobs", "cluster"):
        logger = logging.getLogger(name)
        if not logger.handlers:
            handler = logging.StreamHandler(sys.stderr)
            handler.setFormatter(logging.Formatter("[%(name)s] %(message)s"))
            logger.addHandler(handler)
            logger.setLevel(logging.INFO)


@dataclass
class JobSummary:
    job: str
    counts: dict = field(default_factory=dict)
    timings: dict = field(default_factory=dict)
    info: dict = field(default_factory=dict)
    worker_peak_rss_mb: float = 0.0
    started: float = field(default_factory=time.time)

    def __post_init__(self) -> None:
        show_progress_logs()

    @contextlib.contextmanager
    def stage(self, name: str):
        """Time the ``with`` body as stage ``name``; "done" is said only when it ends without an exception."""
        t0 = time.time()
        print(f"[{self.job}] {name} …", file=sys.stderr, flush=True)
        yield
        self.timings[name] = round(time.time() - t0, 3)
        print(f"[{self.job}] {name} done in {self.timings[name]:.1f} s", file=sys.stderr, flush=True)

    def add(self, **counts) -> None:
        for k, v in counts.items():
            self.counts[k] = self.counts.get(k, 0) + v

    def worker_peak(self, mb: float) -> None:
        self.worker_peak_rss_mb = max(self.worker_peak_rss_mb, float(mb))

    def as_dict(self) -> dict:
        return {
            "job": self.job,
            "counts": self.counts,
            "timings_s": self.timings,
            "total_s": round(time.time() - self.started, 3),
            "driver_peak_rss_mb": round(peak_rss_mb(), 1),
            "worker_peak_rss_mb": round(self.worker_peak_rss_mb, 1),
            **self.info,
        }

    def finish(self, folder: str | None = None, options: dict | None = None) -> dict:
        """Print the summary and store it as ``folder/summary-<job>.json`` (:mod:`storage.summaries`)."""
        d = self.as_dict()
        if folder:
            write_summary(folder, self.job, d, options)
        print(dumps(d, indent=2), file=report_stream(), flush=True)
        return d
