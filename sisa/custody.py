"""Where a store's ledger key and its witness are kept, and opening the store with them.

A key kept outside the store lives in a file only its owner may read (64 hex digits); the store
then holds only a check of it, so whoever can write its database cannot re-seal a checkpoint or
forge a receipt. A witness is a file outside the store that every acknowledgement is written to
before it returns (see `shard_store.store`).
"""

from __future__ import annotations

import os
import secrets
import stat
from pathlib import Path

from shard_store import ShardStore
from sisa.config import StoreConfig
from sisa.errors import ConfigError


def new_key() -> bytes:
    return secrets.token_bytes(32)


def read_key_file(path: str | Path) -> bytes:
    """A key from its file; one that others may read (or write) is refused, naming the fix."""
    try:
        info = os.stat(path)
        text = Path(path).read_text(encoding="ascii").strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read the key file {str(path)!r}: {exc}") from None
    if info.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise ConfigError(f"the key file {str(path)!r} has mode {stat.filemode(info.st_mode)}: "
                          f"others may read it; chmod 600 {path}")
    try:
        key = bytes.fromhex(text)
    except ValueError:
        key = b""
    if len(key) != 32:
        raise ConfigError(f"the key file {str(path)!r} does not hold a key (64 hex digits)")
    return key


def write_key_file(path: str | Path, key: bytes) -> None:
    """Write a key to a new file only its owner may read (fsynced); an existing file is refused."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    except FileExistsError:
        raise ConfigError(f"the key file {str(path)!r} exists already: give a new path") from None
    except OSError as exc:
        raise ConfigError(f"cannot write the key file {str(path)!r}: {exc.strerror}") from None
    with os.fdopen(fd, "w") as f:
        f.write(key.hex() + "\n")
        f.flush()
        os.fsync(f.fileno())


def open_store(root: str | Path, read_only: bool = False,
               config: StoreConfig | None = None) -> ShardStore:
    """The store at `root`, with its key and witness where `config` says (None: where the
    environment says; a config given is taken as it is)."""
    found = config if config is not None else StoreConfig().resolved()
    key = read_key_file(found.key_file) if found.key_file else None
    witness = Path(found.witness) if found.witness else None
    return ShardStore.open(root, read_only=read_only, key=key, witness=witness)
