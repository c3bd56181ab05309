"""Stage 3 of the pipeline: pure slice schedules and checkpoint keys of one shard.

Slice k of a shard trains on slices 0..k (cumulative, as in SISA). The key of checkpoint k is a
digest of (config digest, shard, k, the sorted ids and content digests of every record in slices
0..k): a checkpoint is reusable exactly when its inputs are unchanged.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple


class Member(NamedTuple):
    """A live record as the schedule sees it (placement plus content digest). A tuple, because
    a store holds one per record and builds them on every plan."""

    id: str
    digest: str
    slice: int
    order: str


def derive_seed(seed: int, *parts: int | str) -> int:
    """A 63-bit seed for one purpose, e.g. (seed, shard, slice, epoch): every random draw's origin."""
    text = "/".join(str(p) for p in (seed, *parts))
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "big") >> 1


def by_slice(members: Sequence[Member], slices: int) -> list[list[Member]]:
    """Members of each slice, in training order (by order key, then id)."""
    out: list[list[Member]] = [[] for _ in range(slices)]
    for m in members:
        out[m.slice].append(m)
    for bucket in out:
        bucket.sort(key=lambda m: (m.order, m.id))
    return out


def _digest_line(record_id: str, digest: str) -> bytes:
    # Length-prefixed, so no two different record sets feed the same bytes.
    return f"{len(record_id)}:{record_id}:{digest};".encode()


def record_set_digest(members: Sequence[Member]) -> str:
    h = hashlib.blake2b(digest_size=16)
    for record_id, digest in sorted((m.id, m.digest) for m in members):
        h.update(_digest_line(record_id, digest))
    return h.hexdigest()


def checkpoint_key(config_digest: str, shard: int, slice_: int, set_digest: str) -> str:
    text = f"sisa-checkpoint/v1/{config_digest}/{shard}/{slice_}/{set_digest}"
    return hashlib.blake2b(text.encode(), digest_size=16).hexdigest()


@dataclass(frozen=True)
class ShardSchedule:
    """What every slice checkpoint of one shard is trained on, and its key."""

    shard: int
    slices: list[list[Member]]  # members of slice k, in training order
    set_digests: list[str]  # record-set digest of slices 0..k
    keys: list[str]  # checkpoint key of slice k

    def cumulative_counts(self) -> list[int]:
        counts, total = [], 0
        for bucket in self.slices:
            total += len(bucket)
            counts.append(total)
        return counts


def shard_schedule(
    config_digest: str, shard: int, members: Sequence[Member], slices: int
) -> ShardSchedule:
    buckets = by_slice(members, slices)
    # Each record's line of the digest, sorted once; slice k's digest hashes the lines of slices
    # 0..k in one call (the same bytes record_set_digest would feed, without R sorts).
    lines = sorted(((m.id, m.digest), m.slice) for m in members)
    set_digests, keys = [], []
    for k in range(slices):
        h = hashlib.blake2b(digest_size=16)
        h.update(b"".join(_digest_line(i, d) for (i, d), s in lines if s <= k))
        set_digests.append(h.hexdigest())
        keys.append(checkpoint_key(config_digest, shard, k, set_digests[-1]))
    return ShardSchedule(shard=shard, slices=buckets, set_digests=set_digests, keys=keys)
