"""The service's settings: where it listens, who may delete, what it accepts, and what it does while
a shard retrains. Validated on creation, like every sisa config; the token never prints."""

from __future__ import annotations

import ipaddress
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from sisa.errors import ConfigError

TOKEN_ENV = "SISA_SERVE_TOKEN"  # the bearer token's environment variable
OnPending = Literal["exclude", "wait"]


@dataclass(frozen=True)
class ServiceConfig:
    """How `sisa serve` runs. Deletion and admin endpoints need `token`, unless `no_auth`."""

    host: str = "127.0.0.1"  # loopback: nothing off this machine reaches the service unless told
    port: int = 8000
    token: str | None = field(default=None, repr=False)  # bearer token of the protected endpoints
    no_auth: bool = False  # serve deletion and admin endpoints with no token (explicit opt-out)
    protect_predict: bool = False  # predict/generate/score need the token too
    deletions: bool = True  # serve the deletion endpoints (False: a prediction-only service)
    # While a deletion is acknowledged and its shard not yet retrained: answer without the shard
    # ("exclude", compliance mode) or hold the request until the shard is live ("wait").
    on_pending: OnPending = "exclude"
    wait_timeout: float = 30.0  # seconds a request may wait for a retrained shard (on_pending=wait)
    max_body_bytes: int = 1 << 20  # a larger request body is refused (413)
    max_batch: int = 256  # inputs, prompts or texts in one request
    max_deletion_ids: int = 10_000  # record ids in one deletion request
    max_new_tokens: int = 256  # cap on generation length
    batch_window: float = 0.2  # seconds the worker waits after a deletion for more to batch with it
    poll_interval: float = 1.0  # seconds between looks for deletions other processes acknowledged

    def __post_init__(self) -> None:
        problems = []
        if not 0 <= self.port <= 65535:
            problems.append(f"port must be 0..65535, got {self.port!r}")
        if self.on_pending not in ("exclude", "wait"):
            problems.append(f"on_pending must be 'exclude' or 'wait', got {self.on_pending!r}")
        for name in ("max_body_bytes", "max_batch", "max_deletion_ids", "max_new_tokens"):
            if getattr(self, name) < 1:
                problems.append(f"{name} must be >= 1, got {getattr(self, name)!r}")
        for name in ("wait_timeout", "batch_window", "poll_interval"):
            if not getattr(self, name) >= 0:
                problems.append(f"{name} must be >= 0 seconds, got {getattr(self, name)!r}")
        if self.token is not None and len(self.token) < 16:
            problems.append("the token is shorter than 16 characters: use a long random one "
                            "(python -c 'import secrets; print(secrets.token_urlsafe(32))')")
        if self.token and self.no_auth:
            problems.append("give a token or no_auth, not both")
        if self.protect_predict and not self.token:
            problems.append("protect_predict needs a token")
        if self.deletions and not self.token and not self.no_auth:
            problems.append(f"the deletion and admin endpoints need a bearer token: set {TOKEN_ENV} "
                            "or give a token file; or serve predictions only (no deletions), or "
                            "turn authentication off explicitly (no_auth, on a trusted host only)")
        if problems:
            raise ConfigError("invalid service settings: " + "; ".join(problems))

    @property
    def loopback(self) -> bool:
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return self.host == "localhost"


def read_token(path: str | Path | None = None) -> str | None:
    """The bearer token: from a file (its first line; a file others may read is refused) or else
    from the environment variable SISA_SERVE_TOKEN; None if neither gives one."""
    if path is None:
        value = os.environ.get(TOKEN_ENV, "").strip()
        return value or None
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
