"""The one way a job runs Ray tasks: submit them, wait as they finish, show progress, time each.

``run_tasks(fn, args, options={"num_cpus": 1}, desc="shards", unit="shard")`` runs ``fn(*a)`` as a Ray
task (``options``: ``ray.remote``'s) for every tuple ``a`` of ``args`` and waits for them as they finish
(``ray.wait``), with a tqdm bar on stderr (none when ``desc`` is None) and, in the style of faiss's
``contrib.exhaustive_search``, a log line per finished task (DEBUG) and one for the whole run (INFO).
Each task times itself (:func:`timed`): its own service seconds, not its wait in Ray's queue.

``on_result`` sees every result as its task finishes (completion order: accumulate counts, write rows
into an array); ``advance`` sizes its step of the bar (``total`` then counts items, not tasks). Results come
back in submission order, or not at all with ``keep=False`` (large results ``on_result`` consumed).
``max_in_flight`` bounds the tasks submitted at once; the rest are submitted as those finish. While no
task finishes the bar is redrawn every ``heartbeat_s`` seconds (elapsed time, tasks running), so a long
single task (k-means over a whole node) is never a silent step.

Exceptions propagate unchanged: a task's error arrives as Ray's ``RayTaskError``, which is also an
instance of the task's own error class (an :class:`storage.errors.InputError` stays one for
:func:`jobs.config.run_cli`: exit 2), and Ray failing is mapped there (:func:`cluster.ray_env.ray_failure`,
exit 1). Before anything propagates (a task's error, Ray's, the callback's, Ctrl-C, SIGTERM), the tasks
still pending are cancelled (``ray.cancel``), so none keeps running on a cluster the job has left.
"""

from __future__ import annotations

import functools
import logging
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable, Generic, Iterable, TypeVar

import ray
from tqdm import tqdm

log = logging.getLogger(__name__)
R = TypeVar("R")


@dataclass
class TaskRun(Generic[R]):
    results: list[R]  # submission order (empty with keep=False)
    seconds: list[float]  # each task's own service seconds, submission order
    wall_s: float  # submission of the first task to the result of the last


def timed(fn: Callable[..., R]) -> Callable[..., tuple[R, float]]:
    """``fn`` returning (its result, the seconds it ran): a task's service time, measured where it runs."""

    @functools.wraps(fn)
    def run(*args: Any) -> tuple[R, float]:
        t0 = time.perf_counter()
        return fn(*args), time.perf_counter() - t0

    return run


def run_tasks(
    fn: Callable[..., R],
    args: Iterable[tuple],
    *,
    options: dict | None = None,
    desc: str | None = None,
    unit: str = "task",
    total: int | None = None,
    advance: Callable[[R], int] | None = None,
    on_result: Callable[[R], Any] | None = None,
    keep: bool = True,
    max_in_flight: int | None = None,
    heartbeat_s: float = 30.0,
) -> TaskRun[R]:
    """Run ``fn(*a)`` for every ``a`` in ``args`` as Ray tasks and wait for all of them (see the module doc)."""
    remote = ray.remote(**options)(timed(fn)) if options else ray.remote(timed(fn))
    args = list(args)
    label, todo = desc or fn.__name__, iter(enumerate(args))
    pending: dict[ray.ObjectRef, int] = {}
    results: dict[int, R] = {}
    seconds = [0.0] * len(args)
    t0 = time.perf_counter()

    def submit(n: int) -> None:
        for _, (i, a) in zip(range(n), todo):
            pending[remote.remote(*a)] = i

    try:
        submit(max_in_flight or len(args))
        with tqdm(
            total=len(args) if total is None else total, desc=desc, unit=unit, file=sys.stderr, disable=desc is None
        ) as bar:
            while pending:
                done, _ = ray.wait(list(pending), num_returns=1, timeout=heartbeat_s)
                if not done:
                    bar.set_postfix_str(f"{len(pending)} running", refresh=False)
                    bar.refresh()
                for ref in done:
                    i = pending.pop(ref)
                    result, seconds[i] = ray.get(ref)
                    if keep:
                        results[i] = result
                    if on_result is not None:
                        on_result(result)
                    bar.update(advance(result) if advance is not None else 1)
                    log.debug(
                        "%s: task %d done in %.3f s (%d/%d, %.1f s)",
                        label,
                        i,
                        seconds[i],
                        len(args) - len(pending),
                        len(args),
                        time.perf_counter() - t0,
                    )
                if max_in_flight:
                    submit(max_in_flight - len(pending))
    except BaseException:
        cancel(pending)
        raise
    run = TaskRun([results[i] for i in sorted(results)], seconds, time.perf_counter() - t0)
    if args:
        log.info(
            "%s: %d task(s) in %.1f s; task seconds mean %.2f, max %.2f",
            label,
            len(args),
            run.wall_s,
            sum(seconds) / len(seconds),
            max(seconds),
        )
    return run


def cancel(refs: Iterable[ray.ObjectRef]) -> None:
    """Cancel tasks still queued or running (finished ones are left as they are). A running one is killed
    (``force``): a task inside a compiled kernel (faiss, torch, a sleep) would see Ray's gentler
    KeyboardInterrupt only once it returns. Tasks commit their outputs atomically; a killed writer's
    temporaries are swept by the next run (:func:`storage.fs.sweep_temporaries`). The error that stopped the
    run is what the job reports, so Ray failing to cancel (it may be what failed) is not raised."""
    for ref in list(refs):
        try:
            ray.cancel(ref, force=True)
        except Exception:  # noqa: BLE001 - see the docstring
            log.debug("could not cancel %s", ref, exc_info=True)
