"""The service's bearer token, read from a file that only its owner may read or from the
environment, and what a starting service says of its settings (`sisa.config.ServiceConfig`),
which never includes the token."""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Any

from sisa.config import ServiceConfig
from sisa.errors import ConfigError
from sisa.handoff import token as env_token


def settings_summary(store_dir: str | Path, config: ServiceConfig, url: str) -> dict[str, Any]:
    """What a starting service says of itself: where it listens and how it runs (never the token)."""
    settings = {k: v for k, v in vars(config).items() if k != "token"}
    return {"url": url, "store": str(store_dir),
            "auth": "none" if config.no_auth else "bearer token", "settings": settings}


def read_token(path: str | Path | None = None) -> str | None:
    """The bearer token: from a file (its first line; a file others may read is refused) or else
    from the environment variable SISA_SERVE_TOKEN; None if neither gives one."""
    if path is None:
        return env_token()
    try:
        info = os.stat(path)
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read the token file {str(path)!r}: {exc}") from None
    if info.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise ConfigError(f"the token file {str(path)!r} has mode {stat.filemode(info.st_mode)}: "
                          f"others may read it; chmod 600 {path}")
    token = text.strip().splitlines()[0].strip() if text.strip() else ""
    if not token:
        raise ConfigError(f"the token file {str(path)!r} is empty")
    return token
