"""The ensemble as a service: predictions, generation and deletions over HTTP (FastAPI, run by
uvicorn, or by Ray Serve with `ray_serve`), never from a shard a deletion has reached.

`Service` is the library side; `create_app` its HTTP face; `serve` runs it until interrupted.
"""

from __future__ import annotations

import contextlib
import logging
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sisa.config import TOKEN_ENV, ExecutionConfig, ServiceConfig, StoreConfig
from sisa.errors import SisaError
from sisa.service.app import create_app
from sisa.service.model import LiveModel, ModelVersion, adapter_id
from sisa.service.service import Service
from sisa.service.settings import read_token, settings_summary

__all__ = ["TOKEN_ENV", "LiveModel", "ModelVersion", "Service", "ServiceConfig", "adapter_id",
           "create_app", "read_token", "serve", "settings_summary"]

log = logging.getLogger("sisa.service")
OnStart = Callable[[dict[str, Any]], None]


def serve(store_dir: str | Path, config: ServiceConfig, execution: ExecutionConfig | None = None,
          on_start: OnStart | None = None, store_config: StoreConfig | None = None) -> None:
    """Serve a store over HTTP until interrupted: with uvicorn on `config.host`:`config.port`, or
    on Ray Serve with `config.ray`. `on_start` is called with `settings_summary` once the service
    listens. The deletion worker stops with it (a deletion it had not applied stays pending,
    durable). `store_config`: where the store's key and witness are kept."""
    logging.basicConfig(level=config.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if config.ray:
        from sisa.service.ray_serve import serve_on_ray

        serve_on_ray(store_dir, config, execution, on_start, store_config)
        return
    import uvicorn

    service = Service(store_dir, config, execution, store_config=store_config).start()
    try:
        listener = _listen(config.host, config.port)
        host, port = listener.getsockname()[:2]
        url = f"http://{f'[{host}]' if ':' in host else host}:{port}"
        withdraw = _advertise(service, store_dir, config, host, port)
        try:
            if on_start is not None:
                on_start(settings_summary(store_dir, config, url))
            # uvicorn's access log would record query strings: sisa's own logs routes only.
            server = uvicorn.Server(uvicorn.Config(create_app(service), log_level=config.log_level,
                                                   access_log=False, server_header=False,
                                                   timeout_graceful_shutdown=5))
            with contextlib.suppress(KeyboardInterrupt):  # uvicorn re-raises the SIGINT it handled
                server.run(sockets=[listener])
        finally:
            withdraw()
    finally:
        service.close()


def _advertise(service: Service, store_dir: str | Path, config: ServiceConfig, host: str,
               port: int) -> Callable[[], None]:
    """Tell `sisa forget` of this store that this service takes its deletions (`sisa.handoff`),
    at a loopback address: only where the service listens on one (or on every interface)."""
    from sisa.handoff import advertise

    if not config.deletions:
        return lambda: None
    if host in ("0.0.0.0", "::"):
        host = "127.0.0.1" if host == "0.0.0.0" else "::1"
    elif not config.loopback:
        return lambda: None
    try:
        withdraw, service.handoff_secret = advertise(
            store_dir, f"http://{f'[{host}]' if ':' in host else host}:{port}")
        return withdraw
    except (OSError, SisaError) as exc:
        log.warning("not advertised to sisa forget (it will do deletions itself): %s", exc)
        return lambda: None


def _listen(host: str, port: int) -> socket.socket:
    """A listening socket on `host`:`port` (port 0: any free one), bound before uvicorn starts so
    the address it says it listens on is the one it does."""
    family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    listener = socket.socket(family, kind, proto)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        listener.bind(address)
    except OSError:
        listener.close()
        raise
    listener.listen(2048)
    return listener
