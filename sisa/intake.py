"""Placing validated batches of records for the store (stage 2 on whole batches), and the counts
that training checks once the whole input was read: records, placement units, classes, shards."""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping

import numpy as np

from shard_store import NewRecord
from sisa.config import PartitionConfig
from sisa.errors import RecordError, name_some
from sisa.partition import place_all
from sisa.records import Batch, check_counts, empty_shards

# Inputs (feature bytes, text) a new store's placed records may hold in memory for its first
# training, which then need not read back and re-check what was just written and digested.
KEEP_BYTES = 1 << 30
# Shards whose sizes differ by more than this factor under grouped placement get a warning.
IMBALANCE = 2.0


class Placer:
    """Places batch after batch; a group keeps the shard its first record (or the store, through
    `known_groups`) gave it. With `keep`, the placed records stay in `kept` (by shard) while
    their inputs fit in KEEP_BYTES; beyond, `kept` becomes None."""

    def __init__(self, partition: PartitionConfig, known_groups: Mapping[str, int] | None = None,
                 keep: bool = False):
        self.partition = partition
        self.kept: dict[int, list[NewRecord]] | None = {} if keep else None
        self._kept_bytes = 0
        self.group_shard: dict[str, int] = dict(known_groups or {})
        self.straddling: set[str] = set()
        self.records = 0
        self.ungrouped = 0
        self.groups: set[str] = set()
        self.labels: set[str | None] = set()
        self.shards: Counter[int] = Counter()

    def place(self, batch: Batch) -> list[NewRecord]:
        p = self.partition
        texts = None if batch.packed is not None else batch.inputs
        likely = [prior is not None and prior >= p.prior_threshold for prior in batch.priors]
        where = place_all(batch.ids, batch.groups, likely, seed=p.seed, shards=p.shards,
                          slices=p.slices, strategy=p.placement, late_slices=p.late_slices,
                          dedicated_shards=p.dedicated_shards)
        rows = []
        for i, (shard, slice_, order) in enumerate(where):
            group = batch.groups[i]
            if group is None:
                self.ungrouped += 1
            else:
                self.groups.add(group)
                if self.group_shard.setdefault(group, shard) != shard:
                    self.straddling.add(group)
            rows.append(NewRecord(batch.ids[i], group, batch.digests[i], shard, slice_, order,
                                  batch.targets[i], None if texts is None else texts[i],
                                  None if batch.packed is None else batch.packed[i], batch.priors[i],
                                  batch.input_digests[i]))
            self.shards[shard] += 1
        self.records += len(batch)
        self.labels.update(batch.targets)
        if self.kept is not None:
            self._kept_bytes += batch.inputs.nbytes if isinstance(batch.inputs, np.ndarray) else \
                sum(map(len, batch.inputs))
            if self._kept_bytes > KEEP_BYTES:
                self.kept = None  # too large to hold: training reads it back
            else:
                for row in rows:
                    self.kept.setdefault(row.shard, []).append(row)
        return rows

    def finish(self) -> None:
        """Raise if a group's records went to different shards (dedicated_shards placement with
        priors on both sides of the threshold)."""
        if self.straddling:
            raise RecordError(
                "with dedicated_shards placement every record of a group needs the same prior side "
                "of the threshold; these groups mix both (nothing was written): "
                f"{sorted(self.straddling)[:10]}")

    def check_partition(self) -> None:
        """Refuse a partition that the records placed cannot fill."""
        check_counts(self.records, self.ungrouped + len(self.groups), len(self.groups),
                     self.partition)

    def empty_shards(self) -> list[int]:
        return empty_shards(self.shards, self.partition.shards)

    def warnings(self) -> list[str]:
        """What a user should know about the placement: shards that received no record, and,
        where groups are placed whole, shards whose sizes differ by more than IMBALANCE times
        (a shard with more records weighs as much in the vote, and costs more to retrain)."""
        out = []
        empty = self.empty_shards()
        if empty:
            out.append(f"{len(empty)} of {self.partition.shards} shards received no record (shards "
                       f"{name_some(empty)}): they train on nothing and never serve; fewer shards "
                       "would use the data better")
        sizes = [self.shards[s] for s in range(self.partition.shards) if self.shards[s]]
        if self.groups and len(sizes) > 1 and max(sizes) > IMBALANCE * min(sizes):
            listed = ", ".join(f"{s}: {self.shards[s]}" for s in range(self.partition.shards))
            out.append(f"grouped placement left the shards uneven (records per shard {listed}; the "
                       f"largest is {max(sizes) / min(sizes):.1f}x the smallest): a group stays in "
                       "one shard, so a few large groups unbalance them; fewer shards, or smaller "
                       "groups, even them out")
        return out
