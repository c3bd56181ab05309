"""Stage 6 of the pipeline: retrain planning (pure) and the manager that executes it.

Every change to the records (train, add, forget, crash recovery) and every repair ends in one
mechanism, `sync`: compute each affected shard's slice schedule from its live records, resume from
the newest checkpoint whose key still matches (or from where a repair says), retrain the remaining
slices, and swap the live checkpoint. Deletions are recorded durably before any training starts,
and marked applied in the same transaction as the swap.
"""

from __future__ import annotations

import hashlib
import time
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from shard_store import checkpoints as ckpt
from shard_store.store import CheckpointRow, ShardStore
from sisa.config import SisaConfig
from sisa.errors import CheckpointError, RecordError, StoreError, UnknownRecordError
from sisa.execution import run_jobs
from sisa.records import Record
from sisa.schedule import Member, ShardSchedule, shard_schedule
from sisa.shard_data import ShardCache, from_records
from sisa.training.protocol import ModelSpec
from sisa.training.shard_trainer import ShardJob, ShardResult

_MAX_NAMED = 10


@dataclass(frozen=True)
class ShardPlan:
    """What to retrain in one shard: from `start_slice` (None: the live checkpoint is current)."""

    schedule: ShardSchedule
    start_slice: int | None
    resume_key: str | None  # checkpoint of slice start_slice - 1, if any

    @property
    def shard(self) -> int:
        return self.schedule.shard


def plan_shard(schedule: ShardSchedule, existing_keys: set[str]) -> ShardPlan:
    """Pure: resume from the newest slice checkpoint whose key (inputs) is unchanged."""
    if schedule.keys[-1] in existing_keys:
        return ShardPlan(schedule, None, None)
    reusable = [k for k, key in enumerate(schedule.keys) if key in existing_keys]
    last = max(reusable, default=-1)
    return ShardPlan(schedule, last + 1, schedule.keys[last] if last >= 0 else None)


def plan_from(schedule: ShardSchedule, start_slice: int) -> ShardPlan:
    """Retrain from `start_slice`, resuming from the checkpoint before it."""
    return ShardPlan(schedule, start_slice, schedule.keys[start_slice - 1] if start_slice > 0 else None)


def expected_retrain_fraction(slices: int, shards: int) -> float:
    """SISA's expected share of all training work one uniform deletion retrains: (2R+1)/(3R)/S."""
    return (2 * slices + 1) / (3 * slices) / shards


@dataclass
class ShardRetrain:
    shard: int
    start_slice: int
    samples: int
    seconds: float
    attempts: int
    node: str


@dataclass
class SyncReport:
    retrained: list[ShardRetrain] = field(default_factory=list)
    checkpoints_written: int = 0
    checkpoints_dropped: int = 0
    seconds: float = 0.0
    live: dict[int, str] = field(default_factory=dict)  # shard -> sha256 of its new live weights

    @property
    def samples(self) -> int:
        return sum(r.samples for r in self.retrained)


@dataclass
class DeletionReceipt:
    """What a deletion did: returned to the caller and stored in the ledger."""

    request_id: str
    record_ids: list[str]  # deleted by this request
    already_deleted: list[str]  # repeated ids: a no-op
    affected_shards: list[dict[str, Any]]  # shard, start_slice, samples, seconds
    samples_retrained: int
    seconds: float
    checkpoints_changed: dict[str, dict[str, str | None]]  # shard -> {before, after} sha256
    checkpoints_unchanged: dict[str, str]  # shard -> sha256
    recovered: bool = False  # applied by crash recovery rather than by the request itself

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


Progress = Callable[[str, int], Callable[[ShardResult], None]]


class DeletionManager:
    """Executes syncs, deletions, additions and recovery against one store."""

    def __init__(
        self,
        store: ShardStore,
        config: SisaConfig,
        spec: ModelSpec,
        classes: Sequence[str],
        progress: Progress | None = None,
        transform: Callable[[list[Any]], Any] | None = None,
        fingerprint: str = "",
        feature_dim: int | None = None,
    ) -> None:
        """`feature_dim`: the width of numeric record inputs (None for texts)."""
        self.store = store
        self.config = config
        self.spec = spec
        self.class_index = {c: i for i, c in enumerate(classes)}
        self.data = ShardCache(store, self.class_index, feature_dim)
        # Checkpoint keys cover the config and any base model the weights depend on.
        self.digest = config.digest() if not fingerprint else hashlib.blake2b(
            f"{config.digest()}/{fingerprint}".encode(), digest_size=16).hexdigest()
        self.progress = progress
        self.transform = transform  # e.g. texts -> cached frozen-encoder embeddings

    # -- planning --------------------------------------------------------------------------------

    def schedules(self, shards: Iterable[int]) -> dict[int, ShardSchedule]:
        data = self.data.get(sorted(set(shards)))
        slices = self.config.partition.slices
        return {s: shard_schedule(self.digest, s, d.members, slices, d.lines) for s, d in data.items()}

    def records_added(self, versions: tuple[int, int], placed: Sequence[dict[str, Any]],
                      records: Sequence[Record], whole_store: bool) -> None:
        """Records were just inserted (`placed` rows of `records`, changing the store between
        `versions`). When they are the whole store, keep them as its shard data: training
        need not read back what it just wrote."""
        shards = sorted({row["shard"] for row in placed})
        complete = {}
        if whole_store:
            by_shard: dict[int, list[tuple[Member, Record]]] = {
                s: [] for s in range(self.config.partition.shards)}
            for row, record in zip(placed, records, strict=True):
                member = Member(row["id"], row["digest"], row["slice"], row["order_key"])
                by_shard[row["shard"]].append((member, record))
            complete = {s: from_records(s, items, self.class_index, self.data.input_dim)
                        for s, items in by_shard.items()}
        self.data.added(*versions, shards, complete)

    def plan(self, shards: Iterable[int]) -> list[ShardPlan]:
        existing = {c.key for c in self.store.checkpoints()}
        return [plan_shard(sched, existing) for sched in self.schedules(shards).values()]

    def _job(self, plan: ShardPlan) -> ShardJob:
        sched = plan.schedule
        data = self.data.get([sched.shard])[sched.shard]
        resume = None
        if plan.resume_key is not None:
            row = self.store.checkpoint(plan.resume_key)
            if row is None:  # plan_shard only names existing keys; a concurrent writer removed it
                raise StoreError(f"checkpoint {plan.resume_key} vanished while planning")
            resume = self.store.read_payload(row)
        return ShardJob(
            shard=sched.shard,
            config=self.config,
            spec=self.spec,
            config_digest=self.digest,
            inputs=data.prepared(self.transform),
            labels=data.labels,
            members=sched.members,
            sizes=sched.sizes,
            set_digests=sched.set_digests,
            keys=sched.keys,
            start_slice=plan.start_slice or 0,
            resume=resume,
        )

    # -- execution -------------------------------------------------------------------------------

    def sync(
        self,
        shards: Iterable[int],
        applied: Sequence[tuple[str, Callable[[SyncReport], dict[str, Any]]]] = (),
        description: str = "training shards",
        restart: Mapping[int, int] | None = None,
    ) -> SyncReport:
        """Bring `shards` in line with their live records; mark `applied` requests in the same
        transaction as the live swap (each receipt is built from the finished report).
        `restart` retrains shard s from slice restart[s] even where its checkpoints match."""
        started = time.perf_counter()
        plans = self.plan(shards)
        if restart:
            plans = [plan_from(p.schedule, restart[p.shard]) if p.shard in restart and
                     (p.start_slice is None or restart[p.shard] < p.start_slice) else p
                     for p in plans]
        todo = [p for p in plans if p.start_slice is not None]
        jobs = [self._job(p) for p in todo]
        report = SyncReport()

        def store_result(result: ShardResult) -> None:
            # Persist each shard's checkpoints as soon as it finishes: a crash loses little work.
            for payload in result.checkpoints:
                self.store.add_checkpoint(payload, payload.manifest["record_count"])
                report.checkpoints_written += 1

        callback = store_result
        if self.progress is not None and jobs:
            tick = self.progress(description, len(jobs))

            def callback(result: ShardResult) -> None:
                store_result(result)
                tick(result)

        results = run_jobs(jobs, self.config.execution, callback)
        for plan, result in zip(todo, results, strict=False):
            report.retrained.append(ShardRetrain(
                shard=plan.shard, start_slice=plan.start_slice or 0, samples=result.samples,
                seconds=round(result.seconds, 4), attempts=result.attempts, node=result.node))
        report.seconds = time.perf_counter() - started
        live = {p.shard: p.schedule.keys[-1] for p in plans}
        for shard, key in live.items():
            row = self.store.checkpoint(key)
            if row is None:
                raise StoreError(f"checkpoint {key} of shard {shard} was not written; run recover")
            report.live[shard] = row.sha256
        self.store.swap_live(live, [(rid, build(report)) for rid, build in applied])
        # Checkpoints that no longer match the records (they may hold deleted data) are removed.
        wanted = {key for p in plans for key in p.schedule.keys}
        stale = [c.key for p in plans for c in self.store.checkpoints(p.shard) if c.key not in wanted]
        report.checkpoints_dropped = self.store.drop_checkpoints(stale)
        return report

    def forget(self, record_ids: Sequence[str]) -> DeletionReceipt:
        """Delete records by id: validate, record durably, retrain affected shards, swap, apply."""
        ids = list(dict.fromkeys(str(i) for i in record_ids))
        if not ids:
            raise RecordError("no record ids given to forget")
        rows = self.store.find_records(ids)
        unknown = [i for i in ids if i not in rows]
        if unknown:
            more = f" ... and {len(unknown) - _MAX_NAMED} more" if len(unknown) > _MAX_NAMED else ""
            raise UnknownRecordError(
                f"unknown record id(s), nothing was deleted: "
                f"{', '.join(map(repr, unknown[:_MAX_NAMED]))}{more}"
            )
        already = [i for i in ids if rows[i].deleted_at is not None]
        fresh = [i for i in ids if rows[i].deleted_at is None]
        request_id = uuid.uuid4().hex
        if not fresh:
            return DeletionReceipt(request_id="", record_ids=[], already_deleted=already,
                                   affected_shards=[], samples_retrained=0, seconds=0.0,
                                   checkpoints_changed={}, checkpoints_unchanged={})
        shards = sorted({rows[i].shard for i in fresh})
        versions = self.store.record_deletion(request_id, fresh, shards)  # acknowledged from here on
        self.data.removed(fresh, shards, *versions)
        return self._apply(request_id, fresh, shards, already, recovered=False)

    def _apply(
        self, request_id: str, ids: list[str], shards: list[int], already: list[str], recovered: bool
    ) -> DeletionReceipt:
        before = {s: row.sha256 for s, row in self.store.live().items()}
        built: list[DeletionReceipt] = []

        def build(report: SyncReport) -> dict[str, Any]:
            after = {**before, **report.live}
            receipt = DeletionReceipt(
                request_id=request_id,
                record_ids=ids,
                already_deleted=already,
                affected_shards=[
                    {"shard": r.shard, "start_slice": r.start_slice, "samples": r.samples,
                     "seconds": r.seconds} for r in report.retrained
                ],
                samples_retrained=report.samples,
                seconds=round(report.seconds, 4),
                checkpoints_changed={
                    str(s): {"before": before.get(s), "after": after[s]}
                    for s in sorted(after) if before.get(s) != after[s]
                },
                checkpoints_unchanged={
                    str(s): after[s] for s in sorted(after) if before.get(s) == after[s]
                },
                recovered=recovered,
            )
            built.append(receipt)
            return receipt.to_dict()

        self.sync(shards, applied=[(request_id, build)], description="retraining shards")
        return built[0]

    def forget_group(self, group_id: str) -> DeletionReceipt:
        ids = self.store.group_record_ids(group_id)
        if not ids:
            raise UnknownRecordError(f"unknown group id {group_id!r}, nothing was deleted")
        return self.forget(ids)

    def repair(self, shards: Iterable[int], from_scratch: bool = False) -> SyncReport:
        """Retrain each shard from its first missing or damaged checkpoint (from slice 0 with
        `from_scratch`), resuming from the intact one before it."""
        wanted = sorted(set(shards))
        restart = {}
        for plan in self.plan(wanted):
            rows = {c.key: c for c in self.store.checkpoints(plan.shard)}
            for k, key in enumerate(plan.schedule.keys):
                if from_scratch or key not in rows or not self._intact(rows[key]):
                    restart[plan.shard] = k
                    break
        return self.sync(wanted, description="repairing shards", restart=restart)

    def _intact(self, row: CheckpointRow) -> bool:
        try:
            self.store.read_payload(row)
        except CheckpointError:
            return False
        return True

    def recover(self) -> list[DeletionReceipt]:
        """Finish what a crash interrupted: half-written checkpoints, pending deletions, additions."""
        ckpt.clean_temporaries(self.store.checkpoint_root)
        receipts = []
        for entry in self.store.pending_deletions():
            receipts.append(self._apply(entry["request_id"], entry["record_ids"], entry["shards"],
                                        [], recovered=True))
        all_shards = range(self.config.partition.shards)
        if any(p.start_slice is not None for p in self.plan(all_shards)) or \
                set(self.store.live()) != set(all_shards):
            self.sync(all_shards, description="recovering shards")
        return receipts
