"""Ends an embedded Ray's processes once the job that started them is gone.

``python -m cluster.reaper DRIVER_PID PID:START_TIME …`` (started by :func:`cluster.ray_env.watch`).
A job that ends normally shuts its Ray down itself and this finds nothing left. A job killed with
SIGKILL, or crashed in native code, cannot: Ray's raylet and GCS follow their parent, but its dashboard
and runtime-env agents would stay, orphaned. Each process is named by its pid and start time, so a pid
reused by an unrelated process is never touched.
"""

from __future__ import annotations

import sys

import psutil

GRACE_S = 3.0


def matching(specs: list[str]) -> list[psutil.Process]:
    """The processes of ``PID:START_TIME`` specs that still run as the same process."""
    alive = []
    for spec in specs:
        pid, created = spec.split(":", 1)
        try:
            p = psutil.Process(int(pid))
            if abs(p.create_time() - float(created)) < 1e-3:
                alive.append(p)
        except (psutil.Error, ValueError):
            continue
    return alive


def end(processes: list[psutil.Process]) -> None:
    """SIGTERM, then SIGKILL what is left after :data:`GRACE_S`."""
    for p in processes:
        try:
            p.terminate()
        except psutil.Error:
            pass
    _, alive = psutil.wait_procs(processes, timeout=GRACE_S)
    for p in alive:
        try:
            p.kill()
        except psutil.Error:
            pass


def main(argv: list[str]) -> None:
    driver_pid, specs = int(argv[0]), argv[1:]
    try:
        psutil.Process(driver_pid).wait()
    except psutil.Error:
        pass
    end(matching(specs))


if __name__ == "__main__":
    main(sys.argv[1:])
