"""The library's front door: `Sisa` trains a store, serves it, forgets, adds, audits and reports.

The CLI and the HTTP service are thin shells over these methods, and so are the workflows
(`sisa.workflows`): nothing outside reaches past `Sisa` into the store or the deletion manager,
which stay private. Errors of the store below (`shard_store`) become the matching `SisaError` here.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import gc
import hashlib
import importlib
import json
import math
import sys
import threading
import time
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, ParamSpec, TypeVar

import numpy as np

from shard_store import CheckpointRow, NewRecord, RecordRow, ShardStore
from sisa import builtin
from sisa.audit import audit, verify_receipts
from sisa.config import COMBINES, Combine, DataSpec, ExecutionConfig, SisaConfig, StoreConfig
from sisa.custody import new_key, open_store, read_key_file, write_key_file
from sisa.errors import (
    CheckpointMovedError,
    ColumnError,
    ConfigError,
    DamagedStoreError,
    InputKindError,
    NoServableShardError,
    RecordError,
    StoreError,
    UnknownReceiptError,
    name_some,
)
from sisa.features import Features
from sisa.inputs import model_input
from sisa.intake import Placer
from sisa.models import prepare_model
from sisa.records import Batch, Ingest, load_records, paused_gc, refuse_new_columns, unused_columns, wanted
from sisa.reports import (
    AuditReport,
    EvaluationReport,
    Generation,
    ReceiptsReport,
    RecordScore,
    ScoreReport,
    StatusReport,
)
from sisa.schedule import ShardSchedule
from sisa.serving.ensemble import Ensemble
from sisa.serving.loader import Loader, read_checkpoint, store_fetch
from sisa.shard_data import ShardData
from sisa.sources import rows_of
from sisa.status import CONFIG_DIGEST, quick_status, servable, store_errors, store_status
from sisa.tasks import ClassificationTask, LanguageModelingTask, ModelSpec, task_from_meta
from sisa.training import MODEL_FREE, LazyBackend, resolve_backend
from sisa.training.protocol import Backend, ShardModel
from sisa.unlearning import (
    DeletionManager,
    DeletionReceipt,
    DeletionRequest,
    Progress,
    TrainingReport,
)

P = ParamSpec("P")
R = TypeVar("R")
_JOURNAL_POLL = 0.01  # seconds between looks at a journalled deletion still reaching the database
_MOVED_RETRIES = 20  # reloads when a live checkpoint keeps changing while it is read


def _mapped(method: Callable[P, R]) -> Callable[P, R]:
    """The boundary: errors of the store (and of SQLite under it) become the matching
    `SisaError`."""
    @functools.wraps(method)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        owner = args[0] if args else None
        root = owner.root if isinstance(owner, Sisa) else (args[1] if len(args) > 1 else "")
        with store_errors(repr(str(Path(str(root)) / "store.db"))):
            return method(*args, **kwargs)
    return wrapper


def resolve_source(source: Any, spec: DataSpec | None) -> tuple[list[dict[str, Any]], DataSpec]:
    """Rows and column spec of a data source; built-ins bring their own spec. For small inputs:
    `data_source` reads large ones a chunk at a time."""
    source, spec = data_source(source, spec)
    return rows_of(source, wanted(spec)), spec


def preload_torch() -> None:
    """Import torch (about a second of a fresh process) on a helper thread while this one reads
    the data, opens the store or acknowledges a deletion, which need none of it and leave the
    GIL free part of the time (Arrow's parsing, SQLite, hashing, fsyncs); the trainer's own
    import then finds it loaded, or waits for the helper to finish it. (torch._dynamo, which
    `torch.optim` would import, is never needed: `sisa.training.optim`.)"""
    if "torch" not in sys.modules and _PRELOADING.acquire(blocking=False):
        threading.Thread(target=importlib.import_module, args=("torch",), daemon=True,
                         name="sisa-import-torch").start()


# Taken (and kept) by the first call that starts the helper: one helper per process, where a
# second (`forget` after `open`) only waited on the first's import locks.
_PRELOADING = threading.Lock()


def data_source(source: Any, spec: DataSpec | None) -> tuple[Any, DataSpec]:
    """What to read (a built-in becomes its rows) and the column spec."""
    if builtin.is_builtin(source):
        rows, builtin_spec = builtin.load_builtin(str(source))
        return rows, spec or builtin_spec
    if spec is None:
        raise ColumnError("name the data's columns (a DataSpec): its id, label and text or features")
    return source, spec


def serving_device(execution: ExecutionConfig) -> str:
    """Where the ensemble runs: the GPU when the execution config asks for one (gpus_per_shard)
    and one is visible, else the CPU."""
    if execution.device != "cuda":
        return "cpu"
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _check_data(config: SisaConfig, spec: DataSpec) -> DataSpec:
    """The spec a backend trains on: a causal LM learns text, not labels; the input kind matches."""
    if config.training.task == LanguageModelingTask.kind and spec.label_column is not None:
        spec = dataclasses.replace(spec, label_column=None)
    if config.training.task != LanguageModelingTask.kind and spec.prompt_column is not None:
        raise ConfigError(f"a prompt column ({spec.prompt_column!r}) is for the causal_lm "
                          f"backend; backend {config.training.backend!r} learns labels")
    if config.training.task != LanguageModelingTask.kind and spec.messages_column is not None:
        raise ConfigError(f"a messages column ({spec.messages_column!r}) is for the causal_lm "
                          f"backend; backend {config.training.backend!r} learns labels of texts: "
                          "give a text column")
    if config.training.input_kind != spec.kind:
        need = "a text column" if config.training.input_kind == "text" else "numeric feature columns"
        raise InputKindError(
            f"backend {config.training.backend!r} needs {need}; the data has "
            f"{'a text column' if spec.kind == 'text' else 'feature columns'}")
    return spec


def conversation_problems(backend: Backend, batch: Batch) -> list[str]:
    """The records of a batch of conversations (a store trained on a messages column) that the
    model's chat template refuses, named, before any is written; [] for other stores."""
    if not backend.spec.chat:
        return []
    encoder: Any = backend.encoder
    refused = encoder.check_conversations(batch.inputs)
    if not refused:
        return []
    model = getattr(backend.config, "model", "")
    return [f"the chat template of model {model!r} refuses record(s) "
            + name_some([f"{batch.ids[i]!r} ({why})" for i, why in refused[:5]], total=len(refused))]


def _probe_backend(config: SisaConfig, spec: DataSpec) -> Backend:
    """The backend, checked before any store is written: its model resolves (never downloaded),
    is fingerprinted, and fits the config (a causal LM's layers against top-k: this loads it).
    Its shape is provisional for a classifier (the classes are known once the data was read)."""
    task = LanguageModelingTask(chat=spec.messages_column is not None) \
        if config.training.task == LanguageModelingTask.kind else None
    shape = task.model_spec(None) if task is not None else ModelSpec(num_classes=2, input_dim=(
        len(spec.feature_columns) if spec.kind == "features" else None))
    if config.training.backend in MODEL_FREE:  # nothing to check; torch is imported meanwhile
        return LazyBackend(config.training, shape)
    backend = resolve_backend(config.training, shape)
    backend.fingerprint()
    validate = getattr(backend, "validate", None)
    if validate is not None:
        validate()
    return backend


class Sisa:
    """A SISA store on disk: create it with `Sisa.train`, reopen it with `Sisa.open`.

    Fitted state, read from the store: `classes_`; `training_report_` after `train`;
    `recovered_`, the receipts of deletions that opening it finished."""

    def __init__(self, store: ShardStore, execution: ExecutionConfig | None = None,
                 progress: Progress | None = None, backend: Backend | None = None) -> None:
        """Open the task, backend and deletion manager of a store (`backend`: one resolved
        already for this store's config)."""
        self._store = store
        config = SisaConfig.from_dict(store.get_meta("config"))
        self.config = config if execution is None else config.replace(execution=execution)
        self.data_spec = DataSpec(**store.get_meta("data_spec"))
        self.task = task_from_meta(store.get_meta("task"))
        # Built on first use: the audit, the receipts and the status need no model (nor torch).
        self._backend = backend or LazyBackend(self.config.training,
                                               ModelSpec(**store.get_meta("model_spec")))
        self._progress = progress
        self._features = Features(store, self._backend, progress)
        self._manager = DeletionManager(store, self.task, self._backend, self._features, self.config,
                                        config_digest(self.config, self._backend), progress)
        self._loader = Loader(self._backend, self._features, self.config.partition.seed,
                              functools.partial(serving_device, self.config.execution),
                              store_fetch(store))
        self.training_report_ = TrainingReport()  # what `train` did (nothing, for a store opened)
        self.recovered_: list[DeletionReceipt] = []
        # Damage that opening (recovering) found and did not build on: the rest was recovered.
        self.damage_: DamagedStoreError | None = None

    @property
    def root(self) -> Path:
        """The store's directory."""
        return self._store.root

    @property
    def config_digest(self) -> str:
        """Digest of the config and base model every checkpoint and receipt names."""
        return self._manager.config_digest

    @property
    def classes_(self) -> list[str]:
        """The classes (empty for a causal LM)."""
        return list(self.task.classes) if isinstance(self.task, ClassificationTask) else []

    @property
    def n_features_in_(self) -> int | None:
        """How many numeric features the model reads (None for a text model)."""
        return len(self.data_spec.feature_columns) if self.data_spec.kind == "features" else None

    @property
    def feature_names_in_(self) -> list[str]:
        """The feature columns the model reads, in order (or its text column)."""
        spec = self.data_spec
        return list(spec.feature_columns) if spec.kind == "features" else [str(spec.input_column)]

    @property
    def encoder(self) -> Any:
        """The frozen encoder whose (cached) outputs the shards train on, or None."""
        return self._backend.encoder

    def _classifier(self) -> ClassificationTask:
        if not isinstance(self.task, ClassificationTask):
            raise InputKindError("this store holds a causal LM: it has no classes to predict; use "
                                 "generate or score")
        return self.task

    def require_language_model(self) -> None:
        """Raise unless this store holds a causal LM."""
        if not isinstance(self.task, LanguageModelingTask):
            raise InputKindError("this store holds a classifier: generate, score, canaries and "
                                 "prove need a store trained with the causal_lm backend")

    # -- creation and opening --------------------------------------------------------------------

    @classmethod
    @_mapped
    def train(
        cls,
        store_dir: str | Path,
        source: Any,
        config: SisaConfig,
        spec: DataSpec | None = None,
        progress: Progress | None = None,
        embeddings_from: str | Path | None = None,
        store_config: StoreConfig | None = None,
    ) -> Sisa:
        """Validate the data, create the store, and train every shard from scratch; the report is
        `training_report_`. `embeddings_from` seeds the embedding cache from another store (same
        keys, same vectors), so a second store on the same texts never re-encodes them.
        `store_config` (or the environment): a key file keeps the store's key outside it (a new
        key is written there if the file does not exist), a witness path starts its witness."""
        started = time.perf_counter()
        preload_torch()  # while the data is read, which leaves the GIL free much of the time
        custody = store_config if store_config is not None else StoreConfig().resolved()
        key = None
        if custody.key_file is not None:
            key = read_key_file(custody.key_file) if Path(custody.key_file).exists() else new_key()
        source, spec = data_source(source, spec)
        spec = _check_data(config, spec)
        begun = time.perf_counter()
        prepare_model(getattr(config.training, "model", None), progress)  # a packaged model, once
        probe = _probe_backend(config, spec)  # a bad model fails here, before anything is written
        backend_seconds = time.perf_counter() - begun
        ingest = Ingest(source, spec)
        placer = Placer(config.partition, keep=True)

        def placed() -> Iterator[list[NewRecord]]:
            """The input, validated and placed a chunk at a time, as the store writes it."""
            for batch in ingest:
                refused = conversation_problems(probe, batch)
                if refused:
                    raise RecordError("invalid records (nothing was written): " + "; ".join(refused))
                yield placer.place(batch)
            placer.finish()
            placer.check_partition()  # no shard or slice that nothing could fill

        built: dict[str, Backend] = {}

        def meta() -> dict[str, Any]:
            """Once every record is read (cheap: the model was checked above): the task, with its
            classes, and the backend of that shape."""
            task: ClassificationTask | LanguageModelingTask
            if config.training.task == LanguageModelingTask.kind:
                task = LanguageModelingTask(chat=spec.messages_column is not None)
            else:
                task = ClassificationTask.fit(sorted(placer.labels, key=lambda x: (x is None, x or "")))
            shape = task.model_spec(len(spec.feature_columns) if spec.kind == "features" else None)
            backend = probe if shape == probe.spec else resolve_backend(config.training, shape)
            built["backend"] = backend
            # The columns the training data had and the spec does not read: `add` accepts these,
            # and refuses any other column rather than drop it silently.
            return {"config": config.to_dict(), "data_spec": spec.to_dict(), "task": task.to_meta(),
                    "model_spec": dataclasses.asdict(backend.spec),
                    CONFIG_DIGEST: config_digest(config, backend),  # status reads it, with no model
                    "unused_columns": unused_columns(ingest, spec)}

        # Millions of small objects are made, and most kept: the cycle collector (which finds
        # no cycle in them) would walk them again and again; it runs once, below.
        if key is not None and not Path(str(custody.key_file)).exists():
            write_key_file(str(custody.key_file), key)  # kept before any digest is made with it
        with paused_gc():
            store = ShardStore.create(store_dir, meta, placed(), config.partition.shards, key=key,
                                      witness=Path(custody.witness) if custody.witness else None)
        # Reading, validating, placing and writing every record (the backend's set-up aside).
        ingest_seconds = time.perf_counter() - started - backend_seconds
        if embeddings_from is not None:
            store.copy_embeddings_from(embeddings_from)
        sisa = cls(store, config.execution, progress, built["backend"])
        sisa._first_training(placer, store.created_versions, ingest_seconds)
        return sisa

    def _first_training(self, placer: Placer, versions: Mapping[int, int], ingest_seconds: float) -> None:
        """Train a store just created: on the records placed (kept in memory when they fit, so
        they are not read back), every shard from scratch."""
        if placer.kept is not None:
            self._manager.data.keep(placer.kept, versions)
            placer.kept = None
        # Ingestion made and dropped millions of tracked objects: collect them once now, rather
        # than have the cycle collector walk them again and again during training.
        gc.collect()
        report = self._manager.update("training shards")
        report.ingest_seconds = ingest_seconds
        report.records = placer.records
        report.warnings += placer.warnings()
        self.training_report_ = report
        self._built(report)

    def _built(self, report: TrainingReport) -> TrainingReport:
        """A writer's report, or DamagedStoreError if the store holds damage the writer did not
        build on (its work on the rest is done): damaged shards, a broken receipt chain, files
        that are not the store's. The message says what was applied and what is blocked."""
        problems = [f"shard {s}: {why}" for s, why in report.blocked.items()]
        chain = verify_receipts(self._store, self.config_digest, tail=2).problems
        problems += [f"the receipt chain: {p}" for p in chain[:3]]
        strays = self._store.stray_files()
        if strays:
            problems.append(f"files in the store directory that are not the store's (they may hold "
                            f"a deleted record): {name_some(strays)}")
        if not problems:
            return report
        applied = [r.request_id for r in report.deletions_applied]
        done = f"deletion(s) {name_some(applied)} applied; " if applied else ""
        pending = [d.request_id for d in self.pending()]
        waiting = f"deletion(s) {name_some(pending)} wait on the damaged shards; " if pending else ""
        raise DamagedStoreError(f"{done}{waiting}the store is damaged, and nothing was built on the "
                                f"damage: {'; '.join(problems)}", report.blocked, applied)

    @classmethod
    @_mapped
    def open(cls, store_dir: str | Path, execution: ExecutionConfig | None = None,
             progress: Progress | None = None, recover: bool = True,
             read_only: bool = False, share_with: Sisa | None = None,
             store_config: StoreConfig | None = None) -> Sisa:
        """Open a store. With `recover` (a writer), finish whatever a crash interrupted (the
        receipts are `recovered_`); without, change nothing (see `tidy`). `read_only`: never
        write the database (serving, status and the audit work on a store this process may
        not write); it cannot recover. `share_with`: another `Sisa` of the same store in this
        process, whose backend (its base model and encoder, once loaded) this one shares.
        `store_config` (or the environment): where the store's key and witness are kept."""
        if read_only and recover:
            raise ConfigError("a store opened read-only cannot recover: pass recover=False")
        if share_with is not None and Path(store_dir).resolve() != share_with.root.resolve():
            raise ConfigError(f"share_with is a Sisa of {str(share_with.root)!r}, not of "
                              f"{str(store_dir)!r}")
        if not read_only:
            preload_torch()  # a writer is about to train, most likely
        sisa = cls(open_store(store_dir, read_only, store_config), execution, progress,
                   share_with._backend if share_with is not None else None)
        if recover:
            receipts: list[DeletionReceipt] = []
            try:
                sisa.recover(receipts)
            except DamagedStoreError as exc:  # the rest was recovered; say so, keep it open
                sisa.damage_ = exc
            sisa.recovered_ = receipts
        return sisa

    @_mapped
    def copy(self, directory: str | Path) -> Sisa:
        """A copy of this store at `directory` (which must not exist), opened: whatever it then
        does (a deletion, to measure it) never reaches this store, its ledger or its witness (a
        store that keeps one gets a copy beside the new directory). It shares this one's loaded
        models and progress hook; anything a crash left undone in the copy is finished as
        `open` would."""
        target = Path(directory)
        witness = target.parent / f"{target.name}.witness"
        copied = Sisa(self._store.copy_to(target, witness), self.config.execution, self._progress,
                      self._backend)
        receipts: list[DeletionReceipt] = []
        copied.recover(receipts)
        copied.recovered_ = receipts
        return copied

    @staticmethod
    def read_status(store_dir: str | Path, store_config: StoreConfig | None = None) -> StatusReport:
        """A store's status without loading any model (an old store that did not record its
        config digest is opened read-only, its backend resolved). Tidies, like any reader."""
        found = quick_status(store_dir, store_config)
        if found is not None:
            return found
        with Sisa.open(store_dir, recover=False, read_only=True, store_config=store_config) as sisa:
            sisa.tidy()
            return sisa.status()

    @_mapped
    def tidy(self) -> list[str]:
        """Remove files a crash left under checkpoints/ that the database does not register (they
        may derive from a deleted record), unless a writer is at work (it removes them before it
        lets go). Cheap: readers do it on opening. Returns the paths removed."""
        return self._store.tidy()

    def close(self) -> None:
        self._store.close()

    def __enter__(self) -> Sisa:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- the deletion lifecycle ------------------------------------------------------------------

    @_mapped
    def move_key_out(self, key_file: str | Path) -> None:
        """Keep this store's ledger key outside it, in `key_file` (a new file only its owner may
        read, written and fsynced first): from then on opening the store needs the key file, and
        whoever can write the database cannot re-seal a checkpoint."""
        store = self._store
        with store.writer():
            if store.key_outside:
                raise ConfigError(f"the key of {str(self.root)!r} is kept outside it already")
            write_key_file(key_file, store.key)
            store.move_key_out()

    @_mapped
    def request_deletion(self, ids: Sequence[str] | None = None, group: str | None = None,
                         keep_ids: bool = True) -> DeletionRequest:
        """Acknowledge a deletion of records by id, or of a whole group: durable when this returns,
        before any training; the affected shards stop serving until it is applied. With
        `keep_ids=False` this object keeps no id in clear (a long-lived service's choice): the
        receipt of its application then lists none, like one applied by another process."""
        return self._manager.request_deletion(ids, group, keep_ids=keep_ids)

    @_mapped
    def pending(self) -> list[DeletionRequest]:
        """Deletions acknowledged but not applied."""
        return self._manager.pending()

    @_mapped
    def lost_deletions(self) -> list[str]:
        """Request ids of deletions the deletion journal holds and the database lacks (its WAL
        was lost, or it was restored from a backup): the next writer applies them again, and
        until then nothing serves."""
        return [e["request_id"] for e in self._store.journal_missing()]

    @_mapped
    def scrub(self) -> bool:
        """Truncate the WAL if a truncation after a deletion is still owed (a reader kept it from
        completing then); True once none is owed."""
        return self._store.scrub_owed() is None or self._store.scrub()

    @_mapped
    def clean_shards(self) -> set[int]:
        """Shards with no acknowledged deletion pending against them (any process may ask)."""
        return self._manager.clean_shards()

    @_mapped
    def apply_pending(self, receipts: list[DeletionReceipt] | None = None) -> list[DeletionReceipt]:
        """Retrain the shards of every pending deletion and swap them in; returns the receipts.
        `receipts`: a list each receipt joins as its deletion commits, so a caller keeps those of
        a run that fails after committing some."""
        return self._built(self._manager.update("applying deletions", receipts)).deletions_applied

    @_mapped
    def forget(self, record_ids: Sequence[str]) -> DeletionReceipt:
        """Forget records by id: acknowledge, then apply; returns once the affected shards are
        retrained and swapped in."""
        preload_torch()  # while the deletion is validated and made durable
        return self._forget(self._manager.request_deletion(ids=record_ids))

    @_mapped
    def forget_group(self, group_id: str) -> DeletionReceipt:
        """Forget every record of a group (e.g. a user)."""
        preload_torch()
        return self._forget(self._manager.request_deletion(group=group_id))

    def _forget(self, request: DeletionRequest) -> DeletionReceipt:
        if not request.request_id:
            return DeletionReceipt("", [], request.already_deleted, [], 0, 0.0, {}, {})
        mine = [r for r in self.apply_pending() if r.request_id == request.request_id]
        if mine:
            return dataclasses.replace(mine[0], already_deleted=request.already_deleted)
        # Another process's writer applied it first (it waited for the lock meanwhile): the
        # receipt that writer built is in the ledger.
        row = self._store.deletion(request.request_id)
        if row is None or row.receipt is None:
            raise StoreError(f"deletion {request.request_id} was not applied")
        return DeletionReceipt.from_ledger(row.receipt, request.record_ids, request.already_deleted)

    @_mapped
    def add(self, source: Any) -> TrainingReport:
        """Add new records; each affected shard retrains from its earliest affected slice."""
        source, spec = data_source(source, self.data_spec)
        ingest = Ingest(source, spec)
        known = self._store.get_meta("unused_columns")
        # A store trained before its columns were kept: accept what it would have (unknown).
        refuse_new_columns(ingest, spec, unused_columns(ingest, spec) if known is None else known)
        store = self._store
        # Checked under the lock: a concurrent `add` cannot slip the same ids or groups in between.
        with store.writer():
            placer = Placer(self.config.partition)

            def placed() -> Iterator[list[NewRecord]]:
                problems: list[str] = []
                for batch in ingest:
                    existing = store.find_records(batch.ids)
                    if existing:
                        problems.append(f"ids already in the store (live or deleted): "
                                        f"{sorted(existing)[:10]}")
                    problems += self.task.check_new(batch.targets)
                    problems += conversation_problems(self._backend, batch)
                    if problems:
                        raise RecordError("cannot add records (nothing was written): "
                                          + "; ".join(problems))
                    fresh = sorted({g for g in batch.groups if g is not None} - set(placer.group_shard))
                    placer.group_shard.update(store.group_shards(fresh))
                    yield placer.place(batch)
                placer.finish()

            return self._built(self._manager.add(placed()))

    @_mapped
    def repair(self, shards: Sequence[int] | None = None, from_scratch: bool = False) -> TrainingReport:
        """Retrain shards (default: all) from their first missing or damaged checkpoint, or from
        scratch, and finish any pending deletion; the result is bit-identical to what the store
        held before the damage. The receipts of deletions applied are `deletions_applied`."""
        count = self.config.partition.shards
        wanted = list(range(count)) if shards is None else list(shards)
        bad = [s for s in wanted if not 0 <= s < count]
        if bad:
            raise ConfigError(f"no shard(s) {bad} in this store: it has shards 0..{count - 1}")
        return self._built(self._manager.repair(wanted, from_scratch))

    # Crash recovery is applying what is pending: finish interrupted deletions, additions,
    # training, and remove files left over; returns the receipts of the deletions applied.
    recover = apply_pending

    # -- what the store holds --------------------------------------------------------------------

    @_mapped
    def records(self, ids: Sequence[str]) -> dict[str, RecordRow]:
        """The stored rows of these ids that exist (live, or the tombstones of deleted ones: a
        tombstone holds keyed digests, never the content), by the id given."""
        return self._store.find_records(ids)

    @_mapped
    def live_records(self, shard: int | None = None) -> Iterator[RecordRow]:
        """Live records (of one shard, or all) in training order: by shard, slice, order key."""
        yield from self._store.live_records(shard)

    @_mapped
    def texts(self, ids: Sequence[str]) -> dict[str, tuple[str, str | None]]:
        """(text, prompt or label) of the live text records among `ids`. A conversation's text
        (a store trained on a messages column) is its messages as canonical JSON, which
        `lm_inputs` and `model_inputs` take as they are."""
        return self._store.record_texts(ids)

    @_mapped
    def groups(self) -> list[str]:
        """The groups (users) of live records, sorted."""
        return self._store.groups()

    @_mapped
    def group_ids(self, group: str) -> list[str]:
        """The ids of a group's live records."""
        return self._store.group_record_ids(group)

    def id_digest(self, record_id: str) -> str:
        """The keyed digest the ledger, receipts and tombstones keep of a record id."""
        return self._store.id_digest(record_id)

    @_mapped
    def deletion(self, request_id: str) -> DeletionRequest | None:
        """One deletion request (pending or applied, with its receipt once applied), or None."""
        row = self._store.deletion(request_id)
        return None if row is None else DeletionRequest.from_row(row)

    @_mapped
    def deletions(self, status: str | None = None) -> list[DeletionRequest]:
        """Deletion requests (of one status: pending or applied), oldest first."""
        rows = self._store.pending_deletions() if status == "pending" else self._store.deletions()
        return [DeletionRequest.from_row(r) for r in rows if status is None or r.status == status]

    @_mapped
    def receipts(self) -> list[DeletionReceipt]:
        """The receipts of applied deletions, in the order they were applied."""
        chained = [r.receipt for r in self._store.deletions() if r.receipt is not None]
        chained.sort(key=lambda r: r.get("sequence") or 0)
        return [DeletionReceipt.from_ledger(r) for r in chained]

    @_mapped
    def shard_data(self, shards: Iterable[int] | None = None, fresh: bool = False) -> dict[int, ShardData]:
        """Each shard's live records as its model trains on them (training order, inputs, targets),
        kept in memory while the shard is unchanged (`fresh`: read from the store again)."""
        wanted = range(self.config.partition.shards) if shards is None else shards
        return self._manager.data.get(sorted(set(wanted)), fresh=fresh)

    @_mapped
    def schedules(self, shards: Iterable[int] | None = None) -> dict[int, ShardSchedule]:
        """Each shard's slice schedule: its records by slice, and each slice checkpoint's key."""
        wanted = range(self.config.partition.shards) if shards is None else shards
        return self._manager.schedules(wanted)

    def clear_cache(self) -> None:
        """Let go of the shard records kept in memory, as a fresh process has none: the next
        retrain reads them from the store."""
        self._manager.data.clear()

    @_mapped
    def checkpoints(self, shard: int | None = None) -> list[CheckpointRow]:
        """Registered slice checkpoints (of one shard, or all), by shard and slice; `path` is
        relative to `root`."""
        return self._store.checkpoints(shard)

    @_mapped
    def live_checkpoints(self) -> dict[int, CheckpointRow]:
        """Each shard's live checkpoint (a shard with a deletion pending has none)."""
        return self._store.live()

    # -- serving ---------------------------------------------------------------------------------

    @_mapped
    def servable(self, wait: float = 0.0) -> dict[int, str]:
        """shard -> weights sha256 of each live checkpoint that may serve: non-empty, with no
        deletion pending. Nothing while the deletion journal holds a deletion the database lacks
        (which shards it touches is unknown until a writer applies it again); that is almost
        always an acknowledgement committing this moment (the journal is written first), so this
        waits up to `wait` seconds for it. A journal found complete before the database is read
        means every deletion acknowledged by then is in what is read."""
        store = self._store
        deadline = time.monotonic() + wait
        while store.journal_missing():
            if time.monotonic() >= deadline:
                return {}
            time.sleep(_JOURNAL_POLL)
        live = {s: row.sha256 for s, row in servable(store, journal=False).items()}
        return {s: sha for s, sha in live.items() if s not in self._loader.unservable(live)}

    def change_counter(self) -> int:
        """A number that grows whenever what `servable`, `unservable` or `excluded` read may have
        changed: a commit to the store by any process, its deletion journal or witness, or a
        checkpoint this object's loader found damaged. Equal numbers from two calls: none of that
        changed between them. Microseconds: poll it, and read again only when it moved."""
        try:
            # Both terms only grow (a damaged checkpoint is never forgotten), so their sum does too.
            return self._store.change_counter() + len(self._loader.damaged)
        except Exception:  # the boundary as `_mapped` draws it, paid only on failure (it is polled)
            with store_errors(repr(str(self.root / "store.db"))):
                raise

    @_mapped
    def unservable(self) -> dict[int, str]:
        """Shards with records that may not serve, and why: a deletion pending, damage (a live
        checkpoint failing its seal or its files), no live checkpoint, or the store behind its
        journal or witness."""
        store = self._store
        if store.witness_missing() or store.journal_missing():
            return {s: "the journal or the witness holds a deletion the store lacks (a writer "
                       "applies it again)" for s in range(self.config.partition.shards)}
        why: dict[int, str] = {s: "a deletion is pending" for s in store.pending_shards()}
        live = store.live()
        for s, row in live.items():
            if s not in why and not store.sealed(row):
                why[s] = "its live checkpoint does not match its seal (it was altered)"
        why.update({s: reason for s, reason in
                    self._loader.unservable({s: r.sha256 for s, r in live.items()}).items()
                    if s not in why})
        empty = {s for s, row in live.items() if row.record_count == 0}
        for s in set(range(self.config.partition.shards)) - set(live) - set(why):
            why[s] = "it has no live checkpoint (it is retraining, or damage unregistered it)"
        return {s: reason for s, reason in sorted(why.items()) if s not in empty}

    @_mapped
    def excluded(self, used: Collection[int]) -> list[int]:
        """Shards holding records that are not among `used` (a deletion pending, or not loaded)."""
        empty = {s for s, row in self._store.live().items() if row.record_count == 0}
        return sorted(set(range(self.config.partition.shards)) - set(used) - empty)

    @_mapped
    def ensemble(self, shards: Mapping[int, str] | None = None, exact: bool = True) -> Ensemble:
        """The models of the servable shards (or of `shards`: shard -> weights sha256), loaded
        once each and reloaded only for a checkpoint not loaded yet. Without `exact`, an ensemble
        holding more shards (with these very weights) will do. A checkpoint replaced while it was
        read is `CheckpointMovedError` for given `shards`; for the servable ones, they are read
        again."""
        if shards is not None:
            return self._loader.ensemble(shards, exact)
        for _ in range(_MOVED_RETRIES):
            with contextlib.suppress(CheckpointMovedError):
                return self._loader.ensemble(self.servable(), exact)
        raise CheckpointMovedError("the live checkpoints kept changing while they were read; try again")

    @property
    def checkpoints_read(self) -> int:
        """Checkpoints this object read to serve (a reload reads only new ones)."""
        return self._loader.reads

    @property
    def loaded(self) -> dict[int, str]:
        """shard -> weights sha256 of the models loaded to serve."""
        return self._loader.loaded

    def load_inputs(self, source: Any,
                    labelled: bool = False) -> tuple[list[str], list[Any], list[str | None]]:
        """Ids (row numbers where the input has none), model inputs and, where `labelled`, labels
        of records to predict on (all in memory: `input_batches` reads a large input a chunk at a
        time)."""
        records = load_records(*data_source(source, self.data_spec), require_target=False,
                               labelled=labelled)
        return [r.id for r in records], [r.input for r in records], [r.target for r in records]

    def input_batches(self, source: Any, labelled: bool = False) -> Iterator[Batch]:
        """Validated records to predict on (with their labels where `labelled`), a chunk at a
        time (numeric inputs as one array); a problem anywhere in the input raises once all of it
        was read. Only the model's input columns must be there: an id is carried where present."""
        return iter(Ingest(*data_source(source, self.data_spec), require_target=False,
                           labelled=labelled))

    def predict_proba(self, inputs: Any) -> np.ndarray:
        """Class probabilities (columns in `classes_` order); argmax is always `predict`.
        `inputs`: a pandas DataFrame (or any table) or a list of dicts, whose columns are matched
        by name to `feature_names_in_`; a numpy array or a list of rows of `n_features_in_`
        numbers; or a list of texts."""
        return self._proba(model_input(inputs, self.data_spec))

    def predict(self, inputs: Any) -> list[str]:
        """The predicted class of each input (`inputs` as for `predict_proba`)."""
        classes = self.classes_
        return [classes[i] for i in self.predict_proba(inputs).argmax(axis=-1)]

    def _proba(self, inputs: list[str] | np.ndarray) -> np.ndarray:
        task = self._classifier()
        return task.predict_proba(self.ensemble().shard_proba(inputs), self.config.voting)

    @_mapped
    def predictions(self, source: Any) -> Iterator[list[dict[str, Any]]]:
        """Predictions for a file or table of records, a chunk at a time: each row's id (or, where
        the input has no id column, its number: a CSV's line counting the header as 1, a JSON
        lines file's line, a JSON array's or Parquet file's record from 1, an in-memory position
        from 0; a file with blank lines or fields spanning lines is counted by records), predicted
        class and every class's probability."""
        classes = self.classes_
        for batch in self.input_batches(source):
            proba = self._proba(batch.inputs)
            key, names = ("id", batch.ids) if batch.has_ids else ("row", batch.rows)
            best = proba.argmax(axis=1).tolist() if len(proba) else []
            yield [{key: i, "prediction": classes[b],
                    "probabilities": dict(zip(classes, row, strict=True))}
                   for i, b, row in zip(names, best, np.round(proba, 6).tolist(), strict=True)]

    @_mapped
    def prediction_lines(self, source: Any) -> Iterator[list[str]]:
        """`predictions(source)` as JSON text, one object per prediction, a chunk at a time; made
        from the probabilities without building the objects (a million rows are a few seconds of
        formatting, not tens). A probability that is not a number (a diverged model) is null."""
        classes = self.classes_
        for batch in self.input_batches(source):
            key, names = ("id", batch.ids) if batch.has_ids else ("row", batch.rows)
            yield json_predictions(key, names, classes, self._proba(batch.inputs))

    @_mapped
    def write_predictions(self, source: Any, output: str | Path) -> int:
        """Write `predictions(source)` as JSON lines to `output`, as they come, into a temporary
        file renamed once the whole input was read and found valid (bad input writes nothing).
        Returns the number of predictions written."""
        output = Path(output)
        sink = output.with_name(f".{output.name}.partial")
        written = 0
        try:
            with sink.open("w") as handle:
                for chunk in self.prediction_lines(source):
                    handle.write("\n".join(chunk) + "\n" if chunk else "")
                    written += len(chunk)
            sink.replace(output)
        finally:
            sink.unlink(missing_ok=True)
        return written

    @_mapped
    def evaluate(self, source: Any) -> EvaluationReport:
        """Accuracy and macro-F1 of the ensemble (soft and hard voting) and of each shard."""
        task = self._classifier()
        ensemble = self.ensemble()
        parts: list[dict[int, np.ndarray]] = []
        labels: list[str | None] = []
        for batch in self.input_batches(source, labelled=True):
            labels += batch.targets
            parts.append(ensemble.shard_proba(batch.inputs))
        y = task.labels(labels)
        proba = {s: np.concatenate([p[s] for p in parts]) for s in parts[0]} if parts else {}
        return task.evaluate(proba, y, self.config.voting)

    # -- causal LMs ------------------------------------------------------------------------------

    def language_model(self, adapters: Mapping[int, Mapping[str, Any]] | None = None) -> Any:
        """The ensemble's scorer (a `sisa.serving.LMScorer`); with `adapters` (shard -> adapter
        tensors), a scorer of those adapters on this store's base model instead (the approximate
        baselines' unlearned adapters)."""
        self.require_language_model()
        if adapters is None:
            return self.ensemble().scorer
        from sisa.serving.scorers import build_scorer
        from sisa.training.jobs import init_seed

        weights = {s: dict(t) for s, t in adapters.items()}
        return build_scorer(self._backend, weights, init_seed(self.config.partition.seed, min(weights)),
                            self._loader.device)

    @_mapped
    def live_adapters(self) -> dict[int, dict[str, Any]]:
        """Every shard's live adapter tensors (a causal LM's), each read from its checkpoint and
        verified; refused while any shard may not serve (a deletion pending, damage): what is
        handed out must hold no deleted record and miss no shard."""
        self.require_language_model()
        blocked = self.unservable()
        if blocked:
            raise NoServableShardError(
                "not every shard can serve, so no whole model can leave the store: "
                + "; ".join(f"shard {s}: {why}" for s, why in blocked.items()))
        from sisa.training.state import model_tensors

        live = self._store.live()
        return {s: model_tensors(read_checkpoint(self._store, live[s]).tensors())
                for s in sorted(self.servable())}

    @property
    def tokenizer(self) -> Any:
        """A causal-LM store's tokenizer (loads no model weights)."""
        self.require_language_model()
        backend: Any = self._backend
        return backend.tokenizer

    def lm_inputs(self, texts: Sequence[str], prompts: Sequence[str | None] | None = None) -> Any:
        """Texts (after their prompts) tokenised as the causal LM scores them; for a store trained
        on conversations, conversations (lists of {"role", "content"} messages, or their JSON as
        `texts` gives it), formatted by the chat template, their assistant turns scored."""
        self.require_language_model()
        encoder: Any = self._backend.encoder
        return encoder.inputs(encoder.examples(list(texts), prompts), None)

    def model_inputs(self, texts: Sequence[Any], prompts: Sequence[str | None] | None = None) -> Any:
        """Inputs as the shard models train on them (cached encoder outputs where the backend has
        a frozen encoder)."""
        return self._backend.prepare(self._features.model_inputs(texts, prompts))

    @_mapped
    def shard_model(self, shard: int) -> ShardModel:
        """A shard's live checkpoint restored as a trainable model, optimizer state included (the
        approximate baselines start from it); raises while the shard has a deletion pending."""
        row = self._store.live().get(shard)
        if row is None or shard not in self.clean_shards():
            raise ConfigError(f"shard {shard} has no servable checkpoint (a deletion is pending: "
                              "apply it first)")
        from sisa.training.shard_trainer import load_model

        return load_model(self._backend, read_checkpoint(self._store, row), self.config.partition.seed)

    def combine_mode(self, combine: str | None) -> Combine:
        """`combine` checked, or the store's default (`SisaConfig.combine`) where it is None."""
        if combine is None:
            return self.config.combine
        if combine not in COMBINES:
            raise ConfigError(f"combine must be one of {', '.join(COMBINES)}, got {combine!r}")
        return combine  # type: ignore[return-value]

    @_mapped
    def generate(self, prompts: Sequence[str], max_new_tokens: int = 48,
                 combine: Combine | None = None, temperature: float = 0.0, seed: int = 0,
                 stop: Sequence[str] = (), ensemble: Ensemble | None = None) -> list[Generation]:
        """Continue each prompt from the ensemble's next-token distribution (the servable shards'
        `mean` mixture or normalised `product`, or their `merged` adapter; default: the store's
        `combine`): greedy at temperature 0, else sampled, seeded. Stops at the end-of-text token
        or any `stop` string. `ensemble`: the shard models to use (default: the servable ones,
        reloaded as the store changes). A store trained on conversations takes each prompt as a
        user message, formatted by the chat template with the assistant's turn opened, and stops
        at the end of that turn."""
        combine = self.combine_mode(combine)
        if max_new_tokens < 1:
            raise ConfigError(f"max_new_tokens must be >= 1, got {max_new_tokens!r}")
        if not math.isfinite(temperature) or temperature < 0:
            raise ConfigError(f"temperature must be a finite number >= 0, got {temperature!r}")
        if any(not s for s in stop):
            raise ConfigError("a stop string must not be empty")
        chat = self.data_spec.messages_column is not None
        prompted = self.data_spec.prompt_column is not None
        if not prompted and not chat and any(not p for p in prompts):
            raise RecordError("a prompt is empty: give some text to continue")
        self.require_language_model()
        from sisa.serving.generation import generate_texts

        ensemble = ensemble if ensemble is not None else self.ensemble()
        asked = list(prompts)
        if chat:  # formatted here as training formatted the conversations; then taken as they are
            from sisa.training.causal_lm import chat_prompt, end_of_turn

            scorer: Any = ensemble.scorer
            tok, model = scorer.tokenizer, getattr(self.config.training, "model", "")
            asked = [chat_prompt(tok, p, model) for p in prompts]
            end = end_of_turn(tok, model)
            stop = [*stop, end] if end and end != tok.eos_token and end not in stop else stop
        out = generate_texts(ensemble.scorer, asked, prompted and not chat, max_new_tokens, combine,
                             temperature, seed, stop)
        return [Generation(p, text, tokens, ensemble.version, ensemble.shards)
                for p, (text, tokens) in zip(prompts, out, strict=True)]

    @_mapped
    def score(self, source: Any, combine: Combine | None = None,
              ensemble: Ensemble | None = None) -> ScoreReport:
        """Log-likelihood and perplexity of each record's text (after its prompt) under the
        ensemble (`combine`, `ensemble`: as for `generate`)."""
        combine = self.combine_mode(combine)
        self.require_language_model()
        ensemble = ensemble if ensemble is not None else self.ensemble()
        scorer: Any = ensemble.scorer
        source, spec = data_source(source, self.data_spec)
        # Scoring needs the text (and prompt): not the label, group or prior the training read.
        records = load_records(source, dataclasses.replace(spec, label_column=None, group_column=None,
                                                           prior_column=None),
                               require_target=False)
        prompts = [r.target for r in records] if spec.prompt_column else None
        scores = scorer.scores(self.lm_inputs([str(r.input) for r in records], prompts), combine)
        view = scorer.views.index("ensemble")
        out = [RecordScore(r.id, int(s.logp.shape[1]), float(s.logp[view].sum()),
                           _perplexity(float(s.logp[view].sum()), s.logp.shape[1]))
               for r, s in zip(records, scores, strict=True)]
        total = sum(r.logprob for r in out)
        tokens = sum(r.tokens for r in out)
        return ScoreReport(combine, out, tokens, _perplexity(total, tokens), ensemble.version,
                           ensemble.shards)

    # -- reporting -------------------------------------------------------------------------------

    @_mapped
    def status(self) -> StatusReport:
        return store_status(self._store, self.config.to_dict(), self.config_digest)

    @_mapped
    def verify_receipts(self, expect: str | None = None) -> ReceiptsReport:
        """Re-check the receipt chain against the store: every receipt's keyed digest, its link to
        the one before, its deleted ids' tombstones and its config digest. `expect`: a head digest
        kept elsewhere, which the chain must end in or pass through (else it was rewritten or
        rolled back)."""
        report = verify_receipts(self._store, self.config_digest)
        if expect is None or expect == report.head:
            return report
        chained = {digest: seq for seq, digest in self._store.chain_positions().values()}
        if expect in chained:
            return dataclasses.replace(report, notes=[
                f"the head kept elsewhere is receipt {chained[expect]}; {report.receipts - chained[expect]} "
                "receipt(s) were applied since"])
        return dataclasses.replace(report, ok=False, problems=[
            *report.problems, f"the chain does not hold the head kept elsewhere ({expect[:16]}...): it "
            "was rewritten, or the store was restored from an older backup"])

    @_mapped
    def receipt(self, which: str) -> dict[str, Any]:
        """One stored receipt, by deletion request id or by its sequence number in the chain."""
        for d in self._store.deletions():
            if d.receipt is not None and (d.request_id == which
                                          or str(d.receipt.get("sequence")) == which):
                return d.receipt
        if self._store.deletion(which) is not None:
            raise UnknownReceiptError(f"deletion {which!r} is acknowledged but not applied yet: "
                                      "it has no receipt until it is")
        chained = sum(1 for d in self._store.deletions() if d.receipt is not None)
        raise UnknownReceiptError(f"no receipt {which!r}: give a deletion request id or a sequence "
                                  f"number (1..{chained})")

    @_mapped
    def audit(self) -> AuditReport:
        """Verify every checkpoint's files and manifest, that none holds a deleted record, that
        each live checkpoint matches its shard's records, and that nothing unregistered is on
        disk."""
        return audit(self._store, self._manager)


def json_predictions(key: str, names: Sequence[Any], classes: Sequence[str],
                     proba: np.ndarray) -> list[str]:
    """Each row's `{key: name, "prediction": class, "probabilities": {class: p}}` as the JSON
    `json.dumps` writes, p rounded to 6 decimals; made with one template (a float's repr is its
    JSON). A row with a probability that is not finite takes `json.dumps`, with null for it."""
    labels = [json.dumps(c) for c in classes]
    escaped = [label.replace("%", "%%") for label in labels]
    template = (f'{{{json.dumps(key)}: %s, "prediction": %s, "probabilities": {{'
                + ", ".join(f"{label}: %r" for label in escaped) + "}}")
    best = proba.argmax(axis=1).tolist() if len(proba) else []
    finite = np.isfinite(proba).all(axis=1).tolist()
    rounded = np.round(proba, 6).tolist()
    numbered = key == "row"  # row numbers are ints: their JSON is their str
    out = []
    for name, b, ok, row in zip(names, best, finite, rounded, strict=True):
        if ok:
            out.append(template % (name if numbered else json.dumps(name), labels[b], *row))
        else:
            out.append(json.dumps({key: name, "prediction": classes[b], "probabilities": {
                c: v if math.isfinite(v) else None for c, v in zip(classes, row, strict=True)}}))
    return out


def _perplexity(logprob: float, tokens: int) -> float:
    return math.exp(-logprob / tokens) if tokens else math.nan


def config_digest(config: SisaConfig, backend: Backend) -> str:
    """Digest of the partition and training config and of the base model the weights depend on
    (the execution config does not enter it)."""
    fingerprint = backend.fingerprint()
    return config.digest() if not fingerprint else _digest(f"{config.digest()}/{fingerprint}")


def _digest(text: str) -> str:
    return hashlib.blake2b(text.encode(), digest_size=16).hexdigest()


__all__ = ["Sisa", "config_digest", "data_source", "resolve_source", "serving_device"]
