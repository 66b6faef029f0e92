"""Connecting to Ray on purpose, and sizing work to the cluster.

``connect()`` reuses an initialised Ray (tests share one per session); joins a cluster only when
told to — ``ray.address`` in the config or ``RAY_ADDRESS`` (which ``ray job submit`` sets) — and
otherwise starts its own embedded local Ray sized to this machine (``address="local"``: never
the latest ``ray start`` cluster of the machine, never a dead one's leftover address file). It
logs which. :func:`ray_failure` turns Ray dying under a job into one line for the command line.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import sys
from dataclasses import dataclass

import ray

log = logging.getLogger(__name__)


@dataclass
class RayConfig:
    address: str | None = None          # a cluster to join (None: RAY_ADDRESS, else an embedded local Ray)
    num_cpus: int | None = None         # embedded Ray only
    object_store_mb: int | None = None  # embedded Ray only
    actor_cpus: float = 0.5             # fractional CPUs per extraction actor (2-core machines)
    actors: int | None = None           # extraction actors (None: from cluster resources)
    actor_memory_mb: int = 2500         # memory reserved per extraction actor (measured ≤ 2 GiB at 1024 px)
    actor_resources: dict[str, float] | None = None  # custom resources per actor, e.g. {extract: 1} pins
                                                     # one actor per node started with --resources='{"extract":1}'
    actor_gpus: float | None = None     # GPUs per extraction actor (None: 1 when the cluster has GPUs now);
                                        # set it on an autoscaling cluster whose GPU workers start on demand
    max_actors: int | None = None       # autoscaling pool: 1 … max_actors actors, Ray adds nodes for them


def connect(cfg: RayConfig | None = None) -> dict:
    """Initialise Ray if needed (see module doc); returns the cluster's resources."""
    cfg = cfg or RayConfig()
    if not ray.is_initialized():
        address = cfg.address or os.environ.get("RAY_ADDRESS")
        kwargs = dict(log_to_driver=True, logging_level=logging.WARNING)
        if address:
            print(f"[ray] joining the Ray cluster at {address}", file=sys.stderr, flush=True)
            ray.init(address=address, **kwargs)
        else:
            os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # this process's own local instance only
            store = cfg.object_store_mb * 2**20 if cfg.object_store_mb else None
            ray.init(address="local", num_cpus=cfg.num_cpus, object_store_memory=store, include_dashboard=False, **kwargs)
            print(f"[ray] started an embedded local Ray ({int(ray.cluster_resources().get('CPU', 0))} CPUs); "
                  "set RAY_ADDRESS to join a cluster", file=sys.stderr, flush=True)
    res = ray.cluster_resources()
    log.info("ray cluster: %s", {k: v for k, v in res.items() if k in ("CPU", "GPU", "memory")})
    return res


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

    system = (rex.RaySystemError, rex.NodeDiedError, rex.WorkerCrashedError, rex.ActorDiedError, rex.ObjectLostError,
              rex.OwnerDiedError, rex.LocalRayletDiedError)
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
    min_actors: int | None = None       # autoscaling pool when below ``actors``

    @property
    def concurrency(self) -> int | tuple[int, int]:
        """Ray Data's ``concurrency``: a fixed pool, or (min, max) for an autoscaling one."""
        if self.min_actors is not None and self.min_actors < self.actors:
            return (self.min_actors, self.actors)
        return self.actors


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
        cfg = dataclasses.replace(cfg, actors=max(1, int(min(res.get(k, 0) / v for k, v in cfg.actor_resources.items()))))
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
