"""The same service on Ray Serve: replicas that each load the store's base model once and the live
shard checkpoints, behind Ray Serve's HTTP proxy (on the head node), and one deletion worker in
the driver.

Every replica answers from the store's servable checkpoints, checked before and after each answer
(see `sisa.service.model`), so a replica that has not yet loaded a retrained shard leaves it out
rather than answer from the one a deletion reached. Any replica acknowledges a deletion (durable in
the store before its `202`); the driver's worker finds it within `poll_interval` and applies it.
A replica on the driver's node opens the store's directory; one on another node (or any, with
`replica_store="fetch"`) asks a keeper actor on the driver's node (`sisa.service.remote`) for the
servable shards at every look and for checkpoints by digest, so no node needs the directory. The
only module of the service that imports `ray`.
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
from sisa.errors import StoreError
from sisa.execution import local_ray, require_loopback
from sisa.service.app import create_app
from sisa.service.remote import Call, RemoteSisa, StoreKeeper
from sisa.service.service import Service
from sisa.service.settings import settings_summary
from sisa.service.worker import DeletionWorker

log = logging.getLogger("sisa.service")
APP_NAME = "sisa"
_RAY_POLL = 0.1  # seconds: how soon the driver's worker finds a deletion a replica acknowledged
KEEPER = "sisa-store-keeper"  # the keeper actor's name (in the namespace below)
KEEPER_NAMESPACE = "sisa"
_KEEPER_CALLS = 32  # calls the keeper answers at once (one thread each): replicas x request threads
_KEEPER_TIMEOUT = 120.0  # seconds a replica waits for the keeper (a large checkpoint included)


class SisaReplica:
    """One Ray Serve replica: a `Service` without a worker, and its FastAPI app. `keeper_node`:
    the node of the store's keeper (None: there is none); the replica reads through it when
    `replica_store` says fetch, or auto and this replica runs on another node."""

    def __init__(self, store_dir: str, settings: dict[str, Any], execution: dict[str, Any] | None,
                 store: dict[str, Any] | None = None, keeper_node: str | None = None) -> None:
        import ray

        _loopback_replica_server()
        config = ServiceConfig(**settings)
        execution_config = ExecutionConfig(**execution) if execution else None
        here = ray.get_runtime_context().get_node_id()
        self.fetches = keeper_node is not None and (config.replica_store == "fetch"
                                                    or keeper_node != here)
        opened = (RemoteSisa(keeper_calls(ray.get_actor(KEEPER, namespace=KEEPER_NAMESPACE)),
                             execution_config) if self.fetches else None)
        self.service = Service(store_dir, config, execution_config, worker=False,
                               store_config=StoreConfig(**store) if store else None,
                               opened=opened).start()

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


def keeper_calls(keeper: Any) -> Call:
    """The keeper actor's `call`, over Ray (its answers, checkpoint bytes included, through the
    object store); a keeper that does not answer is a StoreError."""
    import ray

    def call(method: str, *args: Any) -> tuple[bool, Any]:
        try:
            answer: tuple[bool, Any] = ray.get(keeper.call.remote(method, *args),
                                               timeout=_KEEPER_TIMEOUT)
        except ray.exceptions.RayError as exc:
            raise StoreError(f"the store's keeper did not answer {method!r}: "
                             f"{str(exc).splitlines()[0][:300]}") from None
        return answer

    return call


def start_keeper(store_dir: str | Path, config: ServiceConfig, execution: ExecutionConfig | None,
                 store_config: StoreConfig | None) -> Any:
    """The store's keeper, an actor on this (the driver's) node, which sees the store; returns
    its handle once it has opened the store."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = ray.get_runtime_context().get_node_id()
    keeper = ray.remote(StoreKeeper).options(
        name=KEEPER, namespace=KEEPER_NAMESPACE, num_cpus=0, max_concurrency=_KEEPER_CALLS,
        scheduling_strategy=NodeAffinitySchedulingStrategy(here, soft=False),
    ).remote(str(Path(store_dir).resolve()), execution,
             store_config.resolved() if store_config else None, config.deletions)
    keeper_calls(keeper)("change_counter")  # up, and the store open
    return keeper


def deploy(store_dir: str | Path, config: ServiceConfig, execution: ExecutionConfig | None = None,
           store_config: StoreConfig | None = None, keeper_node: str | None = None) -> str:
    """Deploy the service on the running Ray (Serve's proxy on the head node at
    `config.host`:`config.port`, with `config.replicas` replicas); returns the URL. Blocks until
    every replica is up. `keeper_node`: where the store's keeper runs, if one does
    (`start_keeper`)."""
    from ray import serve

    # One proxy, on the head: the URL is the driver's, and on one machine simulating several
    # nodes a proxy per node would contend for the one port.
    serve.start(proxy_location="HeadOnly", http_options={"host": config.host, "port": config.port})
    options: dict[str, Any] = {"num_cpus": config.replica_cpus}
    if config.replica_resources:
        options["resources"] = dict(config.replica_resources)
    deployment = serve.deployment(name="SisaReplica", num_replicas=config.replicas,
                                  ray_actor_options=options)(serve.ingress()(SisaReplica))
    settings = asdict(config)
    serve.run(deployment.bind(str(Path(store_dir).resolve()), settings,
                              asdict(execution) if execution else None,
                              asdict(store_config.resolved()) if store_config else None,
                              keeper_node),
              name=APP_NAME, route_prefix="/")
    return f"http://{config.host}:{config.port}"


@contextlib.contextmanager
def ray_service(store_dir: str | Path, config: ServiceConfig,
                execution: ExecutionConfig | None = None,
                store_config: StoreConfig | None = None) -> Iterator[str]:
    """Run the service on Ray Serve (a local Ray on 127.0.0.1, or the cluster at the execution
    config's `ray_address` or the one this process is connected to), with the deletion worker in
    this process; yields the URL, and tears down what it started. A keeper of the store starts on
    this node where replicas may fetch: `replica_store` fetch, or auto on a cluster sisa did not
    start (on its own local Ray every replica runs here, and opens the store)."""
    import ray
    from ray import serve

    writer = (Sisa.open(store_dir, execution, store_config=store_config)  # recovers first
              if config.deletions else None)
    worker = (DeletionWorker(writer, config.batch_window, min(config.poll_interval, _RAY_POLL)).start()
              if writer is not None else None)
    try:
        with _ray(ray, execution.ray_address if execution is not None else None) as local:
            keeper = None
            if config.replica_store == "fetch" or (config.replica_store == "auto" and not local):
                keeper = start_keeper(store_dir, config, execution, store_config)
            try:
                url = deploy(store_dir, config, execution, store_config,
                             ray.get_runtime_context().get_node_id() if keeper is not None else None)
                try:
                    yield url
                finally:
                    serve.shutdown()
            finally:
                if keeper is not None:
                    ray.kill(keeper)
    finally:
        if worker is not None:
            worker.stop()
        if writer is not None:
            writer.close()


@contextlib.contextmanager
def _ray(ray: Any, address: str | None) -> Iterator[bool]:
    """Ray, connected; yields whether it is a local Ray sisa started (one node, this one)."""
    if ray.is_initialized():
        yield False
    elif address:
        ray.init(address=address, log_to_driver=False)
        try:
            yield False
        finally:
            ray.shutdown()
    else:
        with local_ray():
            require_loopback(ray.util.get_node_ip_address())
            yield True


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
