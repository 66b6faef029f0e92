"""Memory figures for the benchmarks: RSS and the peak since a reset (Linux ``/proc``)."""
from __future__ import annotations

import resource
from pathlib import Path


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
