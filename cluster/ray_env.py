"""Connecting to Ray on purpose, and sizing work to the cluster.

``connect()`` reuses an initialised Ray (tests share one per session); joins a cluster only when
told to — ``ray.address`` in the config or ``RAY_ADDRESS`` (which ``ray job submit`` sets) — and
otherwise starts its own embedded local Ray sized to this machine (``address="local"``: never
the latest ``ray start`` cluster of the machine, never a dead one's leftover address file). It
logs which. :func:`ray_failure` turns Ray dying under a job into one line for the command line.

The embedded Ray is reachable from this machine only (:func:`start_embedded`): every process it starts
binds to 127.0.0.1, and it runs with Ray's token authentication under a fresh random token that lives
in this process's environment alone (inherited by the Ray processes it starts, written nowhere). A
watcher process (:mod:`cluster.reaper`) ends the embedded Ray's processes should the job itself die
without shutting Ray down (SIGKILL, a crash), so no Ray process outlives its job.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import secrets
import signal
import subprocess
import sys
from dataclasses import dataclass

import psutil
import ray
from ray._private import ray_constants

from operators.constraints import Count, NonNegFinite, ObjectStoreMB, PosFinite
from storage.errors import ConfigError, MachineError

log = logging.getLogger(__name__)


@dataclass
class RayConfig:
    address: str | None = None  # a cluster to join (None: RAY_ADDRESS, else an embedded local Ray)
    num_cpus: Count | None = None  # embedded Ray only
    object_store_mb: ObjectStoreMB | None = None  # embedded Ray only
    actor_cpus: PosFinite = 0.5  # fractional CPUs per extraction actor (2-core machines)
    actors: Count | None = None  # extraction actors (None: from cluster resources)
    actor_memory_mb: Count = 2500  # memory reserved per extraction actor (measured ≤ 2 GiB at 1024 px)
    actor_resources: dict[str, PosFinite] | None = None  # custom resources per actor, e.g. {extract: 1} pins
    # one actor per node started with --resources='{"extract":1}'
    actor_gpus: NonNegFinite | None = None  # GPUs per extraction actor (None: 1 when the cluster has GPUs now);
    # set it on an autoscaling cluster whose GPU workers start on demand
    max_actors: Count | None = None  # autoscaling pool: 1 … max_actors actors, Ray adds nodes for them


def connect(cfg: RayConfig | None = None) -> dict:
    """Initialise Ray if needed (see module doc); returns the cluster's resources."""
    cfg = cfg or RayConfig()
    if not ray.is_initialized():
        address = cfg.address or os.environ.get("RAY_ADDRESS")
        kwargs = dict(log_to_driver=True, logging_level=logging.WARNING)
        if address:
            print(f"[ray] joining the Ray cluster at {address}", file=sys.stderr, flush=True)
            with start_failures(f"cannot join the Ray cluster at {address}"):
                ray.init(address=address, **kwargs)
        else:
            start_embedded(cfg, kwargs)
            print(
                f"[ray] started an embedded local Ray ({int(ray.cluster_resources().get('CPU', 0))} CPUs, "
                "127.0.0.1 only, token authentication); set RAY_ADDRESS to join a cluster",
                file=sys.stderr,
                flush=True,
            )
    res = ray.cluster_resources()
    log.info("ray cluster: %s", {k: v for k, v in res.items() if k in ("CPU", "GPU", "memory")})
    return res


def start_embedded(cfg: RayConfig, kwargs: dict) -> None:
    """Start this job's own local Ray, reachable from this machine only, and a watcher that ends it
    with the job (see the module doc). The caller's SIGTERM handler is kept (``ray.init`` replaces it)."""
    loopback_only()
    fresh_token()
    store = cfg.object_store_mb * 2**20 if cfg.object_store_mb else None
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    handler = signal.getsignal(signal.SIGTERM)
    try:
        with start_failures("the embedded Ray could not start"):
            ray.init(
                address="local",
                num_cpus=cfg.num_cpus,
                object_store_memory=store,
                include_dashboard=False,
                _node_ip_address="127.0.0.1",
                **kwargs,
            )
    finally:
        if handler is not None:
            signal.signal(signal.SIGTERM, handler)
    started = [p for p in psutil.Process().children(recursive=True) if p.pid not in before]
    watch(started)


@contextlib.contextmanager
def start_failures(what: str):
    """Ray failing to start or to connect as one line: a setting Ray refuses (``ValueError``, e.g. an object
    store larger than memory) is a :class:`ConfigError`, anything else the machine's (:class:`MachineError`)."""
    try:
        yield
    except ValueError as e:
        raise ConfigError(f"{what}: {_first_line(e)}") from None
    except Exception as e:  # noqa: BLE001 - Ray raises many kinds (RuntimeError, ConnectionError, TimeoutError…)
        raise MachineError(f"{what}: {type(e).__name__}: {_first_line(e)}") from None


def _first_line(e: BaseException) -> str:
    return next((ln.strip() for ln in str(e).splitlines() if ln.strip()), type(e).__name__)[:300]


def loopback_only() -> None:
    """Make the embedded Ray bind to 127.0.0.1: Ray takes the loopback address as its node address (and binds
    its servers, agents and metrics endpoints there) when it runs without cluster support. This process has
    read that switch already (the constant); the Ray processes it starts read it from the environment."""
    os.environ[ray_constants.ENABLE_RAY_CLUSTERS_ENV_VAR] = "0"
    ray_constants.ENABLE_RAY_CLUSTER = False


def fresh_token() -> None:
    """Token authentication with a new random token, known to this process and the Ray processes it starts."""
    from ray._raylet import AuthenticationTokenLoader, Config

    os.environ.pop("RAY_AUTH_TOKEN_PATH", None)
    os.environ.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(32))
    Config.initialize("")  # Ray caches its settings and the token per process: read them again
    AuthenticationTokenLoader.instance().reset_cache()


def watch(processes: list[psutil.Process]) -> None:
    """Start :mod:`cluster.reaper` over ``processes`` (pid and start time each): it ends those still running
    once this process is gone. It runs in its own session, so a Ctrl-C of the job's terminal leaves it be."""
    if not processes:
        return
    pids = [f"{p.pid}:{p.create_time()!r}" for p in processes if p.is_running()]
    subprocess.Popen(
        [sys.executable, "-m", "cluster.reaper", str(os.getpid()), *pids],
        start_new_session=True,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
    )


def largest_node_cpus() -> int:
    """The CPUs of the cluster's largest live node, at least 1 (a task that threads over a whole node)."""
    return max(1, int(max((n["Resources"].get("CPU", 0) for n in ray.nodes() if n.get("Alive")), default=1)))


def task_cpus() -> int:
    """The CPUs Ray assigned to the calling task or actor (1 outside one): its compiled kernels' thread count."""
    import ray

    try:
        return max(1, int(ray.get_runtime_context().get_assigned_resources().get("CPU", 1)))
    except Exception:  # noqa: BLE001 - not in a Ray worker
        return 1


def ray_failure(e: BaseException) -> str | None:
    """One line when ``e`` is Ray (a node, worker, actor, object or the cluster itself) failing
    under the job; None for anything else (a task's own exception keeps its traceback)."""
    from ray import exceptions as rex

    system = (
        rex.RaySystemError,
        rex.NodeDiedError,
        rex.WorkerCrashedError,
        rex.ActorDiedError,
        rex.ObjectLostError,
        rex.OwnerDiedError,
        rex.LocalRayletDiedError,
    )
    if isinstance(e, rex.RayTaskError) and not isinstance(e.cause, system):
        return None
    cause = e.cause if isinstance(e, rex.RayTaskError) else e
    if not isinstance(cause, system):
        return None
    first = next((ln for ln in str(cause).splitlines() if ln.strip()), "")
    return f"the Ray cluster failed under the job ({type(cause).__name__}: {first[:300]})"


@dataclass
class ActorPlan:
    actors: int
    num_cpus: float
    num_gpus: float
    memory_mb: int = 0
    resources: dict[str, float] | None = None
    min_actors: int | None = None  # autoscaling pool when below ``actors``

    @property
    def concurrency(self) -> int | tuple[int, int]:
        """Ray Data's ``concurrency``: a fixed pool, or (min, max) for an autoscaling one."""
        if self.min_actors is not None and self.min_actors < self.actors:
            return (self.min_actors, self.actors)
        return self.actors


# Images an extraction actor should have to describe before another one is worth starting: an actor's start-up
# (importing torch, building the model) costs several CPU-seconds, about what describing tens of images takes.
IMAGES_PER_ACTOR = 32


def fit_to_work(plan: ActorPlan, cfg: RayConfig, shards: int, images: int) -> ActorPlan:
    """``plan`` with no more actors than ``shards``, and, unless the pool was set (``actors``, ``max_actors``,
    ``actor_resources``), no more than one actor per :data:`IMAGES_PER_ACTOR` images: a few queries take one."""
    actors = min(plan.actors, max(1, shards))
    if not (cfg.actors or cfg.max_actors or cfg.actor_resources):
        actors = min(actors, max(1, -(-images // IMAGES_PER_ACTOR)))
    return dataclasses.replace(plan, actors=actors)


def plan_actors(cfg: RayConfig, resources: dict | None = None, prefer_gpu: bool = True) -> ActorPlan:
    """One actor per GPU when the cluster has GPUs; else CPU actors with fractional CPUs.

    CPU actors leave room for Ray Data's read tasks: at most ``CPU / actor_cpus − 1`` actors and
    never more than the CPU count (torch already threads inside each actor).
    With ``max_actors`` the pool autoscales from one actor to ``max_actors`` (the cluster's autoscaler
    starts the nodes they ask for); with ``actor_gpus`` each actor asks for that many GPUs even when
    no GPU node is up yet.
    """
    res = resources if resources is not None else ray.cluster_resources()
    if cfg.actor_resources and not cfg.actors:  # as many actors as the custom resources admit
        cfg = dataclasses.replace(
            cfg, actors=max(1, int(min(res.get(k, 0) / v for k, v in cfg.actor_resources.items())))
        )
    gpus = cfg.actor_gpus if cfg.actor_gpus is not None else (1.0 if prefer_gpu and res.get("GPU") else 0.0)
    if cfg.max_actors:
        plan = ActorPlan(cfg.max_actors, 1.0 if gpus else cfg.actor_cpus, gpus, cfg.actor_memory_mb, min_actors=1)
    else:
        plan = _plan(cfg, res, gpus)
    plan.resources = cfg.actor_resources
    return plan


def _plan(cfg: RayConfig, res: dict, gpus_per_actor: float) -> ActorPlan:
    if gpus_per_actor:  # one actor per gpus_per_actor GPUs present (at least one)
        n = cfg.actors or max(1, int(res.get("GPU", 0) / gpus_per_actor))
        return ActorPlan(n, 1.0, gpus_per_actor, cfg.actor_memory_mb)
    cpus = float(res.get("CPU", 1))
    if cfg.actors:
        return ActorPlan(cfg.actors, cfg.actor_cpus, 0.0, cfg.actor_memory_mb)
    n = max(1, min(int(cpus), int(cpus / cfg.actor_cpus) - 1))
    mem_mb = float(res.get("memory", 0)) / 2**20
    if mem_mb:  # small machines: fewer actors rather than starved ones
        n = max(1, min(n, int(0.8 * mem_mb // cfg.actor_memory_mb)))
    return ActorPlan(n, cfg.actor_cpus, 0.0, cfg.actor_memory_mb)
