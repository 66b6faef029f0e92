"""The warm query service on Ray Serve (``jobs.serve``): one application, :data:`APP`, whose deployment
:class:`IndexDeployment` runs ``replicas`` replica actors, each holding a :class:`jobs.serve.QueryEngine`
(the describer loaded once, the index memory-mapped). Ray Serve's HTTP proxy binds ``cfg.host`` (127.0.0.1
unless told otherwise) and routes every path to the deployment, which answers ``POST /search``
(:func:`storage.search_requests.respond`); Ray Serve replaces a replica that dies.

Imported by ``jobs.serve`` when it serves (Ray Serve loads starlette and uvicorn), never for ``--help``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
from concurrent.futures import ThreadPoolExecutor

from ray import serve
from starlette.requests import Request
from starlette.responses import JSONResponse

from jobs.serve import QueryEngine, ServeConfig
from storage.search_requests import respond
from storage.validation import from_dict

APP = "retrieval"
QUIET = {"log_level": "WARNING", "enable_access_log": False}  # no line per request on the job's stderr


@serve.deployment
class IndexDeployment:
    """A replica: the engine, and one worker thread that answers its requests one at a time (the describer uses
    the replica's CPUs; concurrent batches would only share them)."""

    def __init__(self, cfg: dict, torch_threads: int):
        loopback_grpc()
        self.cfg = from_dict(ServeConfig, cfg)
        self.engine = QueryEngine(self.cfg, torch_threads)
        self.worker = ThreadPoolExecutor(1)

    async def __call__(self, request: Request) -> JSONResponse:
        body = await request.body()
        loop = asyncio.get_running_loop()
        status, payload = await loop.run_in_executor(
            self.worker,
            respond,
            self.engine,
            request.method,
            request.url.path,
            body,
            self.cfg.max_queries,
            self.cfg.max_body_kb * 1024,
        )
        return JSONResponse(payload, status_code=status)

    def pid(self) -> int:
        """The replica's process id (a fault test kills it)."""
        return os.getpid()


def loopback_grpc() -> None:
    """Ray Serve binds each replica's inter-deployment gRPC server to every interface (``[::]:0``, Ray 2.60). On a
    node whose Ray runs on 127.0.0.1 (the embedded default, :func:`cluster.ray_env.loopback_only`) it is bound to
    127.0.0.1 instead (the address the proxy dials there), so the service exposes nothing to the network.
    Called in the replica before Ray Serve starts that server (it does once the deployment's ``__init__`` returns)."""
    import ray
    from ray.serve._private import replica

    real = getattr(replica, "add_port_to_grpc_server", None)
    if real is None or getattr(real, "loopback", False) or ray.util.get_node_ip_address() != "127.0.0.1":
        return

    def bind(server, address: str):
        return real(server, address.replace("[::]", "127.0.0.1", 1))

    bind.loopback = True
    replica.add_port_to_grpc_server = bind


def start(cfg: ServeConfig) -> str:
    """Start Ray Serve on the connected Ray (HTTP on ``cfg.host:cfg.port``) and deploy the index; returns once
    every replica is up, with the search URL."""
    logging.getLogger("ray.serve").setLevel(logging.WARNING)  # not its start-up chatter on the job's stderr
    serve.start(http_options={"host": cfg.host, "port": cfg.port}, logging_config=QUIET)
    app = IndexDeployment.options(
        num_replicas=cfg.replicas,
        max_ongoing_requests=cfg.max_ongoing_requests,
        ray_actor_options={"num_cpus": cfg.replica_cpus},
        logging_config=QUIET,
    ).bind(dataclasses.asdict(cfg), max(1, round(cfg.replica_cpus)))
    serve.run(app, name=APP, route_prefix="/", logging_config=QUIET)
    return f"http://{cfg.host}:{cfg.port}/search"


def replica_pids() -> list[int]:
    """The process id a replica answers with (one call: whichever replica the handle picks)."""
    return [serve.get_app_handle(APP).pid.remote().result()]


def stop() -> None:
    """Shut Ray Serve down (its proxy, controller and replicas)."""
    serve.shutdown()
