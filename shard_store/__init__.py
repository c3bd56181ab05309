"""Durable state of a SISA store: records, slice checkpoints, the deletion ledger, live versions."""

from shard_store.checkpoints import CheckpointPayload, read_checkpoint, write_checkpoint
from shard_store.store import CheckpointRow, RecordRow, ShardStore

__all__ = [
    "CheckpointPayload",
    "CheckpointRow",
    "RecordRow",
    "ShardStore",
    "read_checkpoint",
    "write_checkpoint",
]
