"""Stage 3 of the pipeline: pure slice schedules and checkpoint keys of one shard.

Slice k of a shard trains on slices 0..k (cumulative, as in SISA). The key of checkpoint k is a
digest of (config digest, shard, k, the ids and content digests of every record in slices 0..k, in
training order): a checkpoint is reusable exactly when its inputs are unchanged. Training order is a
function of the records alone (slice, order key, id), so each key is a prefix digest: one pass over
the shard yields every slice's key.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

KEY_VERSION = "sisa-checkpoint/v2"  # v2: set digests in training order (v1 sorted by id)


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


def training_order(m: Member) -> tuple[int, str, str]:
    """Slice, then order key, then id: the order a shard trains its records in."""
    return m.slice, m.order, m.id


def digest_line(member: Member) -> bytes:
    # Length-prefixed, so no two different record sets feed the same bytes.
    return f"{len(member.id)}:{member.id}:{member.digest};".encode()


def record_set_digest(members: Sequence[Member]) -> str:
    """Digest of a record set: its members' lines, in training order."""
    h = hashlib.blake2b(digest_size=16)
    h.update(b"".join(digest_line(m) for m in sorted(members, key=training_order)))
    return h.hexdigest()


def checkpoint_key(config_digest: str, shard: int, slice_: int, set_digest: str) -> str:
    text = f"{KEY_VERSION}/{config_digest}/{shard}/{slice_}/{set_digest}"
    return hashlib.blake2b(text.encode(), digest_size=16).hexdigest()


@dataclass(frozen=True)
class ShardSchedule:
    """What every slice checkpoint of one shard is trained on, and its key."""

    shard: int
    members: list[Member]  # every live record, in training order
    sizes: list[int]  # records in slice k
    set_digests: list[str]  # record-set digest of slices 0..k
    keys: list[str]  # checkpoint key of slice k

    def cumulative_counts(self) -> list[int]:
        counts, total = [], 0
        for n in self.sizes:
            total += n
            counts.append(total)
        return counts

    @property
    def slices(self) -> list[list[Member]]:
        """Members of each slice, in training order."""
        out, start = [], 0
        for n in self.sizes:
            out.append(self.members[start:start + n])
            start += n
        return out


def shard_schedule(
    config_digest: str,
    shard: int,
    members: Sequence[Member],
    slices: int,
    lines: Sequence[bytes] | None = None,
) -> ShardSchedule:
    """The schedule of one shard's members. With `lines` (each member's digest line, as shard
    data keeps them) the members must already be in training order; without, they are sorted."""
    if lines is None:
        ordered = sorted(members, key=training_order)
        lines = [digest_line(m) for m in ordered]
    else:
        ordered = list(members)
    sizes = [0] * slices
    for m in ordered:
        sizes[m.slice] += 1
    h = hashlib.blake2b(digest_size=16)
    set_digests, keys, start = [], [], 0
    for k, n in enumerate(sizes):
        h.update(b"".join(lines[start:start + n]))
        start += n
        set_digests.append(h.copy().hexdigest())
        keys.append(checkpoint_key(config_digest, shard, k, set_digests[-1]))
    return ShardSchedule(shard=shard, members=ordered, sizes=sizes, set_digests=set_digests, keys=keys)
