"""A shard's live records in memory, in training order, as the trainer needs them.

Loading a shard is one indexed query. A process that serves many requests (the library, a service)
keeps what it loaded and trusts it only while the shard's version in the store is unchanged (every
change to a record bumps it, however it is made); its own deletions update it in place, so
honouring a deletion re-reads nothing.
"""

from __future__ import annotations

import operator
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from shard_store import NewRecord, ShardStore
from sisa.errors import RecordCorruptError, StoreError, name_some
from sisa.records import content_digest, paused_gc
from sisa.schedule import Member, digest_line
from sisa.tasks import Task


@dataclass
class ShardData:
    shard: int
    version: int  # the shard's version in the store when this was read
    members: list[Member]  # training order
    lines: list[bytes]  # each member's digest line (see schedule.digest_line)
    targets: np.ndarray  # training targets (class indices)
    inputs: np.ndarray | list[Any]  # (n, d) float64 features, or texts
    contexts: list[str | None] | None = None  # what each input follows (a causal LM's prompts)
    model_inputs: Any = field(default=None, repr=False)  # after featurisation, once asked

    def without(self, ids: Collection[str], version: int) -> ShardData:
        """The same shard with these records gone (ids not in it are ignored), at `version`."""
        keep = [i for i, m in enumerate(self.members) if m.id not in ids]
        return ShardData(
            shard=self.shard,
            version=version,
            members=[self.members[i] for i in keep],
            lines=[self.lines[i] for i in keep],
            targets=self.targets[keep],
            inputs=_take(self.inputs, keep),
            contexts=None if self.contexts is None else _take(self.contexts, keep),
            model_inputs=None if self.model_inputs is None else _take(self.model_inputs, keep),
        )


def _take(values: Any, keep: list[int]) -> Any:
    if isinstance(values, np.ndarray):
        return values[keep]
    if hasattr(values, "take"):  # model inputs of a causal LM
        return values.take(keep)
    return [values[i] for i in keep]


def load_shard(store: ShardStore, shard: int, version: int, task: Task,
               input_dim: int | None) -> ShardData:
    """Read one shard's live records (one query; numeric inputs straight from their bytes),
    each checked against its content digest: nothing trains on a damaged or altered record."""
    with paused_gc():
        rows = store.shard_rows(shard)
        bad = altered(rows)
        if bad:
            raise RecordCorruptError(
                f"shard {shard}: {len(bad)} record(s) no longer match their content digest (the "
                f"stored content was damaged or altered): {name_some(bad, quote=True)}; forget "
                "them and add them again from the source data")
        return from_rows(shard, version, rows, task, input_dim)


def written(shard: int, version: int, records: Sequence[NewRecord], task: Task,
            input_dim: int | None) -> ShardData:
    """The shard data of records this process has just written (and digested from these very
    bytes), equal to what `load_shard` would read back."""
    with paused_gc():
        ordered = sorted(records, key=operator.attrgetter("slice", "order_key", "id"))
        if not ordered:
            return from_rows(shard, version, [], task, input_dim)
        c: list[Sequence[Any]] = list(zip(*ordered, strict=True))  # columns, transposed in C
        f = {name: i for i, name in enumerate(NewRecord._fields)}
        # Fresh copies of the ids, laid out in training order: the records' own strings lie in
        # input order, and every later pass over the shard (keys, manifests) would read memory
        # out of order (it made writing a 200k-id manifest four times slower).
        ids = [i.encode().decode() for i in c[f["id"]]]
        return _from_columns(shard, version, [ids, *(c[f[k]] for k in (
            "digest", "slice", "order_key", "target", "features", "text"))], task, input_dim)


def from_rows(shard: int, version: int, rows: Sequence[tuple[Any, ...]], task: Task,
              input_dim: int | None) -> ShardData:
    """Shard data from rows as `ShardStore.shard_rows` gives them, in training order."""
    columns = list(zip(*rows, strict=True)) if rows else [()] * 9
    return _from_columns(shard, version, columns[:7], task, input_dim)


def _from_columns(shard: int, version: int, columns: Sequence[Sequence[Any]], task: Task,
                  input_dim: int | None) -> ShardData:
    """From columns in training order: ids, digests, slices, order keys, targets, features
    (float64 bytes) and texts."""
    ids, digests, slices, orders, targets, features, texts = columns
    members = list(map(Member, ids, digests, slices, orders))
    inputs: np.ndarray | list[Any]
    if input_dim is not None:
        if any(f is None for f in features):
            raise StoreError(f"shard {shard} holds a record without numeric features; the "
                             "store is inconsistent")
        # numpy's allocation (huge pages where the kernel has them) rather than one bytes object.
        inputs = np.concatenate([np.frombuffer(f, dtype="<f8") for f in features]) \
            .reshape(len(members), input_dim) if features else np.empty((0, input_dim))
    else:
        inputs = list(texts)
    return ShardData(shard, version, members, list(map(digest_line, members)),
                     task.encode_targets(list(targets)), inputs, task.contexts(list(targets)))


def altered(rows: Sequence[tuple[Any, ...]]) -> list[str]:
    """The ids of `ShardStore.shard_rows` rows whose content does not give their digest."""
    bad = []
    for r in rows:
        record_id, digest, target, features, text, group, prior = r[0], r[1], r[4], r[5], r[6], r[7], r[8]
        if text is not None:
            actual = content_digest(text, target, group, prior)
        elif features:
            actual = content_digest((), target, group, prior, packed=features)
        else:
            actual = None  # no input at all
        if actual != digest:
            bad.append(record_id)
    return bad


class ShardCache:
    """Loaded shards, each valid while its version in the store is the one it was read at."""

    def __init__(self, store: ShardStore, task: Task, input_dim: int | None):
        self.store = store
        self.task = task
        self.input_dim = input_dim
        self._shards: dict[int, ShardData] = {}

    def get(self, shards: Collection[int], fresh: bool = False) -> dict[int, ShardData]:
        """These shards' data: what is kept while its version is current (`fresh`: read again)."""
        versions = self.store.shard_versions(shards)
        for s in shards:
            kept = self._shards.get(s)
            if fresh or kept is None or kept.version != versions[s]:
                self._shards[s] = load_shard(self.store, s, versions[s], self.task, self.input_dim)
        return {s: self._shards[s] for s in shards}

    def keep(self, records: Mapping[int, Sequence[NewRecord]], versions: Mapping[int, int]) -> None:
        """Keep the shards of records just written at these versions (a shard that another
        process changes meanwhile is read again: its version moved)."""
        with paused_gc():  # one collection after all the shards, not one after each
            for s, rows in records.items():
                self._shards[s] = written(s, versions[s], rows, self.task, self.input_dim)

    def removed(self, ids: Collection[str], versions: Mapping[int, tuple[int, int]]) -> None:
        """Records `ids` were deleted, taking each shard in `versions` from its first version to its
        second: update what is kept instead of reading it again (or forget a shard that another
        change reached in between)."""
        gone = set(ids)
        for s, (before, after) in versions.items():
            kept = self._shards.get(s)
            if kept is not None and kept.version == before:
                self._shards[s] = kept.without(gone, after)
            else:
                self._shards.pop(s, None)

    def clear(self) -> None:
        self._shards = {}
