"""The same service on Ray Serve: replicas that each load the store's base model once and the live
shard checkpoints, behind Ray Serve's HTTP proxy, and one deletion worker in the driver.

Every replica answers from the store's servable checkpoints, checked before and after each answer
(see `sisa.service.model`), so a replica that has not yet loaded a retrained shard leaves it out
rather than answer from the one a deletion reached. Any replica acknowledges a deletion (durable in
the store before its `202`); the driver's worker finds it within `poll_interval` and applies it.
The replicas and the driver must see the same store directory (one machine, or a shared file
system that SQLite can lock). The only module of the service that imports `ray`.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import signal
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

from sisa.api import Sisa
from sisa.config import ExecutionConfig, ServiceConfig, StoreConfig
from sisa.execution import local_ray, require_loopback
from sisa.service.app import create_app
from sisa.service.service import Service
from sisa.service.settings import settings_summary
from sisa.service.worker import DeletionWorker

log = logging.getLogger("sisa.service")
APP_NAME = "sisa"
_RAY_POLL = 0.1  # seconds: how soon the driver's worker finds a deletion a replica acknowledged


class SisaReplica:
    """One Ray Serve replica: a `Service` without a worker, and its FastAPI app."""

    def __init__(self, store_dir: str, settings: dict[str, Any], execution: dict[str, Any] | None,
                 store: dict[str, Any] | None = None) -> None:
        _loopback_replica_server()
        self.service = Service(store_dir, ServiceConfig(**settings),
                               ExecutionConfig(**execution) if execution else None, worker=False,
                               store_config=StoreConfig(**store) if store else None).start()

    def __serve_build_asgi_app__(self) -> Any:
        return create_app(self.service)

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.service.close()


def _loopback_replica_server() -> None:
    """Ray Serve (2.60) binds each replica's inter-deployment gRPC server to `[::]`, every
    interface, with no option to change it; it does so after the replica's constructor, which
    calls this. On a Ray whose node address is loopback (sisa's local Ray), bind it to 127.0.0.1,
    as every other Ray server there is. A private name of Ray's: if it moves, nothing is patched
    (and the socket test fails)."""
    import ray

    if not ipaddress.ip_address(ray.util.get_node_ip_address()).is_loopback:
        return
    with contextlib.suppress(ImportError, AttributeError):
        from ray.serve._private import replica

        original = replica.add_port_to_grpc_server
        if getattr(original, "sisa_loopback", False):
            return

        def loopback(server: Any, address: str) -> Any:
            return original(server, address.replace("[::]", "127.0.0.1", 1))

        loopback.sisa_loopback = True  # type: ignore[attr-defined]
        replica.add_port_to_grpc_server = loopback


def deploy(store_dir: str | Path, config: ServiceConfig, execution: ExecutionConfig | None = None,
           store_config: StoreConfig | None = None) -> str:
    """Deploy the service on the running Ray (Serve's proxy on `config.host`:`config.port`, with
    `config.replicas` replicas); returns the URL. Blocks until every replica is up."""
    from ray import serve

    serve.start(http_options={"host": config.host, "port": config.port})
    deployment = serve.deployment(name="SisaReplica", num_replicas=config.replicas,
                                  ray_actor_options={"num_cpus": config.replica_cpus})(
        serve.ingress()(SisaReplica))
    settings = asdict(config)
    serve.run(deployment.bind(str(Path(store_dir).resolve()), settings,
                              asdict(execution) if execution else None,
                              asdict(store_config.resolved()) if store_config else None),
              name=APP_NAME, route_prefix="/")
    return f"http://{config.host}:{config.port}"


@contextlib.contextmanager
def ray_service(store_dir: str | Path, config: ServiceConfig,
                execution: ExecutionConfig | None = None,
                store_config: StoreConfig | None = None) -> Iterator[str]:
    """Run the service on Ray Serve (a local Ray on 127.0.0.1, or the cluster at the execution
    config's `ray_address`), with the deletion worker in this process; yields the URL, and tears
    down what it started."""
    import ray
    from ray import serve

    writer = (Sisa.open(store_dir, execution, store_config=store_config)  # recovers first
              if config.deletions else None)
    worker = (DeletionWorker(writer, config.batch_window, min(config.poll_interval, _RAY_POLL)).start()
              if writer is not None else None)
    try:
        with _ray(ray, execution.ray_address if execution is not None else None):
            url = deploy(store_dir, config, execution, store_config)
            try:
                yield url
            finally:
                serve.shutdown()
    finally:
        if worker is not None:
            worker.stop()
        if writer is not None:
            writer.close()


@contextlib.contextmanager
def _ray(ray: Any, address: str | None) -> Iterator[None]:
    if ray.is_initialized():
        yield
    elif address:
        ray.init(address=address, log_to_driver=False)
        try:
            yield
        finally:
            ray.shutdown()
    else:
        with local_ray():
            require_loopback(ray.util.get_node_ip_address())
            yield


def serve_on_ray(store_dir: str | Path, config: ServiceConfig, execution: ExecutionConfig | None = None,
                 on_start: Callable[[dict[str, Any]], None] | None = None,
                 store_config: StoreConfig | None = None) -> None:
    """`sisa serve --ray`: run until interrupted (SIGINT or SIGTERM), then tear down what it
    started: the deployment, a local Ray, the worker. `on_start`: as for `sisa.service.serve`."""
    def interrupt(_signum: int, _frame: Any) -> None:
        raise KeyboardInterrupt

    with ray_service(store_dir, config, execution, store_config) as url:
        signal.signal(signal.SIGTERM, interrupt)  # after ray.init, which installs its own
        log.info("serving %s on Ray Serve at %s with %d replica(s)", store_dir, url, config.replicas)
        if on_start is not None:
            on_start(settings_summary(store_dir, config, url))
        with contextlib.suppress(KeyboardInterrupt):
            while True:
                time.sleep(3600)
