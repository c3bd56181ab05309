"""A store read without its models: status, the shards that may serve, and the boundary where the
store's errors become `SisaError`s. Imports no torch, so `sisa status` starts fast."""

from __future__ import annotations

import hashlib
import sqlite3
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import shard_store
from shard_store import CheckpointRow, ShardStore
from sisa.config import StoreConfig
from sisa.custody import open_store
from sisa.errors import (
    CheckpointError,
    IncompleteStoreError,
    StoreCorruptError,
    StoreError,
    StoreExistsError,
    StoreKeyError,
    StoreNotFoundError,
    SymlinkError,
    WitnessError,
)
from sisa.reports import ShardStatus, StatusReport

CONFIG_DIGEST = "config_digest"  # meta key: digest of the config and base model, written at training

_STORE_ERRORS: dict[type[shard_store.StoreError], type[StoreError]] = {
    shard_store.StoreNotFound: StoreNotFoundError,
    shard_store.StoreExists: StoreExistsError,
    shard_store.StoreIncomplete: IncompleteStoreError,
    shard_store.CheckpointFileError: CheckpointError,
    shard_store.SymlinkError: SymlinkError,
    shard_store.StoreCorrupt: StoreCorruptError,
    shard_store.StoreKeyError: StoreKeyError,
    shard_store.WitnessError: WitnessError,
}


@contextmanager
def store_errors(where: str) -> Iterator[None]:
    """Errors of the store (and of SQLite under it) become the matching `SisaError`; `where`
    names the database in the message."""
    try:
        yield
    except shard_store.StoreError as exc:
        raise _STORE_ERRORS.get(type(exc), StoreError)(str(exc)) from exc
    except sqlite3.DatabaseError as exc:  # a damaged page met mid-query, a locked file, ...
        if isinstance(exc, sqlite3.OperationalError) and "locked" in str(exc):
            raise StoreError(f"the store database {where} stayed locked by another process: "
                             f"{exc}") from exc
        raise StoreCorruptError(f"the store database {where} is damaged or unreadable "
                                f"({_printable(str(exc))})") from exc


def _printable(text: str, limit: int = 160) -> str:
    """A message from SQLite may quote a damaged value: keep it short and printable."""
    clean = "".join(c if c.isprintable() else "?" for c in text)
    return clean if len(clean) <= limit else f"{clean[:limit]}..."


def model_version(live: Mapping[int, str]) -> str:
    """Digest of the (shard, weights sha256) pairs that serve: the model's version."""
    text = ";".join(f"{s}:{sha}" for s, sha in sorted(live.items()))
    return hashlib.blake2b(text.encode(), digest_size=16).hexdigest()


def servable(store: ShardStore, journal: bool = True) -> dict[int, CheckpointRow]:
    """Live checkpoints that may serve: non-empty, with no deletion pending, and sealed (their
    registration is as it was written). None while the deletion journal or the witness holds a
    deletion the database lacks (which shards it touches is unknown until a writer applies it
    again); `journal=False` leaves the journal's check to the caller. The files themselves are
    verified when a checkpoint is loaded (`sisa.serving.loader`)."""
    if store.witness_missing() or (journal and store.journal_missing()):
        return {}
    pending = store.pending_shards()
    return {s: row for s, row in store.live().items()
            if s not in pending and row.record_count > 0 and store.sealed(row)}


def checkpoint_problem(store: ShardStore, row: CheckpointRow) -> str | None:
    """Why a registered checkpoint may not be used (its seal, its files, a link), or None."""
    if not store.sealed(row):
        return "its registration does not match its seal (it was altered)"
    try:
        store.verify_files(row)
    except shard_store.CheckpointFileError as exc:
        return str(exc)
    return None


def model_columns(spec: Mapping[str, Any]) -> list[str]:
    """The columns a prediction's input needs, from a stored data spec: the features, or the text
    (and a causal LM's prompt), or a causal LM's conversations."""
    if spec.get("feature_columns"):
        return list(spec["feature_columns"])
    return [c for c in (spec.get("prompt_column"), spec.get("text_column"),
                        spec.get("messages_column")) if c]


def store_status(store: ShardStore, config: Mapping[str, object] | None = None,
                 config_digest: str | None = None) -> StatusReport:
    """Per shard: live checkpoint, weights and sha256, live and deleted records, pending
    deletions. `config` and `config_digest` default to what the store recorded at training."""
    shards = store.shards()
    live = store.live()
    counts = store.record_counts()
    pending = store.pending_deletions()
    pending_shards = store.pending_shards()
    lost = sorted({e["request_id"] for e in [*store.journal_missing(), *store.witness_missing()]})
    if lost:  # which shards they touch is unknown until a writer applies them again
        pending_shards = set(shards)
    damaged = {s: problem for s, row in live.items() if (problem := checkpoint_problem(store, row))}
    spec = store.get_meta("data_spec") or {}
    rows = []
    for s, state in shards.items():
        row = live.get(s)
        c = counts.get(s, {"live": 0, "deleted": 0})
        rows.append(ShardStatus(
            shard=s,
            live_slice=row.slice if row else None,
            checkpoint_key=row.key if row else None,
            weights_path=str(store.root / row.path / "weights.safetensors") if row else None,
            sha256=row.sha256 if row else None,
            live_records=c["live"],
            deleted_records=c["deleted"],
            deletion_pending=s in pending_shards,
            current=state.current,
            problem=damaged.get(s),
        ))
    return StatusReport(
        store=str(store.root),
        config=dict(config if config is not None else store.get_meta("config")),
        config_digest=config_digest or store.get_meta(CONFIG_DIGEST),
        task=store.get_meta("task"),
        live_records=sum(r.live_records for r in rows),
        deleted_records=sum(r.deleted_records for r in rows),
        deletion_requests=store.deletion_count(),
        pending_deletions=[d.request_id for d in pending] + lost,
        clean_shards=sorted(set(shards) - pending_shards - set(damaged)),
        checkpoints=store.checkpoint_count(),
        embeddings_cached=store.embedding_count(),
        shards=rows,
        model_version=model_version({s: r.sha256 for s, r in servable(store).items()
                                     if s not in damaged}),
        key_outside=store.key_outside,
        witnessed=store.witness_log is not None,
        data_spec=dict(spec),
        reads=model_columns(spec),
    )


def quick_status(store_dir: str | Path, config: StoreConfig | None = None) -> StatusReport | None:
    """The status of a store opened read-only, without loading any model (None for a store
    trained before its config digest was recorded: ask `Sisa.status`). Tidies, like any reader.
    `config`: where the store's key and witness are kept."""
    where = repr(str(Path(store_dir) / "store.db"))
    with store_errors(where):
        store = open_store(store_dir, read_only=True, config=config)
        try:
            if store.get_meta(CONFIG_DIGEST) is None:
                return None
            store.tidy()
            return store_status(store)
        finally:
            store.close()
