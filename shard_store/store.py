"""Typed reads and writes over the store's SQLite database (sqlite-utils, WAL mode).

A store is a directory: `store.db` (records, checkpoints, deletion ledger, live versions) and
`checkpoints/` (safetensors + JSON). Multi-row changes run in one transaction.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import sqlite3
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlite_utils import Database

from shard_store import checkpoints as ckpt
from shard_store.schema import SCHEMA_VERSION, current_version, migrate
from sisa.errors import StoreError

DB_NAME = "store.db"
LOCK_NAME = "writer.lock"
CHECKPOINT_DIR = "checkpoints"


def utcnow() -> str:
    return datetime.now(UTC).isoformat(timespec="microseconds")


@dataclass(frozen=True)
class RecordRow:
    id: str
    group_id: str | None
    digest: str
    shard: int
    slice: int
    order_key: str
    payload: dict[str, Any] | None  # None once deleted
    deleted_at: str | None
    input_digest: str | None


@dataclass(frozen=True)
class CheckpointRow:
    key: str
    shard: int
    slice: int
    path: str  # relative to the store root
    sha256: str
    record_count: int
    created_at: str


def _record_row(row: dict[str, Any]) -> RecordRow:
    return RecordRow(
        id=row["id"],
        group_id=row["group_id"],
        digest=row["digest"],
        shard=row["shard"],
        slice=row["slice"],
        order_key=row["order_key"],
        payload=json.loads(row["payload"]) if row["payload"] is not None else None,
        deleted_at=row["deleted_at"],
        input_digest=row.get("input_digest"),
    )


def _checkpoint_row(row: dict[str, Any]) -> CheckpointRow:
    return CheckpointRow(**{k: row[k] for k in CheckpointRow.__dataclass_fields__})


class ShardStore:
    """One SISA store on disk. Create with `ShardStore.create`, reopen with `ShardStore.open`."""

    def __init__(self, root: Path, db: Database) -> None:
        self.root = root
        self.db = db

    # -- lifecycle -----------------------------------------------------------------------------

    @classmethod
    def create(cls, root: str | Path) -> ShardStore:
        root = Path(root)
        if (root / DB_NAME).exists():
            raise StoreError(f"a store already exists at {str(root)!r}; use another --store or delete it")
        root.mkdir(parents=True, exist_ok=True)
        return cls._connect(root)

    @classmethod
    def open(cls, root: str | Path) -> ShardStore:
        root = Path(root)
        if not (root / DB_NAME).is_file():
            raise StoreError(f"no store at {str(root)!r}: create one with `sisa train --store ...`")
        return cls._connect(root)

    @classmethod
    def _connect(cls, root: Path) -> ShardStore:
        try:
            db = Database(root / DB_NAME)
            version = current_version(db)
            if version > SCHEMA_VERSION:
                raise StoreError(
                    f"store {str(root)!r} has schema version {version}, newer than this sisa "
                    f"({SCHEMA_VERSION}); upgrade sisa"
                )
            db.enable_wal()
            db.execute("PRAGMA synchronous = FULL")  # an acknowledged deletion survives power loss
            db.execute("PRAGMA foreign_keys = ON")
            db.execute("PRAGMA cache_size = -65536")  # 64 MiB of pages: shards are read whole
            migrate(db)
        except sqlite3.DatabaseError as exc:
            raise StoreError(f"{str(root / DB_NAME)!r} is not a readable SQLite store: {exc}") from exc
        (root / CHECKPOINT_DIR).mkdir(exist_ok=True)
        return cls(root, db)

    def close(self) -> None:
        self.db.close()

    @contextlib.contextmanager
    def writer(self) -> Iterator[None]:
        """Exclusive lock for work that changes records or checkpoints (train, add, forget,
        recover): two processes must never retrain the same store at once. Blocks until free."""
        with open(self.root / LOCK_NAME, "a+") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    @property
    def checkpoint_root(self) -> Path:
        return self.root / CHECKPOINT_DIR

    # -- meta ------------------------------------------------------------------------------------

    def get_meta(self, key: str) -> Any:
        row = self.db.execute("SELECT value FROM meta WHERE key = ?", [key]).fetchone()
        return json.loads(row[0]) if row else None

    def set_meta(self, key: str, value: Any) -> None:
        self.db.table("meta").upsert({"key": key, "value": json.dumps(value, sort_keys=True)}, pk="key")

    # -- records ---------------------------------------------------------------------------------

    _RECORD_COLUMNS = ("id", "group_id", "digest", "shard", "slice", "order_key", "payload",
                       "features", "input_digest", "added_at")

    def insert_records(self, rows: Sequence[dict[str, Any]]) -> tuple[int, int]:
        """Insert placed records (all or nothing); returns the records version before and after."""
        now = utcnow()
        columns = self._RECORD_COLUMNS
        sql = f"INSERT INTO records ({', '.join(columns)}) VALUES ({', '.join('?' * len(columns))})"
        params = [
            (r["id"], r["group_id"], r["digest"], r["shard"], r["slice"], r["order_key"],
             json.dumps(r["payload"]), r.get("features"), r.get("input_digest"), now)
            for r in rows
        ]
        with self.db.atomic():
            before = self.records_version()
            self.db.conn.executemany(sql, params)
            self.set_meta("records_version", before + 1)
            return before, before + 1

    def records_version(self) -> int:
        """A counter bumped with every change to the records table (by triggers for updates and
        deletes, however they are made; here for inserts): a process that keeps shard data in
        memory trusts it only while this is unchanged."""
        return int(self.get_meta("records_version") or 0)

    def find_records(self, ids: Iterable[str]) -> dict[str, RecordRow]:
        """The stored rows (live or deleted) of the given ids that exist."""
        found: dict[str, RecordRow] = {}
        ids = list(ids)
        for start in range(0, len(ids), 500):
            chunk = ids[start:start + 500]
            marks = ",".join("?" * len(chunk))
            for row in self.db.query(f"SELECT * FROM records WHERE id IN ({marks})", chunk):
                found[row["id"]] = _record_row(row)
        return found

    def group_record_ids(self, group_id: str) -> list[str]:
        return [r["id"] for r in self.db.query(
            "SELECT id FROM records WHERE group_id = ? ORDER BY id", [group_id])]

    def live_records(self, shard: int | None = None) -> Iterator[RecordRow]:
        """Live records in training order: by shard, slice, then order key."""
        where, params = ("AND shard = ?", [shard]) if shard is not None else ("", [])
        sql = (f"SELECT * FROM records WHERE deleted_at IS NULL {where} "
               "ORDER BY shard, slice, order_key")
        for row in self.db.query(sql, params):
            yield _record_row(row)

    def group_shards(self, groups: Sequence[str]) -> dict[str, int]:
        """The shard each of these groups already lives in (groups not in the store are absent)."""
        found: dict[str, int] = {}
        for start in range(0, len(groups), 500):
            chunk = list(groups[start:start + 500])
            marks = ",".join("?" * len(chunk))
            sql = f"SELECT DISTINCT group_id, shard FROM records WHERE group_id IN ({marks})"
            for row in self.db.query(sql, chunk):
                found[row["group_id"]] = row["shard"]
        return found

    def live_training_rows(self, shard: int) -> list[tuple[Any, ...]]:
        """A shard's live records in training order, as plain tuples (this is on the hot path):
        (id, content digest, slice, order key, label, features as float64 bytes or None, payload
        JSON or None). Numeric inputs are in `features`; texts (and the numeric inputs of stores
        written before schema version 3) in the payload's "input"."""
        sql = ("SELECT id, digest, slice, order_key, json_extract(payload, '$.label'), features, "
               "CASE WHEN features IS NULL THEN payload END "
               "FROM records WHERE deleted_at IS NULL AND shard = ? ORDER BY slice, order_key, id")
        return self.db.execute(sql, [shard]).fetchall()

    def record_counts(self) -> dict[int, dict[str, int]]:
        """Per shard: live and deleted record counts."""
        counts: dict[int, dict[str, int]] = {}
        sql = ("SELECT shard, SUM(deleted_at IS NULL) AS live, SUM(deleted_at IS NOT NULL) AS deleted "
               "FROM records GROUP BY shard")
        for row in self.db.query(sql):
            counts[row["shard"]] = {"live": row["live"], "deleted": row["deleted"]}
        return counts

    def deleted_ids(self) -> set[str]:
        return {r["id"] for r in self.db.query("SELECT id FROM records WHERE deleted_at IS NOT NULL")}

    # -- deletion ledger -------------------------------------------------------------------------

    def record_deletion(
        self, request_id: str, record_ids: Sequence[str], shards: Sequence[int]
    ) -> tuple[int, int]:
        """The acknowledgement point: in one transaction, write the ledger entry, tombstone the
        records and purge their content. After this returns, the deletion survives any crash.
        Returns the records version before and after the change."""
        now = utcnow()
        with self.db.atomic():
            before = self.records_version()
            self.db.table("deletions").insert({
                "request_id": request_id,
                "record_ids": json.dumps(list(record_ids)),
                "shards": json.dumps(sorted(set(shards))),
                "status": "pending",
                "requested_at": now,
                "applied_at": None,
                "receipt": None,
            })
            for start in range(0, len(record_ids), 500):
                chunk = list(record_ids[start:start + 500])
                marks = ",".join("?" * len(chunk))
                self.db.execute(
                    f"UPDATE records SET deleted_at = ?, deletion_request = ?, payload = NULL, "
                    f"features = NULL "
                    f"WHERE id IN ({marks}) AND deleted_at IS NULL",
                    [now, request_id, *chunk],
                )
            # Embeddings are derived from the deleted content: purge them too, unless a live
            # record has the very same input.
            self.db.execute(
                "DELETE FROM embeddings WHERE input_digest IN "
                "(SELECT input_digest FROM records WHERE deletion_request = ?) "
                "AND input_digest NOT IN (SELECT input_digest FROM records "
                "WHERE deleted_at IS NULL AND input_digest IS NOT NULL)",
                [request_id],
            )
            return before, self.records_version()

    def pending_deletions(self) -> list[dict[str, Any]]:
        rows = self.db.query(
            "SELECT * FROM deletions WHERE status = 'pending' ORDER BY requested_at, request_id")
        return [{**r, "record_ids": json.loads(r["record_ids"]), "shards": json.loads(r["shards"])}
                for r in rows]

    def pending_shards(self) -> set[int]:
        """Shards whose live model may still hold a deleted record: never serve from them."""
        return {s for d in self.pending_deletions() for s in d["shards"]}

    def deletions(self) -> list[dict[str, Any]]:
        rows = self.db.query("SELECT * FROM deletions ORDER BY requested_at, request_id")
        return [{**r, "record_ids": json.loads(r["record_ids"]), "shards": json.loads(r["shards"]),
                 "receipt": json.loads(r["receipt"]) if r["receipt"] else None} for r in rows]

    # -- embedding cache -------------------------------------------------------------------------

    def get_embeddings(self, model: str, digests: Sequence[str]) -> dict[str, bytes]:
        """Cached vectors (float32 bytes) of these input digests under one encoder fingerprint."""
        found: dict[str, bytes] = {}
        unique = list(dict.fromkeys(digests))
        for start in range(0, len(unique), 500):
            chunk = unique[start:start + 500]
            marks = ",".join("?" * len(chunk))
            sql = (f"SELECT input_digest, vector FROM embeddings "
                   f"WHERE model = ? AND input_digest IN ({marks})")
            for row in self.db.query(sql, [model, *chunk]):
                found[row["input_digest"]] = row["vector"]
        return found

    def put_embeddings(self, model: str, dim: int, vectors: dict[str, bytes]) -> None:
        rows = [{"model": model, "input_digest": d, "dim": dim, "vector": v} for d, v in vectors.items()]
        with self.db.atomic():
            self.db.table("embeddings").insert_all(rows, pk=("model", "input_digest"), replace=True,
                                                   batch_size=500)

    def embedding_count(self, model: str | None = None) -> int:
        where, params = ("WHERE model = ?", [model]) if model else ("", [])
        return int(self.db.execute(f"SELECT COUNT(*) FROM embeddings {where}", params).fetchone()[0])

    def copy_embeddings_from(self, other: str | Path) -> int:
        """Seed this store's embedding cache from another store's (same keys, same vectors)."""
        other_db = Path(other) / DB_NAME
        if not other_db.is_file():
            raise StoreError(f"no store at {str(other)!r} to copy embeddings from")
        before = self.embedding_count()
        self.db.attach("other", other_db)
        try:
            with self.db.atomic():
                self.db.execute("INSERT OR IGNORE INTO embeddings SELECT * FROM other.embeddings")
        finally:
            self.db.execute("DETACH DATABASE other")
        return self.embedding_count() - before

    # -- checkpoints and live versions -----------------------------------------------------------

    def add_checkpoint(self, payload: ckpt.CheckpointPayload, record_count: int) -> CheckpointRow:
        """Write a checkpoint's files atomically, then record them (idempotent by key)."""
        relative, sha = ckpt.write_checkpoint(self.checkpoint_root, payload)
        relative = f"{CHECKPOINT_DIR}/{relative}"  # paths in the database are relative to the root
        row = {"key": payload.key, "shard": payload.shard, "slice": payload.slice, "path": relative,
               "sha256": sha, "record_count": record_count, "created_at": utcnow()}
        self.db.table("checkpoints").upsert(row, pk="key")
        return _checkpoint_row(row)

    def checkpoint(self, key: str) -> CheckpointRow | None:
        rows = list(self.db.query("SELECT * FROM checkpoints WHERE key = ?", [key]))
        return _checkpoint_row(rows[0]) if rows else None

    def checkpoints(self, shard: int | None = None) -> list[CheckpointRow]:
        where, params = ("WHERE shard = ?", [shard]) if shard is not None else ("", [])
        return [_checkpoint_row(r) for r in self.db.query(
            f"SELECT * FROM checkpoints {where} ORDER BY shard, slice, key", params)]

    def read_payload(self, row: CheckpointRow) -> ckpt.CheckpointPayload:
        return ckpt.read_checkpoint(self.root / row.path, row.sha256)

    def live(self) -> dict[int, CheckpointRow]:
        """The live checkpoint of every shard that has one."""
        sql = ("SELECT c.* FROM live l JOIN checkpoints c ON c.key = l.key ORDER BY l.shard")
        return {r["shard"]: _checkpoint_row(r) for r in self.db.query(sql)}

    def swap_live(self, keys: dict[int, str], applied: Sequence[tuple[str, dict[str, Any]]] = ()) -> None:
        """In one transaction: point shards at new live checkpoints and mark deletions applied."""
        now = utcnow()
        with self.db.atomic():
            for shard, key in keys.items():
                self.db.table("live").upsert({"shard": shard, "key": key, "updated_at": now}, pk="shard")
            for request_id, receipt in applied:
                self.db.execute(
                    "UPDATE deletions SET status = 'applied', applied_at = ?, receipt = ? "
                    "WHERE request_id = ?", [now, json.dumps(receipt, sort_keys=True), request_id])

    def drop_checkpoints(self, keys: Iterable[str]) -> int:
        """Forget checkpoints that no longer match the live records (their rows, then files)."""
        rows = [r for r in (self.checkpoint(k) for k in keys) if r is not None]
        if not rows:
            return 0
        live_keys = {r.key for r in self.live().values()}
        doomed = [r for r in rows if r.key not in live_keys]
        with self.db.atomic():
            for r in doomed:
                self.db.execute("DELETE FROM checkpoints WHERE key = ?", [r.key])
        for r in doomed:
            ckpt.remove_checkpoint_dir(self.root, r.path)
        return len(doomed)
