"""The ensemble as a service: predictions, generation and deletions over HTTP (FastAPI, run by
uvicorn, or by Ray Serve with `ray_serve`), never from a shard a deletion has reached.

`Service` is the library side; `create_app` its HTTP face; `serve` runs it until interrupted.
"""

from __future__ import annotations

import logging
from pathlib import Path

from sisa.config import ExecutionConfig
from sisa.service.app import create_app
from sisa.service.model import LiveModel, ModelVersion, adapter_id
from sisa.service.service import Service
from sisa.service.settings import TOKEN_ENV, ServiceConfig, read_token

__all__ = ["TOKEN_ENV", "LiveModel", "ModelVersion", "Service", "ServiceConfig", "adapter_id",
           "create_app", "read_token", "serve"]


def serve(store_dir: str | Path, config: ServiceConfig, execution: ExecutionConfig | None = None,
          log_level: str = "info") -> None:
    """Serve a store over HTTP with uvicorn on `config.host`:`config.port` until interrupted; the
    deletion worker stops with it (a deletion it had not applied stays pending, durable)."""
    import uvicorn

    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    service = Service(store_dir, config, execution).start()
    try:
        uvicorn.run(create_app(service), host=config.host, port=config.port, log_level=log_level,
                    server_header=False, timeout_graceful_shutdown=5)
    finally:
        service.close()
