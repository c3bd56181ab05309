"""The lowest floor: durable state of a SISA store (records, shards, checkpoints, the deletion
ledger, embeddings) in SQLite and checkpoint directories. Imports nothing from `sisa`."""

from shard_store.errors import (
    CheckpointFileError,
    NotLocked,
    StoreCorrupt,
    StoreError,
    StoreExists,
    StoreIncomplete,
    StoreKeyError,
    StoreNotFound,
    StoreVersionError,
    SymlinkError,
    WitnessError,
)
from shard_store.rows import (
    Acknowledged,
    CheckpointRow,
    Committed,
    DeletionRow,
    NewRecord,
    RecordRow,
    ShardCommit,
    ShardRow,
)
from shard_store.schema import keyed
from shard_store.store import CHECKPOINT_DIR, ShardStore

__all__ = [
    "CHECKPOINT_DIR",
    "Acknowledged",
    "CheckpointFileError",
    "CheckpointRow",
    "Committed",
    "DeletionRow",
    "NewRecord",
    "NotLocked",
    "RecordRow",
    "ShardCommit",
    "ShardRow",
    "ShardStore",
    "StoreCorrupt",
    "StoreError",
    "StoreExists",
    "StoreIncomplete",
    "StoreKeyError",
    "StoreNotFound",
    "StoreVersionError",
    "SymlinkError",
    "WitnessError",
    "keyed",
]
