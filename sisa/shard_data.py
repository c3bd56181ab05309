"""A shard's live records in memory, in training order, as the trainer needs them.

Loading a shard is one indexed query. A process that serves many requests (the library, a service)
keeps what it loaded and trusts it only while the store's records version is unchanged; its own
deletions update it in place, so honouring a deletion re-reads nothing.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from shard_store.store import ShardStore
from sisa.errors import StoreError
from sisa.records import Record, pack_features, paused_gc
from sisa.schedule import Member, digest_line, training_order

Transform = Callable[[list[Any]], Any]


@dataclass
class ShardData:
    shard: int
    members: list[Member]  # training order
    lines: list[bytes]  # each member's digest line (see schedule.digest_line)
    labels: np.ndarray  # int64 class indices
    inputs: np.ndarray | list[Any]  # (n, d) float64 features, or texts
    model_inputs: Any = field(default=None, repr=False)  # inputs through the transform, once asked

    def prepared(self, transform: Transform | None) -> Any:
        """What the trainer consumes: the inputs, or their transform (e.g. cached embeddings)."""
        if transform is None:
            return self.inputs
        if self.model_inputs is None:
            self.model_inputs = transform(list(self.inputs))
        return self.model_inputs

    def without(self, ids: Collection[str]) -> ShardData:
        """The same shard with these records gone (ids not in it are ignored)."""
        keep = [i for i, m in enumerate(self.members) if m.id not in ids]
        if len(keep) == len(self.members):
            return self
        return ShardData(
            shard=self.shard,
            members=[self.members[i] for i in keep],
            lines=[self.lines[i] for i in keep],
            labels=self.labels[keep],
            inputs=_take(self.inputs, keep),
            model_inputs=None if self.model_inputs is None else _take(self.model_inputs, keep),
        )


def _take(values: Any, keep: list[int]) -> Any:
    if isinstance(values, np.ndarray):
        return values[keep]
    return [values[i] for i in keep]


def load_shard(store: ShardStore, shard: int, class_index: Mapping[str, int],
               input_dim: int | None) -> ShardData:
    """Read one shard's live records (one query; numeric inputs straight from their bytes)."""
    with paused_gc():
        rows = store.live_training_rows(shard)
        members = [Member(r[0], r[1], r[2], r[3]) for r in rows]
        try:
            labels = np.fromiter((class_index[r[4]] for r in rows), dtype=np.int64, count=len(rows))
        except KeyError as exc:
            raise StoreError(f"shard {shard} holds a record whose label {exc} is not among the "
                             f"store's classes {sorted(class_index)}; the store is inconsistent") from exc
        inputs: np.ndarray | list[Any]
        if input_dim is not None and all(r[5] is not None for r in rows):
            flat = np.frombuffer(b"".join(r[5] for r in rows), dtype="<f8")
            inputs = flat.reshape(len(rows), input_dim)
        else:  # texts, or numeric inputs written before schema version 3
            decoded = [_decode(r) for r in rows]
            inputs = np.asarray(decoded, dtype=np.float64).reshape(len(rows), input_dim) \
                if input_dim is not None else decoded
        return ShardData(shard, members, [digest_line(m) for m in members], labels, inputs)


def from_records(shard: int, records: Sequence[tuple[Member, Record]],
                 class_index: Mapping[str, int], input_dim: int | None) -> ShardData:
    """A shard built from records in memory (those just written), equal to what `load_shard`
    would read back: training order, float64 features, texts as they are."""
    with paused_gc():
        ordered = sorted(records, key=lambda mr: training_order(mr[0]))
        # Fresh copies of the ids, laid out in training order: the records' own strings lie in
        # input order, and every later pass over the shard (keys, manifests) would read memory
        # out of order (it made writing a 200k-id manifest four times slower).
        members = [Member(m.id.encode().decode(), m.digest, m.slice, m.order) for m, _ in ordered]
        labels = np.fromiter((class_index[r.label] for _, r in ordered), dtype=np.int64,
                             count=len(ordered))
        inputs: np.ndarray | list[Any]
        if input_dim is not None:
            packed = b"".join(_packed(r) for _, r in ordered)
            inputs = np.frombuffer(packed, dtype="<f8").reshape(len(ordered), input_dim)
        else:
            inputs = [r.input for _, r in ordered]
        return ShardData(shard, members, [digest_line(m) for m in members], labels, inputs)


def _packed(record: Record) -> bytes:
    if record.features is not None:
        return record.features
    if isinstance(record.input, str):
        raise StoreError(f"record {record.id!r} has a text input where numeric features belong")
    return pack_features(record.input)


def _decode(row: tuple[Any, ...]) -> Any:
    if row[5] is not None:
        return np.frombuffer(row[5], dtype="<f8")
    value = json.loads(row[6])["input"]
    return value if isinstance(value, str) else [float(v) for v in value]


class ShardCache:
    """Loaded shards, valid while the store's records version is the one they were read at."""

    def __init__(self, store: ShardStore, class_index: Mapping[str, int], input_dim: int | None):
        self.store = store
        self.class_index = class_index
        self.input_dim = input_dim
        self._shards: dict[int, ShardData] = {}
        self._version: int | None = None

    def get(self, shards: Collection[int]) -> dict[int, ShardData]:
        version = self.store.records_version()
        if version != self._version:
            self._shards, self._version = {}, version
        for s in shards:
            if s not in self._shards:
                self._shards[s] = load_shard(self.store, s, self.class_index, self.input_dim)
        return {s: self._shards[s] for s in shards}

    def added(self, before: int, after: int, shards: Collection[int],
              complete: Mapping[int, ShardData]) -> None:
        """Records were added to `shards`, taking the store from version `before` to `after`.
        `complete` holds the whole new data of some of them (a store trained just now); the rest
        are read again when needed."""
        if self._version != before and self._shards:
            self._shards = {}
        for s in shards:
            self._shards.pop(s, None)
        self._shards.update(complete)
        self._version = after

    def removed(self, ids: Collection[str], shards: Collection[int], before: int, after: int) -> None:
        """Records `ids` of `shards` were deleted, taking the store from version `before` to
        `after`: update what is loaded instead of reading it again (or drop it all if another
        change came in between)."""
        if self._version != before:
            self.clear()
            return
        gone = set(ids)
        for s in shards:
            if s in self._shards:
                self._shards[s] = self._shards[s].without(gone)
        self._version = after

    def clear(self) -> None:
        self._shards, self._version = {}, None
