"""The typed rows the store reads and writes: records, checkpoints, shards, deletions, commits."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple

from shard_store.errors import StoreCorrupt


class NewRecord(NamedTuple):
    """A placed record to insert."""

    id: str
    group_id: str | None
    digest: str
    shard: int
    slice: int
    order_key: str
    target: str | None
    text: str | None
    features: bytes | memoryview | None  # float64 bytes (a read-only view of them, as written)
    prior: float | None
    input_digest: str | None


@dataclass(frozen=True)
class RecordRow:
    id: str
    group_id: str | None
    digest: str
    shard: int
    slice: int
    order_key: str
    target: str | None  # None once deleted
    deleted_at: str | None
    input_digest: str | None


@dataclass(frozen=True)
class CheckpointRow:
    key: str
    shard: int
    slice: int
    parent: str | None
    path: str  # relative to the store root
    sha256: str  # of the weights file
    files: dict[str, str]  # every file of the directory -> sha256
    record_count: int
    created_at: str
    seal: str | None  # keyed digest of the registration (None: registered before schema 5)


@dataclass(frozen=True)
class ShardRow:
    shard: int
    version: int  # bumped by every change to the shard's records
    live_key: str | None
    live_version: int | None  # the version the live checkpoint was trained on

    @property
    def current(self) -> bool:
        """The live checkpoint is trained on the shard's records as they are now."""
        return self.live_key is not None and self.live_version == self.version


@dataclass(frozen=True)
class DeletionRow:
    request_id: str
    record_ids: list[str]  # keyed digests of the deleted ids (see ShardStore.id_digest)
    shards: list[int]
    before: dict[int, str | None]  # shard -> sha256 of its live weights when acknowledged
    status: str  # "pending" or "applied"
    requested_at: str
    applied_at: str | None
    receipt: dict[str, Any] | None


@dataclass(frozen=True)
class Acknowledged:
    """What one acknowledgement changed."""

    request_id: str
    requested_at: str
    record_ids: list[str]  # tombstoned by this request, in the order given
    record_digests: list[str]  # their keyed digests: all that the store keeps of them
    shards: list[int]
    versions: dict[int, tuple[int, int]]  # shard -> its version before and after


@dataclass(frozen=True)
class ShardCommit:
    """Make `live_key` shard's live checkpoint, if the shard is still at `version`; unregister
    the shard's checkpoints not in `keep`."""

    version: int
    live_key: str
    keep: frozenset[str]


@dataclass(frozen=True)
class Committed:
    shards: set[int]  # shards swapped (the others changed since they were planned)
    applied: list[str]  # deletion requests marked applied
    dropped: int  # checkpoints unregistered
    receipts: dict[str, dict[str, Any]]  # request id -> its receipt, as chained in the ledger


def record_row(row: Mapping[str, Any]) -> RecordRow:
    return RecordRow(**{k: row[k] for k in RecordRow.__dataclass_fields__})


def column_json(text: str, what: str) -> Any:
    """JSON from a column; damage in it is a damaged store, never a traceback."""
    try:
        return json.loads(text)
    except (ValueError, TypeError) as exc:
        raise StoreCorrupt(f"the store database's {what} is damaged: {str(exc)[:120]}") from exc


def checkpoint_row(row: Mapping[str, Any]) -> CheckpointRow:
    values = {k: row[k] for k in CheckpointRow.__dataclass_fields__}
    values["files"] = column_json(values["files"], f"checkpoint {row['key']} files")
    if not isinstance(values["files"], dict):
        raise StoreCorrupt(f"the store database's checkpoint {row['key']} files are damaged")
    return CheckpointRow(**values)


def seal_text(row: CheckpointRow | Mapping[str, Any]) -> str:
    """What a checkpoint's seal covers: its registration, with every file's sha256."""
    get = row.get if isinstance(row, Mapping) else lambda k: getattr(row, k)
    files = get("files")
    files = json.loads(files) if isinstance(files, str) else files
    return json.dumps([get("key"), get("shard"), get("slice"), get("parent"), get("path"),
                       get("sha256"), files, get("record_count")], sort_keys=True,
                      separators=(",", ":"))


def deletion_row(row: Mapping[str, Any]) -> DeletionRow:
    what = f"ledger entry {row['request_id']}"
    try:
        out = DeletionRow(
            request_id=row["request_id"],
            record_ids=column_json(row["record_ids"], what),
            shards=column_json(row["shards"], what),
            before={int(s): sha for s, sha in column_json(row["before"], what).items()},
            status=row["status"],
            requested_at=row["requested_at"],
            applied_at=row["applied_at"],
            receipt=column_json(row["receipt"], what) if row["receipt"] else None,
        )
    except (AttributeError, ValueError, TypeError) as exc:
        raise StoreCorrupt(f"the store database's {what} is damaged: {str(exc)[:120]}") from exc
    if not isinstance(out.record_ids, list) or not isinstance(out.shards, list) or not (
            out.receipt is None or isinstance(out.receipt, dict)):
        raise StoreCorrupt(f"the store database's {what} is damaged")
    return out
