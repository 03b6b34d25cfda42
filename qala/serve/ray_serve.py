"""The same FastAPI app on Ray Serve: N replicas, each loading the model once, batching with @serve.batch.

    python -m qala.serve --model DIR --ray --replicas 2 [--replica-cpus 1] [--ray-address auto]

`deployment(config)` wraps qala.serve.app.build_app with serve.ingress (a builder function, run on each
replica when it starts: the model loads there, not in the driver) and serve.deployment(num_replicas=N).
Ray's proxy spreads requests over the replicas; inside a replica, RayBatcher's @serve.batch gathers up
to --max-batch requests (or what arrives within --max-wait-ms) into one Service.run call, and load
adaptation sees the requests waiting in that replica. /healthz and /metrics answer for the replica the
proxy picked (its pid is in /healthz); Ray exports its own cluster-wide metrics besides.
"""

from __future__ import annotations

import itertools
import logging
import os
import signal
import time
from typing import Any

from qala.serve.service import Item, Overloaded, ServeConfig, Service

logger = logging.getLogger(__name__)

APP_NAME = "qala"


class RayBatcher:
    """LocalBatcher's contract on Ray Serve's batching: `submit` queues one request for a @serve.batch
    function that runs up to max_batch of them as one Service.run call."""

    def __init__(self, service: Service) -> None:
        from ray import serve

        self.service = service
        self._pending: dict[int, float] = {}  # request id -> arrival, in arrival order
        self._ids = itertools.count()
        config = service.config

        async def batched(requests: list[tuple[int, Item]]) -> list[Any]:
            taken = {key for key, _ in requests}
            behind = [arrival for key, arrival in self._pending.items() if key not in taken]
            return await service.run([item for _, item in requests], behind)

        self._batched = serve.batch(max_batch_size=config.max_batch, batch_wait_timeout_s=config.max_wait_ms / 1000)(
            batched
        )

    def depth(self) -> int:
        return len(self._pending)

    async def start(self) -> None:
        return None

    async def stop(self) -> None:
        self.service.close()

    async def submit(self, item: Item) -> dict[str, Any]:
        ahead = len(self._pending)
        if ahead >= self.service.config.max_queue:
            raise Overloaded(
                f"{self.service.config.max_queue} requests are already waiting (--max-queue)",
                self.service.retry_after_s(ahead),
            )
        # _pending holds the batch in the model too (Ray does not say which): counted as waiting, a little
        # pessimistic, since that batch is partly done.
        self.service.admit(ahead)
        key = next(self._ids)
        self._pending[key] = item.arrival
        try:
            outcome = await self._batched((key, item))
        finally:
            self._pending.pop(key, None)
        if isinstance(outcome, Exception):
            raise outcome
        return outcome


def deployment(config: ServeConfig) -> Any:
    """The Ray Serve application (bound, ready for serve.run): config.replicas replicas of the FastAPI app."""
    from ray import serve

    def build_replica_app() -> Any:  # runs on each replica (serve.ingress calls a builder function there)
        from qala.serve.app import build_app

        service = Service.load(config)
        return build_app(service, RayBatcher(service))

    ingress = serve.ingress(build_replica_app)()
    return serve.deployment(
        ingress,
        name=APP_NAME,
        num_replicas=config.replicas,
        ray_actor_options={"num_cpus": config.replica_cpus},
        # Ray's default (5) would cap a replica's batch at 5: let --max-queue bound it instead.
        max_ongoing_requests=config.max_queue,
    ).bind()


def run_ray(config: ServeConfig, *, ready: Any = None) -> int:
    """Start (or join, with config.ray_address) a Ray instance, deploy, serve until SIGINT/SIGTERM, shut down."""
    import ray
    from ray import serve

    if config.threads is None:  # one replica's torch threads: its CPUs, not the whole host's
        from dataclasses import replace

        config = replace(config, threads=max(1, int(config.replica_cpus)))
    # Ray Serve gives its HTTP proxy 5 s to report ready, three times, then kills it: on a small host busy
    # loading models (2 cores) that fails the start. A local instance inherits these (a user's value wins).
    for name in ("RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S", "RAY_SERVE_PROXY_HEALTH_CHECK_TIMEOUT_S"):
        os.environ.setdefault(name, "30")
    if config.ray_address:
        ray.init(address=config.ray_address, include_dashboard=False, log_to_driver=True)
    else:
        cpus = max(1, int(round(config.replicas * config.replica_cpus)))
        ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=True)
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        serve.start(http_options={"host": config.host, "port": config.port})
        started = time.perf_counter()
        serve.run(deployment(config), name=APP_NAME, route_prefix="/", blocking=False)
        logger.info(
            "serving %s on http://%s:%d with %d Ray Serve replica(s) (ready in %.1f s)",
            config.model,
            config.host,
            config.port,
            config.replicas,
            time.perf_counter() - started,
        )
        if ready is not None:
            ready()
        while True:
            time.sleep(1.0)
    except KeyboardInterrupt:
        logger.info("shutting down")
    finally:
        signal.signal(signal.SIGTERM, previous)
        try:
            serve.shutdown()
        finally:
            ray.shutdown()
    return 0


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt
