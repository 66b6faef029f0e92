"""Shared fixtures: one Ray instance per test session, a moto S3 server, small real data."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

if os.environ.get("PYTEST_XDIST_WORKER"):
    # one thread a library in each of the suite's worker processes (set before numpy, torch and faiss load):
    # two workers that each spin two OpenMP threads on two cores run a torch test 2-5x slower than one thread
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(var, "1")

import pandas as pd  # noqa: E402
import pytest

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"
INSTANCE_MINI = DATA / "instance-mini"
REVISITED = DATA / "revisited"

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

# Small, fast describer settings for tests (the defaults are the papers'). (A test's few images take one
# extraction actor: cluster.ray_env.fit_to_work.)
FAST = [
    "--set",
    "describe.global_max_side=256",
    "--set",
    "describe.max_side=512",
    "--set",
    "describe.sift_n=300",
    "--set",
    "shard_size=4",
    "--set",
    "batch_size=4",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_session_ray():
    """This process's own local Ray (``address="local"``: never the machine's latest cluster, which under
    pytest-xdist is another worker's)."""
    import ray

    ray.init(
        address="local",
        num_cpus=2,
        object_store_memory=300 * 2**20,
        include_dashboard=False,
        ignore_reinit_error=True,
        log_to_driver=False,
    )
    return ray


@pytest.fixture(scope="session")
def ray_session():
    ray = _start_session_ray()
    yield ray
    ray.shutdown()


@pytest.fixture(autouse=True)
def _session_ray_up(request):
    """A test on the session's Ray finds it up, even after an earlier test's job shut it down (else Ray's
    implicit init would join whatever cluster the machine started last)."""
    if "ray_session" in request.fixturenames:
        import ray

        if not ray.is_initialized():
            _start_session_ray()
    yield


@contextlib.contextmanager
def ray_shutdowns_recorded():
    """Within it ``ray.shutdown()`` is counted (the yielded list), not carried out: a job failing in-process asks
    for it (``jobs.config._exit``), and restarting the session's Ray for the next job would cost seconds."""
    import ray

    calls, real = [], ray.shutdown
    ray.shutdown = lambda *a, **k: calls.append(1)
    try:
        yield calls
    finally:
        ray.shutdown = real


@pytest.fixture(scope="session")
def instance_mini() -> Path:
    if not (INSTANCE_MINI / "images.csv").exists():
        pytest.fail(f"real test data missing: {INSTANCE_MINI}")
    return INSTANCE_MINI


@pytest.fixture(scope="session")
def mini_subset(instance_mini, tmp_path_factory) -> Path:
    """A 14-image manifest from instance-mini: 3 groups of 4 plus 2 distractors, absolute paths."""
    df = pd.read_csv(instance_mini / "images.csv")
    parts = [df[df.group == g].head(4) for g in ("strecha_herz", "sceaux", "sacre_coeur")]
    parts.append(df[df.group.str.startswith("distr_")].head(2))
    sub = pd.concat(parts)[["file", "group"]]
    sub["file"] = [str(instance_mini / f) for f in sub["file"]]
    path = tmp_path_factory.mktemp("subset") / "subset.csv"
    sub.to_csv(path, index=False)
    return path


# A six-image index small enough to build often: six shards of one image, a 16-word codebook, a 3-NN graph.
SMALL = [*FAST, "--set", "shard_size=1", "--set", "codebook.k=16", "--set", "graph.k=3", "--set", "spectral.rank=3"]


@contextlib.contextmanager
def shared_across_workers(tmp_path_factory, worker_id: str, name: str):
    """A folder ``name`` that every pytest-xdist worker of this run shares (one process: the session's own), held
    under a file lock while the caller builds or reads it: the first worker builds, the others find it built."""
    from filelock import FileLock

    base = tmp_path_factory.getbasetemp()
    base = base.parent if worker_id != "master" else base  # a run's workers have their basetemps side by side
    with FileLock(str(base / f"{name}.lock")):
        yield base / name


@pytest.fixture(scope="session")
def six(mini_subset, tmp_path_factory, worker_id) -> Path:
    """The first six images of the subset (two groups), as a manifest (one file for all workers: the indexes
    built from it are compared byte for byte)."""
    with shared_across_workers(tmp_path_factory, worker_id, "six") as folder:
        path = folder / "six.csv"
        if not path.exists():
            folder.mkdir(parents=True, exist_ok=True)
            pd.read_csv(mini_subset).head(6).to_csv(path, index=False)
    return path


@pytest.fixture(scope="session")
def six_index(ray_session, six, tmp_path_factory, worker_id) -> Path:
    """An uninterrupted SMALL index of ``six`` (every stage), built once per run on a session's Ray (the first
    worker's that asks; the others wait for it): the reference that killed, resumed and multi-node runs must equal,
    and the root that re-ranking faults start from. Read-only: a test that writes into a root works on a copy."""
    from jobs import index as index_job

    with shared_across_workers(tmp_path_factory, worker_id, "six-index") as folder:
        out = folder / "root"
        if not (out / "summary-index.json").exists():
            index_job.main(["--collection", str(six), "--out", str(out), *SMALL])
    return out


@pytest.fixture(scope="session")
def s3_server():
    """A real S3 API: moto_server on 127.0.0.1, with a bucket ``test-bucket``."""
    port = free_port()
    exe = Path(sys.executable).with_name("moto_server")
    proc = subprocess.Popen(
        [str(exe), "-H", "127.0.0.1", "-p", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    endpoint = f"http://127.0.0.1:{port}"
    for _ in range(100):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            break
        except OSError:
            time.sleep(0.1)
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"}
    os.environ.update(env)
    options = {"key": "testing", "secret": "testing", "client_kwargs": {"endpoint_url": endpoint}}
    import s3fs

    s3fs.S3FileSystem(**options).mkdir("test-bucket")
    yield {"endpoint": endpoint, "options": options, "bucket": "test-bucket", "env": env}
    proc.terminate()
    proc.wait(10)


# ------------------------------------------------------------------------------------------
# Test tiers: ``slow`` tests start Ray, a subprocess or moto; ``./scripts/test.sh --quick`` runs the others.
# ------------------------------------------------------------------------------------------
SLOW_FIXTURES = {"ray_session", "s3_server"}  # and every fixture that depends on one (built_index, …)


# The files that take longest, longest first: under pytest-xdist (./scripts/test.sh: --dist loadfile
# --no-loadscope-reorder) a file goes to whichever worker is free, in this order, so the long ones start first and
# the short ones fill in after them, instead of one long file running alone at the end.
LONG_FILES = ("test_pipeline.py", "test_faults.py", "test_cluster.py", "test_security.py", "test_serve.py")


@pytest.hookimpl(tryfirst=True)  # before ``-m`` deselects
def pytest_collection_modifyitems(config, items):
    """Safety net: a test that uses Ray's or moto's session fixture (directly or through another fixture) is slow.
    Then the long files first (:data:`LONG_FILES`), each file's tests in their order."""
    for item in items:
        if SLOW_FIXTURES & set(getattr(item, "fixturenames", ())) and item.get_closest_marker("slow") is None:
            item.add_marker(pytest.mark.slow)
    rank = {name: i for i, name in enumerate(LONG_FILES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(LONG_FILES)))  # stable: the rest keep their order


# The guard: while a test that is not marked slow sets up or runs, starting Ray or a process fails it.
# An audit hook sees every way Python starts a process (subprocess, os.system, posix_spawn, fork, exec),
# wherever it is called from (ray.init, moto_server, a job's CLI); ray.init/get/put/wait are also patched
# (a Ray another test started is joined without starting a process). Cheap system probes that libraries
# run (ldconfig, uname, ...) and the trivial commands of the code-execution tests (touch, true) pass.
CHEAP_COMMANDS = {
    "true",
    "touch",
    "uname",
    "ldconfig",
    "ldconfig.real",
    "gcc",
    "cc",
    "c++",
    "g++",
    "ld",
    "objdump",
    "lscpu",
    "getconf",
    "sysctl",
    "lsb_release",
    "nvidia-smi",
}
SPAWN_EVENTS = {"subprocess.Popen", "os.posix_spawn", "os.spawn", "os.fork", "os.forkpty", "os.exec", "os.system"}
# one state and one audit hook per process, also when this module is imported again as ``tests.conftest``
_GUARD: dict = sys.__dict__.setdefault("_test_tier_guard", {"on": False, "seen": [], "hooked": False})


class StartsRayOrProcess(RuntimeError):
    pass


def _command(event: str, args: tuple) -> str:
    """The program an audit event starts (for the message and the allow-list)."""
    try:
        if event == "os.system":
            return os.fsdecode(args[0])
        if event == "subprocess.Popen":  # (executable, args, cwd, env)
            argv = args[1]
            argv = [argv] if isinstance(argv, (str, bytes, os.PathLike)) else list(argv)
            argv = [os.fsdecode(a) for a in argv]
            return " ".join(
                argv[2:3] if len(argv) > 2 and argv[1] == "-c" and Path(argv[0]).name in ("sh", "bash") else argv
            )
        if event in ("os.posix_spawn", "os.exec"):  # (path, argv, env)
            return " ".join(os.fsdecode(a) for a in args[1])
        if event == "os.spawn":  # (mode, path, args, env)
            return " ".join(os.fsdecode(a) for a in args[2])
    except Exception:  # noqa: BLE001 - an odd argument is still a process
        pass
    return event


def _violation(what: str):
    message = f"this test starts {what}: mark it @pytest.mark.slow (quick tests start no Ray, no subprocess, no moto)"
    _GUARD["seen"].append(message)
    raise StartsRayOrProcess(message)


def _audit(event: str, args: tuple) -> None:
    if not _GUARD["on"] or event not in SPAWN_EVENTS:
        return
    command = _command(event, args)
    words = command.split()
    if event not in ("os.fork", "os.forkpty") and words and Path(words[0]).name in CHEAP_COMMANDS:
        return
    what = "Ray" if "/site-packages/ray/" in command or Path(words[0] if words else "").name == "ray" else "a process"
    _GUARD["on"] = False  # the message is built without re-entering
    try:
        _violation(f"{what} ({event}: {command[:200]})")
    finally:
        _GUARD["on"] = True


if not _GUARD["hooked"]:
    _GUARD["hooked"] = True
    sys.addaudithook(_audit)


@contextlib.contextmanager
def _no_ray_no_process():
    ray = sys.modules.get("ray")
    ray_up = ray is not None and ray.is_initialized()
    patched = {}
    if ray is not None:
        for name in ("init", "get", "put", "wait"):
            real = getattr(ray, name, None)
            if real is not None:

                def refuse(*a, _name=name, **k):
                    _violation(f"Ray (ray.{_name})")

                patched[name] = real
                setattr(ray, name, refuse)
    _GUARD["on"] = True
    try:
        yield
    finally:
        _GUARD["on"] = False
        for name, real in patched.items():
            setattr(ray, name, real)
        ray = sys.modules.get("ray")
        if not ray_up and ray is not None:
            if ray.is_initialized() and not _GUARD["seen"]:
                _GUARD["seen"].append("this test started or joined Ray: mark it @pytest.mark.slow")
            if _GUARD["seen"]:
                with contextlib.suppress(Exception):
                    ray.shutdown()  # what a refused ray.init may have left half-started


def _forget_refused_fixtures(item) -> None:
    """A fixture (moto's, the session's Ray, …) whose setup the guard refused is set up anew for the next test
    that asks for it, instead of failing that test too with this test's cached error."""
    try:
        names = SLOW_FIXTURES | set(item.fixturenames) | set(getattr(item._request, "_fixture_defs", ()))
        for name in names:
            for fixturedef in item.session._fixturemanager.getfixturedefs(name, item) or ():
                cached = getattr(fixturedef, "cached_result", None)
                if cached is not None and cached[2] is not None and isinstance(cached[2][0], StartsRayOrProcess):
                    fixturedef.finish(item._request)  # its finalizers run, its cached error goes
    except Exception:  # noqa: BLE001 - pytest's internals moved: the cached error stays
        pass


def _guarded(item) -> bool:
    return item.get_closest_marker("slow") is None


def _run_guarded(item):
    """Body of the setup and call wrappers: a violation fails the phase even where the test (or a job's
    error handling) caught the exception, and its message replaces whatever error it caused."""
    if not _guarded(item):
        return (yield)
    _GUARD["seen"] = []
    try:
        with _no_ray_no_process():
            result = yield
    except BaseException as e:
        if _GUARD["seen"]:
            _forget_refused_fixtures(item)
            if not isinstance(e, StartsRayOrProcess):
                raise StartsRayOrProcess(_GUARD["seen"][0]) from e
        raise
    if _GUARD["seen"]:
        _forget_refused_fixtures(item)
        raise StartsRayOrProcess(_GUARD["seen"][0])
    return result


@pytest.hookimpl(wrapper=True)
def pytest_runtest_setup(item):
    return (yield from _run_guarded(item))


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item):
    return (yield from _run_guarded(item))
