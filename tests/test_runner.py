"""cluster.runner on the session's Ray: order, callbacks, timing, bounded submission, errors and cancelling."""

from __future__ import annotations

import itertools
import sys
import time

import pytest
from conftest import ray_shutdowns_recorded
from ray import cloudpickle

from cluster import runner
from cluster.runner import run_tasks
from jobs.config import run_cli
from storage.errors import ArtifactError

pytestmark = pytest.mark.slow
cloudpickle.register_pickle_by_value(sys.modules[__name__])  # Ray's workers cannot import this test module


def nap(i: int, seconds: float) -> int:
    time.sleep(seconds)
    return i


def stamped_nap(i: int, seconds: float) -> tuple[int, float]:
    time.sleep(seconds)
    return i, time.time()


def span(seconds: float) -> tuple[float, float]:
    t0 = time.time()
    time.sleep(seconds)
    return t0, time.time()


def missing(path: str) -> None:
    raise ArtifactError(f"missing artifact {path}")


def fail_or_sleep(i: int) -> int:
    if i == 0:
        time.sleep(0.5)  # the sleepers have started
        raise ArtifactError("task 0 failed")
    time.sleep(600)  # far past any wait below: only a cancel frees its CPU in time
    return i


def test_results_in_submission_order_callbacks_as_finished_and_task_seconds(ray_session):
    seen: list[tuple[int, float]] = []
    jobs = [(0, 2.5), (1, 0.2), (2, 0.0)]
    run = run_tasks(stamped_nap, jobs, options={"num_cpus": 1}, desc="naps", unit="nap", on_result=seen.append)
    assert [i for i, _ in run.results] == [0, 1, 2]
    assert sorted(i for i, _ in seen) == [0, 1, 2]
    # callbacks come as tasks finish: never one that ended clearly after a later callback's
    # (a loaded machine may start a worker late, so which task ends last is not fixed)
    ends = [end for _, end in seen]
    assert all(a <= b + 0.3 for a, b in itertools.pairwise(ends)), seen
    # margins for a loaded machine: a worker may take a second or more to start
    assert run.seconds[0] == pytest.approx(2.5, abs=0.8) and run.seconds[2] < 0.5
    assert run.wall_s >= max(run.seconds)


def test_a_long_single_task_is_never_a_silent_step(ray_session, capsys):
    run_tasks(nap, [(0, 1.5)], desc="k-means", unit="codebook", heartbeat_s=0.3)
    err = capsys.readouterr().err
    assert err.count("1 running") >= 2, err  # the bar was redrawn while the task ran


def test_callback_accumulates_and_advance_sizes_the_bar(ray_session):
    counts = {"items": 0}

    def add(n: int) -> None:
        counts["items"] += n

    run = run_tasks(nap, [(n, 0.0) for n in (3, 4, 5)], total=12, advance=lambda n: n, on_result=add, keep=False)
    assert counts["items"] == 12
    assert run.results == [] and len(run.seconds) == 3
    assert run_tasks(nap, []).results == []


def test_max_in_flight_runs_one_task_at_a_time(ray_session):
    spans = run_tasks(span, [(0.3,)] * 3, options={"num_cpus": 1}, max_in_flight=1).results
    assert all(a[1] <= b[0] for a, b in itertools.pairwise(spans))


def test_an_input_error_in_a_task_propagates_and_is_one_line_exit_2(ray_session, capsys):
    with pytest.raises(ArtifactError, match="missing artifact /x/graph.npy"):
        run_tasks(missing, [("/x/graph.npy",)])
    with ray_shutdowns_recorded() as shutdowns, pytest.raises(SystemExit) as e:  # the session keeps its Ray
        run_cli(lambda: run_tasks(missing, [("/x/graph.npy",)], desc="parts"))
    assert e.value.code == 2 and shutdowns == [1]
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("error:")]
    assert err == ["error: missing artifact /x/graph.npy"]


def test_a_failure_cancels_the_tasks_still_pending(ray_session, monkeypatch):
    cancelled = []
    real = ray_session.cancel
    monkeypatch.setattr(ray_session, "cancel", lambda ref, **kw: (cancelled.append(ref), real(ref, **kw)))
    with pytest.raises(ArtifactError, match="task 0 failed"):
        run_tasks(fail_or_sleep, [(i,) for i in range(4)], options={"num_cpus": 1})
    assert len(cancelled) == 3
    t0 = time.time()  # the sleepers no longer hold the session's 2 CPUs (120 s: a loaded machine starts workers slowly)
    assert ray_session.get(ray_session.remote(num_cpus=2)(nap).remote(7, 0.0), timeout=120) == 7
    assert time.time() - t0 < 120


def test_an_interrupt_in_the_callback_cancels_the_rest_and_propagates(ray_session, monkeypatch):
    cancelled = []
    monkeypatch.setattr(runner, "cancel", lambda refs: cancelled.extend(refs) or runner.ray.get(list(refs)))

    def stop(_):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_tasks(nap, [(0, 0.0), (1, 1.0), (2, 1.0)], on_result=stop, max_in_flight=2)
    assert len(cancelled) == 1  # the one in flight; the third was never submitted
