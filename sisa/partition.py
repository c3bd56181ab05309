"""Stage 2 of the pipeline: pure placement of a record into (shard, slice) and its order in the slice.

Placement is a keyed hash (blake2b, keyed by the seed) of the record's own id, or of its group id for
the shard, so it never depends on any other record: removing or adding a record moves nothing else.
Deletion-aware placement also reads the record's own prior (likely to be deleted or not).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, NewType

RecordId = NewType("RecordId", str)
GroupId = NewType("GroupId", str)


def _keyed_hash(seed: int, purpose: bytes, value: str) -> bytes:
    # `person` separates the purposes, so a record's shard, slice and order are independent draws.
    return hashlib.blake2b(
        value.encode("utf-8"), key=seed.to_bytes(8, "big"), person=purpose, digest_size=16
    ).digest()


def shard_of(key: str, seed: int, shards: int) -> int:
    """Shard of a record, from its group id when it has one, else its record id."""
    return int.from_bytes(_keyed_hash(seed, b"sisa-shard", key), "big") % shards


def slice_of(record_id: str, seed: int, slices: int) -> int:
    """Slice of a record inside its shard (by record id, so a group spreads over slices)."""
    return int.from_bytes(_keyed_hash(seed, b"sisa-slice", record_id), "big") % slices


def order_key(record_id: str, seed: int) -> str:
    """Sort key of a record inside its slice: a hash, so input order never matters."""
    return _keyed_hash(seed, b"sisa-order", record_id).hex()


@dataclass(frozen=True)
class Placement:
    shard: int
    slice: int
    order: str


def place(
    record_id: str,
    group_id: str | None,
    *,
    seed: int,
    shards: int,
    slices: int,
    likely: bool = False,
    strategy: str = "uniform",
    late_slices: int = 1,
    dedicated_shards: int = 1,
) -> Placement:
    """Where one record goes. Pure: depends only on its own id, group, prior flag and the seed.

    With a deletion-aware `strategy`, records `likely` to be deleted go to the last `late_slices`
    slices of their shard ("late_slices") or to the last `dedicated_shards` shards
    ("dedicated_shards"); the others fill the rest."""
    shard, slice_, order = place_all([record_id], [group_id], [likely], seed=seed, shards=shards,
                                     slices=slices, strategy=strategy, late_slices=late_slices,
                                     dedicated_shards=dedicated_shards)[0]
    return Placement(shard=shard, slice=slice_, order=order)


def place_all(record_ids: Sequence[str], group_ids: Sequence[str | None], likely: Sequence[bool], *,
              seed: int, shards: int, slices: int, strategy: str = "uniform", late_slices: int = 1,
              dedicated_shards: int = 1) -> list[tuple[int, int, str]]:
    """`place` for many records at once, as (shard, slice, order) tuples: `shard_of`, `slice_of`
    and `order_key`'s draws, each keyed hasher set up once and copied per record."""
    key = seed.to_bytes(8, "big")
    shard_h, slice_h, order_h = (hashlib.blake2b(key=key, person=p, digest_size=16)
                                 for p in (b"sisa-shard", b"sisa-slice", b"sisa-order"))

    def draw(template: Any, value: str, n: int) -> int:
        h = template.copy()
        h.update(value.encode("utf-8"))
        return int.from_bytes(h.digest(), "big") % n

    def split(template: Any, value: str, n: int, last: int, flagged: bool) -> int:
        """A draw among n where the last `last` are for flagged records, the rest for others."""
        return n - last + draw(template, value, last) if flagged else draw(template, value, n - last)

    out = []
    for record_id, group_id, flagged in zip(record_ids, group_ids, likely, strict=True):
        unit = group_id if group_id is not None else record_id
        slice_ = split(slice_h, record_id, slices, late_slices, flagged) \
            if strategy == "late_slices" else draw(slice_h, record_id, slices)
        shard = split(shard_h, unit, shards, dedicated_shards, flagged) \
            if strategy == "dedicated_shards" else draw(shard_h, unit, shards)
        order = order_h.copy()
        order.update(record_id.encode("utf-8"))
        out.append((shard, slice_, order.hexdigest()))
    return out
