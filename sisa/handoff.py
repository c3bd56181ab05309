"""Handing a deletion to the `sisa serve` that holds the store, when one does.

A running service has its store open, its deletion worker started and torch imported: a `sisa
forget` that hands it the request costs a fresh process little more than an HTTP client, where
doing the work itself costs a second or more of imports (torch, above all) and opening the store
before the retrain starts. `sisa serve` advertises itself for its store in a file of this
user's runtime directory (mode 0700, the file 0600, keyed by the store's resolved path), removed
when it stops; `sisa forget` reads it, checks the process is alive, and sends the deletion with
the service's bearer token (from SISA_SERVE_TOKEN), once the service has proved it is the one that
wrote the advertisement: it answers a random challenge with its HMAC under a secret the
advertisement holds (a process that took the port of a service killed outright cannot). Without
an advertisement, a token, a proof or an answer, the command does the work itself, as before. The
ids travel over loopback to the process that serves the store; they are never written down.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import os
import secrets
import stat
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from sisa.config import TOKEN_ENV
from sisa.errors import ConfigError, SisaError

RUNTIME_ENV = "SISA_RUNTIME_DIR"  # where services advertise themselves (default: see runtime_dir)
CHALLENGE = "X-Sisa-Challenge"  # GET /healthz with it: the service answers PROOF
PROOF = "X-Sisa-Proof"
MAX_WAIT = 60.0  # seconds: the longest `GET /v1/deletions/{id}?wait=` a service holds a request
_POLL = (0.02, 0.5)  # seconds between looks at a handed-off deletion's state: first, at most


def proof(secret: str, challenge: str) -> str:
    """The service's answer to a challenge: HMAC-SHA256 under its advertisement's secret."""
    return hmac.new(secret.encode(), challenge.encode(), hashlib.sha256).hexdigest()


def runtime_dir() -> Path:
    """This user's directory of advertisements: SISA_RUNTIME_DIR, else XDG_RUNTIME_DIR/sisa, else
    the temporary directory's sisa-<uid>."""
    given = os.environ.get(RUNTIME_ENV)
    if given:
        return Path(given)
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    return Path(xdg) / "sisa" if xdg else Path(tempfile.gettempdir()) / f"sisa-{os.getuid()}"


def advert_path(store_dir: str | Path) -> Path:
    key = hashlib.sha256(str(Path(store_dir).resolve()).encode()).hexdigest()[:32]
    return runtime_dir() / f"serve-{key}.json"


def advertise(store_dir: str | Path, url: str) -> tuple[Callable[[], None], str]:
    """Say that this process serves `store_dir` at `url` (a loopback URL); returns the function
    that withdraws it (it removes the file only while it is still this process's) and the secret
    the service proves itself with (`proof`)."""
    path = advert_path(store_dir)
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    _private(path.parent)
    secret = secrets.token_hex(32)
    text = json.dumps({"url": url, "pid": os.getpid(), "store": str(Path(store_dir).resolve()),
                       "secret": secret})
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".serve-", suffix=".json")
    with os.fdopen(fd, "w", encoding="utf-8") as out:  # mkstemp: mode 0600
        out.write(text)
    os.replace(tmp, path)

    def withdraw() -> None:
        with contextlib.suppress(OSError, ValueError):
            if json.loads(path.read_text(encoding="utf-8")).get("pid") == os.getpid():
                path.unlink()

    return withdraw, secret


def running_service(store_dir: str | Path) -> tuple[str, str] | None:
    """The URL and secret of the live `sisa serve` of `store_dir` that advertised itself, if
    any. An advertisement in a directory or file that others may write, or not this user's, is
    ignored (it could send the ids elsewhere)."""
    path = advert_path(store_dir)
    try:
        _private(path.parent)
        info = path.lstat()
        if not stat.S_ISREG(info.st_mode) or info.st_uid != os.getuid() or info.st_mode & 0o077:
            return None
        found = json.loads(path.read_text(encoding="utf-8"))
        pid, url, secret = int(found["pid"]), str(found["url"]), str(found["secret"])
    except (OSError, ValueError, KeyError, TypeError, ConfigError):
        return None
    if found.get("store") != str(Path(store_dir).resolve()) or not _alive(pid):
        return None
    if not url.startswith(("http://127.", "http://[::1]", "http://localhost")):
        return None
    return url, secret


def token() -> str | None:
    """The service's bearer token from SISA_SERVE_TOKEN, if set (a light read: `sisa forget`
    needs it before anything heavy is imported; `sisa.service.settings.read_token` uses it too)."""
    return os.environ.get(TOKEN_ENV, "").strip() or None


def forget_through(service: tuple[str, str], bearer: str, ids: Sequence[str] | None,
                   group: str | None, timeout: float = 3600.0) -> dict[str, Any] | None:
    """Hand a deletion to the service (`running_service`'s URL and secret) and wait until it is
    applied: its state as `GET /v1/deletions/{id}` gives it (with the receipt), or None where the
    service cannot take it (gone, not the one advertised, refusing the token, nothing to delete,
    an id it does not hold): the caller then does the work itself, with its own errors."""
    import httpx

    url, secret = service
    auth = {"Authorization": f"Bearer {bearer}"}
    body: dict[str, Any] = {"group": group} if group is not None else {"ids": list(ids or [])}
    try:
        with httpx.Client(base_url=url, timeout=60, trust_env=False) as client:
            challenge = secrets.token_hex(16)
            answer = client.get("/healthz", headers={CHALLENGE: challenge}).headers.get(PROOF, "")
            if not hmac.compare_digest(answer, proof(secret, challenge)):
                return None  # not the service that advertised itself: no token, no ids
            ack = client.post("/v1/deletions", json=body, headers=auth)
            if ack.status_code != 202:  # 200: nothing new to delete; 404, 401, 5xx: not here
                return None
            where = f"/v1/deletions/{ack.json()['request_id']}"
            deadline, pause = time.monotonic() + timeout, _POLL[0]
            while time.monotonic() < deadline:
                # A long poll: the service answers as soon as the deletion is applied.
                wait = max(0.0, min(MAX_WAIT / 2, deadline - time.monotonic()))
                asked = time.monotonic()
                state = client.get(where, headers=auth, params={"wait": f"{wait:.3f}"},
                                   timeout=wait + 60)
                found: dict[str, Any] = state.json() if state.status_code == 200 else {}
                if found.get("status") == "applied":
                    return {**found, "acknowledged": ack.json()}
                if state.status_code != 200 or found.get("status") == "failed":
                    why = found.get("error") or f"{state.status_code}: {_message(state)}"
                    raise SisaError(f"the service at {url} acknowledged the deletion "
                                    f"{ack.json()['request_id']} (it is durable, its shards "
                                    f"excluded, and it will be retried) but applying it failed: {why}")
                if time.monotonic() - asked < wait / 2:  # the service did not hold it: poll
                    time.sleep(pause)
                    pause = min(_POLL[1], pause * 1.5)
    except httpx.TransportError:
        return None
    raise SisaError(f"the service at {url} acknowledged the deletion (it is durable and will be "
                    f"applied) but had not applied it within {timeout:.0f} s")


def _message(response: Any) -> str:
    try:
        return str(response.json()["error"]["message"])
    except (ValueError, KeyError, TypeError):
        return response.text[:300]


def _private(directory: Path) -> None:
    info = directory.lstat()
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid() or info.st_mode & 0o077:
        raise ConfigError(f"{str(directory)!r} is not a private directory of this user's: "
                          "sisa serve cannot advertise itself there")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
