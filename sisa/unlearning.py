"""Stage 6 of the pipeline: the deletion lifecycle, and the plan / retrain / commit steps it shares
with training, additions, recovery and repair.

- `request_deletion` validates and acknowledges: one transaction writes the ledger entry, tombstones
  the records, purges their content and unregisters every checkpoint derived from them. It returns
  at once; from then on the deletion survives any crash and the affected shards are not *clean*
  (never served) until it is applied.
- `apply_pending` plans (pure: resume each changed shard from the newest checkpoint whose key still
  matches), retrains, and commits: the live swap, the ledger update and the receipts in one
  transaction, then the files of what it unregistered are removed.
Training, `add`, `repair` and crash recovery are the same three steps. Whatever step a process dies
at, the next writer (or `sweep`) finds a state where nothing on disk derives from a deleted record.
"""

from __future__ import annotations

import dataclasses
import time
import uuid
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from shard_store import (
    CheckpointFileError,
    CheckpointRow,
    Committed,
    DeletionRow,
    NewRecord,
    ShardCommit,
    ShardStore,
)
from sisa.checkpoint import WEIGHTS
from sisa.config import SisaConfig
from sisa.errors import (
    CheckpointError,
    DamagedStoreError,
    RecordCorruptError,
    RecordError,
    StoreError,
    UnknownRecordError,
    check_deletion_target,
    name_some,
)
from sisa.execution import run_jobs
from sisa.features import Features, Progress
from sisa.schedule import ShardSchedule, shard_schedule
from sisa.serving.loader import read_checkpoint
from sisa.shard_data import ShardCache, ShardData
from sisa.tasks import Task
from sisa.training.jobs import ShardJob, ShardResult
from sisa.training.protocol import Backend

_MAX_ROUNDS = 100  # plan/retrain/commit rounds before a store that keeps changing is reported


def expected_speedup(shards: int, slices: int) -> float:
    """SISA's expected speed-up of one uniform deletion over retraining the ensemble: 3RS/(2R+1)."""
    return 3 * slices * shards / (2 * slices + 1)


def expected_retrain_fraction(shards: int, slices: int) -> float:
    """The share of all training work one uniform deletion retrains: (2R+1)/(3R)/S."""
    return 1 / expected_speedup(shards, slices)


@dataclass(frozen=True)
class DeletionRequest:
    """An acknowledged deletion (or, with an empty `request_id`, one with nothing left to do)."""

    request_id: str
    record_ids: list[str]  # deleted by this request, in clear (empty when read back from the ledger)
    shards: list[int]  # whose models must be retrained
    requested_at: str | None
    already_deleted: list[str] = field(default_factory=list)  # repeated ids: a no-op
    status: str = "pending"  # or "applied"
    record_digests: list[str] = field(default_factory=list)  # keyed: all the ledger keeps
    applied_at: str | None = None
    receipt: dict[str, Any] | None = None  # as the ledger chained it, once applied

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_row(cls, row: DeletionRow) -> DeletionRequest:
        return cls(row.request_id, [], row.shards, row.requested_at, status=row.status,
                   record_digests=row.record_ids, applied_at=row.applied_at, receipt=row.receipt)


@dataclass(frozen=True)
class DeletionReceipt:
    """What a deletion did: returned to the caller and, but for the ids in clear, stored in the
    ledger as a link of the receipt chain (see `ShardStore.verify_receipts`)."""

    request_id: str
    # The ids deleted, in clear: only the process that acknowledged the deletion knows them (the
    # ledger keeps `record_digests`); empty in a receipt read back from the ledger.
    record_ids: list[str]
    already_deleted: list[str]  # repeated ids: a no-op (not in the ledger either)
    affected_shards: list[dict[str, Any]]  # shard, start_slice, samples, seconds
    samples_retrained: int
    seconds: float
    checkpoints_changed: dict[str, dict[str, str | None]]  # shard -> {before, after} sha256
    checkpoints_unchanged: dict[str, str]  # shard -> sha256 of an untouched shard's weights
    # Applied by another process (or Sisa object) than the one that acknowledged it, e.g. after
    # that one was interrupted, or by a service's worker.
    recovered: bool = False
    record_digests: list[str] = field(default_factory=list)  # keyed digests of the deleted ids
    config_digest: str = ""  # of the config and base model every shard is trained with
    requested_at: str | None = None  # when the deletion was acknowledged
    # Set by the ledger when the receipt joins the chain:
    applied_at: str | None = None
    sequence: int | None = None  # 1, 2, ... in the order deletions were applied
    previous: str | None = None  # digest of the receipt before (None for the first)
    digest: str | None = None  # keyed digest of every field above but the ids in clear

    _CLEAR = ("record_ids", "already_deleted")  # what the ledger never stores

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def ledger_dict(self) -> dict[str, Any]:
        """The receipt as the ledger stores and chains it: no id in clear."""
        return {k: v for k, v in asdict(self).items() if k not in self._CLEAR}

    @classmethod
    def from_ledger(cls, stored: Mapping[str, Any], record_ids: Sequence[str] = (),
                    already_deleted: Sequence[str] = ()) -> DeletionReceipt:
        known = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in stored.items() if k in known and k not in cls._CLEAR}
        return cls(**{"record_ids": list(record_ids), "already_deleted": list(already_deleted),
                      **values})


@dataclass
class ShardRetrain:
    shard: int
    start_slice: int
    samples: int
    seconds: float
    attempts: int
    node: str


@dataclass
class TrainingReport:
    """What one plan / retrain / commit run did."""

    records: int = 0  # records read (train, add)
    retrained: list[ShardRetrain] = field(default_factory=list)
    checkpoints_written: int = 0
    checkpoints_dropped: int = 0
    seconds: float = 0.0  # planning, retraining and committing (from after the process set-up)
    # Reading, validating, placing and writing the new records (train, add), before training.
    ingest_seconds: float = 0.0
    live: dict[int, str] = field(default_factory=dict)  # shard -> sha256 of its new live weights
    warnings: list[str] = field(default_factory=list)  # e.g. shards that received no record
    healed: list[str] = field(default_factory=list)  # what the writer repaired before it built
    blocked: dict[int, str] = field(default_factory=dict)  # damaged shards it did not build on
    deletions_applied: list[DeletionReceipt] = field(default_factory=list)  # their receipts

    @property
    def samples(self) -> int:
        return sum(r.samples for r in self.retrained)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "samples": self.samples}


@dataclass(frozen=True)
class ShardPlan:
    """What to retrain in one shard: from `start_slice` (None: its final checkpoint exists)."""

    schedule: ShardSchedule
    version: int  # the shard's version the schedule was built from
    start_slice: int | None
    resume_key: str | None  # checkpoint of slice start_slice - 1, if any
    data: ShardData | None = field(default=None, repr=False, compare=False)  # the records planned

    @property
    def shard(self) -> int:
        return self.schedule.shard


@dataclass(frozen=True)
class Plan:
    shards: list[ShardPlan]  # every shard whose live checkpoint is not current
    requests: list[DeletionRow]  # pending deletions, applied once their shards are current

    @property
    def todo(self) -> list[ShardPlan]:
        return [p for p in self.shards if p.start_slice is not None]


def plan_shard(schedule: ShardSchedule, version: int, existing_keys: set[str]) -> ShardPlan:
    """Pure: resume from the newest slice checkpoint whose key (inputs) is unchanged."""
    if schedule.keys[-1] in existing_keys:
        return ShardPlan(schedule, version, None, None)
    last = max((k for k, key in enumerate(schedule.keys) if key in existing_keys), default=-1)
    return ShardPlan(schedule, version, last + 1, schedule.keys[last] if last >= 0 else None)


class DeletionManager:
    """Acknowledges, plans, retrains and commits against one store."""

    def __init__(self, store: ShardStore, task: Task, backend: Backend, features: Features,
                 config: SisaConfig, config_digest: str, progress: Progress | None = None) -> None:
        """`config_digest`: covers the config and any base model the weights depend on."""
        self.store = store
        self.task = task
        self.backend = backend
        self.features = features
        self.config = config
        self.config_digest = config_digest
        self.progress = progress
        # Numeric inputs are kept as rows of the model's input width; texts (whatever encodes
        # them) are not: known from the config, so opening a store builds no model.
        input_dim = backend.spec.input_dim if backend.config.input_kind == "features" else None
        self.data = ShardCache(store, task, input_dim)
        # Requests this manager acknowledged and has not applied yet, with their ids in clear: a
        # receipt for any other says it was recovered.
        self.acknowledged: dict[str, list[str]] = {}

    # -- acknowledge -----------------------------------------------------------------------------

    def request_deletion(self, ids: Sequence[str] | None = None, group: str | None = None,
                         keep_ids: bool = True) -> DeletionRequest:
        """Validate and acknowledge a deletion of record ids, or of every record of a group.
        Returns once it is durable, before any training. `keep_ids`: remember the ids in clear
        until the deletion is applied, for its receipt."""
        check_deletion_target(ids, group)
        self.store.require_witness()  # an acknowledgement the witness never saw could be lost
        if group is not None:
            wanted = self.store.group_record_ids(group)
            if not wanted:
                if self.store.group_deleted_count(group):
                    return DeletionRequest("", [], [], None, already_deleted=[f"group {group}"])
                raise UnknownRecordError(f"unknown group id {group!r}, nothing was deleted")
        elif isinstance(ids, str):
            raise RecordError(f"give a list of record ids, not the string {ids[:100]!r}")
        else:
            wanted = list(dict.fromkeys(str(i) for i in ids or ()))
            if not wanted:
                raise RecordError("no record ids given to delete")
        rows = self.store.find_records(wanted)
        unknown = [i for i in wanted if i not in rows]
        if unknown:
            raise UnknownRecordError(
                f"unknown record id(s), nothing was deleted: {name_some(unknown, quote=True)}")
        fresh = [i for i in wanted if rows[i].deleted_at is None]
        ack = self.store.acknowledge(uuid.uuid4().hex, fresh) if fresh else None
        if ack is None:
            return DeletionRequest("", [], [], None, already_deleted=wanted)
        if keep_ids:
            self.acknowledged[ack.request_id] = ack.record_ids
        self.data.removed(ack.record_ids, ack.versions)
        self.store.tidy()  # the files of the checkpoints it unregistered
        deleted = set(ack.record_ids)
        already = [i for i in wanted if i not in deleted]
        return DeletionRequest(ack.request_id, ack.record_ids, ack.shards, ack.requested_at,
                               already_deleted=already, record_digests=ack.record_digests)

    def pending(self) -> list[DeletionRequest]:
        """Deletions acknowledged but not applied; with their ids in clear where this object
        acknowledged them (the ledger keeps keyed digests only)."""
        out = []
        for row in self.store.pending_deletions():
            request = DeletionRequest.from_row(row)
            known = self.acknowledged.get(row.request_id)
            out.append(dataclasses.replace(request, record_ids=list(known)) if known else request)
        return out

    def clean_shards(self) -> set[int]:
        """Shards with no acknowledged deletion pending against them: the ones that may serve."""
        return set(self.store.shards()) - self.store.pending_shards()

    # -- apply -----------------------------------------------------------------------------------

    def apply_pending(self) -> list[DeletionReceipt]:
        """Retrain what acknowledged deletions (and anything else a crash left) changed, and commit;
        returns the receipts of the deletions applied."""
        return self.update("applying deletions").deletions_applied

    def add(self, rows: Sequence[NewRecord] | Iterable[Sequence[NewRecord]]) -> TrainingReport:
        """Insert placed records (or chunks of them); each affected shard retrains from its
        earliest affected slice."""
        started = time.perf_counter()
        self.store.insert_records(rows)
        ingest = time.perf_counter() - started
        report = self.update("retraining shards")
        report.ingest_seconds = ingest
        return report

    def repair(self, shards: Iterable[int], from_scratch: bool = False) -> TrainingReport:
        """Heal the store and rebuild what is damaged: links and stray files removed, then each
        shard retrained from its first missing or damaged checkpoint (from slice 0 with
        `from_scratch`; a checkpoint not on the shard's schedule any more goes too), then plan,
        retrain and commit. The healing is listed in the report's `healed`."""
        doomed: list[str] = []
        with self.store.writer():
            healed = [f"removed the link {p}" for p in self.store.remove_symlinks()]
            healed += [f"removed the stray {p}" for p in self.store.remove_strays()]
            for shard, schedule in self.schedules(shards, fresh=True).items():
                rows = {c.key: c for c in self.store.checkpoints(shard)}
                stale = [key for key in rows if key not in schedule.keys]
                for k, key in enumerate(schedule.keys):
                    if from_scratch or key not in rows or not self._intact(rows[key]):
                        doomed += [key for key in schedule.keys[k:] if key in rows]
                        break
                doomed += stale
            dropped = self.store.drop_checkpoints(doomed)
            report = self.update("repairing shards")
        report.checkpoints_dropped += dropped
        report.healed = healed + report.healed
        return report

    # -- the steps -------------------------------------------------------------------------------

    def schedules(self, shards: Iterable[int], fresh: bool = False) -> dict[int, ShardSchedule]:
        """The slice schedules of these shards' live records (`fresh`: read from the store, not
        from what this process kept)."""
        data = self.data.get(sorted(set(shards)), fresh=fresh)
        return {s: self._schedule(d) for s, d in data.items()}

    def _schedule(self, data: ShardData) -> ShardSchedule:
        return shard_schedule(self.config_digest, data.shard, data.members,
                              self.config.partition.slices, data.lines)

    def plan(self, blocked: dict[int, str] | None = None) -> Plan:
        """Every shard whose live checkpoint is not current, with what to retrain, and the
        pending deletions. A shard in `blocked` is left out; one whose records fail their check
        joins it (with why), and the others are planned."""
        blocked = blocked if blocked is not None else {}
        dirty = [s for s, row in self.store.shards().items() if not row.current and s not in blocked]
        existing = {c.key for c in self.store.checkpoints()}
        shards = []
        for s in dirty:
            try:
                d = self.data.get([s])[s]
            except RecordCorruptError as exc:
                blocked[s] = str(exc)
                continue
            shards.append(dataclasses.replace(plan_shard(self._schedule(d), d.version, existing), data=d))
        return Plan(shards, self.store.pending_deletions())

    def _job(self, plan: ShardPlan) -> ShardJob | None:
        """The job of a planned shard (its planned records, never a later read of them), or
        None if its resume checkpoint is gone (a deletion reached the shard: plan it again)."""
        data = plan.data if plan.data is not None else self.data.get([plan.shard])[plan.shard]
        resume = None
        if plan.resume_key is not None:
            row = self.store.checkpoint(plan.resume_key)
            if row is None:
                return None
            resume = read_checkpoint(self.store, row)
        if data.model_inputs is None:
            data.model_inputs = self.features.model_inputs(data.inputs, data.contexts)
        return ShardJob(
            schedule=plan.schedule,
            training=self.config.training,
            spec=self.backend.spec,
            seed=self.config.partition.seed,
            device=self.config.execution.device,
            config_digest=self.config_digest,
            inputs=data.model_inputs,
            targets=data.targets,
            start_slice=plan.start_slice or 0,
            resume=resume,
        )

    def _intact(self, row: CheckpointRow) -> bool:
        try:
            self.store.verify_files(row)
            read_checkpoint(self.store, row)
        except (CheckpointFileError, CheckpointError):
            return False
        return True

    def retrain(self, plan: Plan, report: TrainingReport, description: str,
                blocked: dict[int, str] | None = None) -> list[ShardResult]:
        """Train what the plan says; each shard's checkpoints are registered as soon as it
        finishes, unless a deletion reached the shard meanwhile (then it is planned again). A
        shard whose resume checkpoint fails its verification joins `blocked` (it is never built
        on); the others train."""
        todo = plan.todo
        jobs = []
        for p in todo:
            try:
                job = self._job(p)
            except CheckpointError as exc:
                if blocked is None:
                    raise
                blocked[p.shard] = str(exc).splitlines()[0]
                continue
            if job is not None:
                jobs.append(job)
        versions = {p.shard: p.version for p in todo}
        on_epoch, on_result = self._training_progress(description, jobs)
        results = []
        for result in run_jobs(jobs, self.config.execution, self.backend,
                               **({"on_epoch": on_epoch} if on_epoch is not None else {})):
            for c in result.checkpoints:
                row = self.store.register_checkpoint(
                    c.shard, versions[c.shard], c.key, c.slice, c.manifest.parent, c.blobs(),
                    WEIGHTS, c.manifest.record_count)
                if row is None:
                    break  # the shard changed while it trained
                report.checkpoints_written += 1
            results.append(result)
            if on_result is not None:
                on_result(result)
        return results

    def _training_progress(self, description: str, jobs: Sequence[ShardJob]) -> tuple[
            Callable[[ShardJob, int, int], None] | None, Callable[[ShardResult], None] | None]:
        """Progress of these jobs: in this process, a tick per epoch saying which shard, slice and
        epoch trains next; in Ray tasks (other processes), a tick per shard as it finishes."""
        if self.progress is None or not jobs:
            return None, None
        slices, epochs = self.config.partition.slices, self.config.training.epochs_per_slice
        if self.config.execution.executor == "ray":
            tick = self.progress(f"{description} (Ray tasks: counted as shards finish)", len(jobs))
            return None, lambda r: tick(f"shard {r.shard} done ({len(r.checkpoints)} slices)")
        steps = [f"shard {job.shard} ({i}/{len(jobs)}), slice {k + 1}/{slices}, epoch {e + 1}/{epochs}"
                 for i, job in enumerate(jobs, 1) for k in range(job.start_slice, slices)
                 for e in range(epochs)]
        first, done = {}, 0  # a job's first step in `steps`
        for job in jobs:
            first[job.shard], done = done, done + (slices - job.start_slice) * epochs
        tick = self.progress(description, len(steps))

        def epoch_done(job: ShardJob, slice_: int, epoch: int) -> None:
            following = first[job.shard] + (slice_ - job.start_slice) * epochs + epoch + 1
            tick(steps[following] if following < len(steps) else "done")

        return epoch_done, None

    def commit(self, plan: Plan, retrains: Mapping[int, ShardRetrain], started: float,
               blocked: Collection[int] = ()) -> tuple[Committed, list[DeletionReceipt]]:
        """One transaction: swap in every planned shard whose final checkpoint is registered and
        whose records did not change meanwhile, and mark applied (with receipts) the pending
        deletions whose shards are then all current. A receipt vouches for no `blocked` shard's
        (damaged) checkpoint."""
        existing = {c.key: c for c in self.store.checkpoints()}
        commits = {p.shard: ShardCommit(p.version, p.schedule.keys[-1], frozenset(p.schedule.keys))
                   for p in plan.shards if p.schedule.keys[-1] in existing}
        after = {s: row.sha256 for s, row in self.store.live().items() if s not in blocked}
        after.update({s: existing[c.live_key].sha256 for s, c in commits.items()})
        seconds = round(time.perf_counter() - started, 4)
        receipts = {r.request_id: _receipt(r, retrains, after, seconds, self.config_digest,
                                           recovered=r.request_id not in self.acknowledged)
                    for r in plan.requests}
        done = self.store.commit(commits, {rid: rc.ledger_dict() for rid, rc in receipts.items()})
        self.store.sweep()  # the files of what the transaction unregistered
        # The receipts as the ledger chained them, with the ids in clear this manager kept (and
        # lets go of now that they are applied).
        return done, [DeletionReceipt.from_ledger(done.receipts[rid], self.acknowledged.pop(rid, ()))
                      for rid in done.applied]

    def update(self, description: str,
               receipts: list[DeletionReceipt] | None = None) -> TrainingReport:
        """Plan, retrain and commit until every shard is current and every deletion applied; the
        report's `deletions_applied` are the receipts. `receipts`: a list each receipt also joins
        as its deletion commits (a caller keeps them if a later round fails). The seconds (a
        receipt's too) count from after the process set-up for training."""
        if self.config.execution.executor != "ray":  # a Ray task sets up its own process
            from sisa.training.shard_trainer import setup_process  # torch, now that it trains

            setup_process(self.config.training.torch_threads, self.config.execution.device)
        started = time.perf_counter()
        report = TrainingReport()
        receipts = receipts if receipts is not None else []
        first = len(receipts)
        retrains: dict[int, ShardRetrain] = {}
        with self.store.writer():
            report.healed = self.heal()
            blocked = self.damaged_live()
            for _ in range(_MAX_ROUNDS):
                plan = self.plan(blocked)
                if not plan.shards and not plan.requests:
                    break
                starts = {p.shard: p.start_slice or 0 for p in plan.todo}
                for result in self.retrain(plan, report, description, blocked):
                    _record_retrain(retrains, result, starts[result.shard])
                committed, applied = self.commit(plan, retrains, started, blocked)
                receipts += applied
                report.checkpoints_dropped += committed.dropped
                live = self.store.live()
                report.live.update({s: live[s].sha256 for s in committed.shards})
                if not committed.shards and not applied and not plan.todo:
                    break  # what is left waits on blocked shards
            else:
                raise StoreError(f"the store's records kept changing over {_MAX_ROUNDS} rounds of "
                                 "retraining; try again when the deletions have settled")
            self.store.catch_up_witness()
        report.retrained = [retrains[s] for s in sorted(retrains)]
        report.seconds = time.perf_counter() - started
        report.deletions_applied = receipts[first:]
        report.blocked = dict(sorted(blocked.items()))
        return report

    def heal(self) -> list[str]:
        """Before a writer plans: bring the store to a state it may build on, where that is safe
        to do unasked, and say what was done. A link anywhere in the store stops the writer (only
        `repair` removes links). Removes files a crash left; checks that a witnessed store got
        its witness; rebuilds a journal that was cut, removed or damaged (from the ledger and the
        witness); applies again the deletions the journal or the witness holds and the database
        lacks (a lost WAL, a restored backup); deletes again a deleted record that reappeared;
        marks applied a deletion whose sound receipt was reset to pending; truncates an owed WAL."""
        store = self.store
        links = store.symlinks()
        if links:
            raise DamagedStoreError(
                f"the store holds symbolic links ({name_some(links)}): nothing is written through "
                "one, so this writer stops; repair the store (it removes them and rebuilds what "
                "they replaced)")
        store.sweep()
        store.require_witness()
        healed = [f"rebuilt the deletion journal ({', '.join(wrong)})"
                  for wrong in [store.rebuild_journal()] if wrong]
        replayed = store.replay_journal()
        if replayed:
            healed.append(f"applied again {len(replayed)} deletion(s) the database lacked: "
                          f"{name_some(replayed)}")
        back = store.retombstone()
        if back:
            healed.append(f"deleted again {len(back)} record(s) that reappeared after their deletion")
        reset = store.reset_receipts()
        if reset:
            healed.append(f"marked applied again {len(reset)} deletion(s) whose receipt was reset "
                          f"to pending: {name_some(reset)}")
        if store.scrub_owed():
            store.scrub()
        return healed

    def damaged_live(self) -> dict[int, str]:
        """Shards whose live checkpoint fails its seal or its files, or was trained on another
        number of records than its shard holds (a row inserted or removed by hand, not through
        the store): never built on, never vouched for in a receipt; each, with why."""
        out = {}
        counts = self.store.record_counts()
        shards = self.store.shards()
        for s, row in self.store.live().items():
            held = counts.get(s, {"live": 0})["live"]
            if shards[s].current and held != row.record_count:
                out[s] = (f"it holds {held} live records, and its live checkpoint was trained on "
                          f"{row.record_count}: a record was inserted or removed by hand")
                continue
            if not self.store.sealed(row):
                out[s] = "its live checkpoint's registration does not match its seal (it was altered)"
                continue
            try:
                self.store.verify_files(row)
            except CheckpointFileError as exc:
                out[s] = str(exc)
        return out


def _record_retrain(retrains: dict[int, ShardRetrain], result: ShardResult, start: int) -> None:
    done = ShardRetrain(result.shard, start, result.samples, round(result.seconds, 4),
                        result.attempts, result.node)
    earlier = retrains.get(result.shard)
    if earlier is not None:  # retrained again in this run (a deletion reached it meanwhile)
        done = ShardRetrain(result.shard, min(start, earlier.start_slice), earlier.samples + done.samples,
                            round(earlier.seconds + done.seconds, 4), done.attempts, done.node)
    retrains[result.shard] = done


def _receipt(request: DeletionRow, retrains: Mapping[int, ShardRetrain], after: Mapping[int, str],
             seconds: float, config_digest: str, recovered: bool) -> DeletionReceipt:
    affected = [retrains[s] for s in request.shards if s in retrains]
    before = {**after, **request.before}
    return DeletionReceipt(
        request_id=request.request_id,
        record_ids=[],
        already_deleted=[],
        affected_shards=[{"shard": r.shard, "start_slice": r.start_slice, "samples": r.samples,
                          "seconds": r.seconds} for r in affected],
        samples_retrained=sum(r.samples for r in affected),
        seconds=seconds,
        checkpoints_changed={str(s): {"before": before.get(s), "after": after.get(s)}
                             for s in sorted(after) if before.get(s) != after.get(s)},
        checkpoints_unchanged={str(s): sha for s, sha in sorted(after.items())
                               if before.get(s) == sha},
        recovered=recovered,
        record_digests=request.record_ids,  # the ledger keeps keyed digests only
        config_digest=config_digest,
        requested_at=request.requested_at,
    )
