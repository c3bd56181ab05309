"""The library's front door: `Sisa` trains a store, serves it, forgets, adds, audits and reports.

The CLI (and later the HTTP service) are thin shells over these methods. Errors of the store below
(`shard_store`) become the matching `SisaError` here.
"""

from __future__ import annotations

import dataclasses
import functools
import gc
import hashlib
import importlib
import math
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, ParamSpec, TypeVar

import numpy as np

from shard_store import CheckpointRow, NewRecord, ShardStore
from sisa import builtin
from sisa.audit import audit
from sisa.config import Combine, DataSpec, ExecutionConfig, SisaConfig
from sisa.ensemble import Ensemble
from sisa.errors import (
    CheckpointError,
    ColumnError,
    ConfigError,
    InputKindError,
    RecordError,
    StoreError,
    UnknownReceiptError,
    name_some,
)
from sisa.features import Features
from sisa.intake import Placer
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
from sisa.sources import rows_of
from sisa.status import CONFIG_DIGEST, model_version, servable, store_errors, store_status
from sisa.tasks import ClassificationTask, LanguageModelingTask, ModelSpec, task_from_meta
from sisa.training import resolve_backend
from sisa.training.protocol import Backend
from sisa.unlearning import (
    DeletionManager,
    DeletionReceipt,
    DeletionRequest,
    Progress,
    TrainingReport,
)

P = ParamSpec("P")
R = TypeVar("R")


def _mapped(method: Callable[P, R]) -> Callable[P, R]:
    """The boundary: errors of the store (and of SQLite under it) become the matching
    `SisaError`."""
    @functools.wraps(method)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        owner = args[0] if args else None
        root = owner.store.root if isinstance(owner, Sisa) else (args[1] if len(args) > 1 else "")
        with store_errors(repr(str(Path(str(root)) / "store.db"))):
            return method(*args, **kwargs)
    return wrapper


def resolve_source(source: Any, spec: DataSpec | None) -> tuple[list[dict[str, Any]], DataSpec]:
    """Rows and column spec of a data source; built-ins bring their own spec. For small inputs:
    `data_source` reads large ones a chunk at a time."""
    source, spec = data_source(source, spec)
    return rows_of(source, wanted(spec)), spec


def preload_torch() -> None:
    """Import torch, and the torch._dynamo that every optimizer step imports (together about
    2.3 s of a fresh process here), on a helper thread while this one opens the store and
    acknowledges a deletion, which need neither; the trainer's own imports then find them loaded,
    or wait for the helper to finish them. (Not while records are read: both hold the GIL most of
    the time, and on two cores `train` gained nothing measurable from it.)"""
    if "torch._dynamo" not in sys.modules:
        threading.Thread(target=_import_torch, daemon=True, name="sisa-import-torch").start()


def _import_torch() -> None:
    importlib.import_module("torch")
    importlib.import_module("torch._dynamo")


def data_source(source: Any, spec: DataSpec | None) -> tuple[Any, DataSpec]:
    """What to read (a built-in becomes its rows) and the column spec."""
    if builtin.is_builtin(source):
        rows, builtin_spec = builtin.load_builtin(str(source))
        return rows, spec or builtin_spec
    if spec is None:
        raise ColumnError("name the data's columns (a DataSpec): its id, label and text or features")
    return source, spec


class Sisa:
    """A SISA store on disk: create it with `Sisa.train`, reopen it with `Sisa.open`.

    Fitted state, read from the store: `classes_`; `training_report_` after `train`;
    `recovered_`, the receipts of deletions that opening it finished."""

    def __init__(self, store: ShardStore, execution: ExecutionConfig | None = None,
                 progress: Progress | None = None, backend: Backend | None = None) -> None:
        """Open the task, backend and deletion manager of a store (`backend`: one resolved
        already for this store's config)."""
        self.store = store
        config = SisaConfig.from_dict(store.get_meta("config"))
        self.config = config if execution is None else config.replace(execution=execution)
        self.data_spec = DataSpec(**store.get_meta("data_spec"))
        self.task = task_from_meta(store.get_meta("task"))
        self.backend = backend or resolve_backend(self.config.training,
                                                  ModelSpec(**store.get_meta("model_spec")))
        self.features = Features(store, self.backend.encoder, progress)
        digest = config_digest(self.config, self.backend)
        self.manager = DeletionManager(store, self.task, self.backend, self.features, self.config,
                                       digest, progress)
        self._ensemble: Ensemble | None = None
        self.training_report_ = TrainingReport()  # what `train` did (nothing, for a store opened)
        self.recovered_: list[DeletionReceipt] = []

    @property
    def classes_(self) -> list[str]:
        """The classes (empty for a causal LM)."""
        return list(self.task.classes) if isinstance(self.task, ClassificationTask) else []

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

    def language_model(self) -> Any:
        """The ensemble's scorer: a `sisa.training.causal_lm.CausalLMScorer`."""
        self.require_language_model()
        return self.ensemble().scorer

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
    ) -> Sisa:
        """Validate the data, create the store, and train every shard from scratch; the report is
        `training_report_`. `embeddings_from` seeds the embedding cache from another store (same
        keys, same vectors), so a second store on the same texts never re-encodes them."""
        started = time.perf_counter()
        source, spec = data_source(source, spec)
        if config.training.task == LanguageModelingTask.kind and spec.label_column is not None:
            spec = dataclasses.replace(spec, label_column=None)  # a causal LM learns text, not labels
        if config.training.task != LanguageModelingTask.kind and spec.prompt_column is not None:
            raise ConfigError(f"a prompt column ({spec.prompt_column!r}) is for the causal_lm "
                              f"backend; backend {config.training.backend!r} learns labels")
        if config.training.input_kind != spec.kind:
            need = "a text column" if config.training.input_kind == "text" else "numeric feature columns"
            raise InputKindError(
                f"backend {config.training.backend!r} needs {need}; the data has "
                f"{'a text column' if spec.kind == 'text' else 'feature columns'}")
        ingest = Ingest(source, spec)
        placer = Placer(config.partition, keep=True)
        backend_seconds: list[float] = []  # building the backend, within the store's creation

        def placed() -> Iterator[list[NewRecord]]:
            """The input, validated and placed a chunk at a time, as the store writes it."""
            for batch in ingest:
                yield placer.place(batch)
            placer.finish()
            placer.check_partition()  # no shard or slice that nothing could fill

        built: dict[str, Any] = {}

        def meta() -> dict[str, Any]:
            """Once every record is read: the task (its classes), then the backend (a bad model
            fails here, before the store is complete; it also resolves the input width, an
            encoder's embedding size for the head backend)."""
            begun = time.perf_counter()
            task: ClassificationTask | LanguageModelingTask
            if config.training.task == LanguageModelingTask.kind:
                task = LanguageModelingTask()
            else:
                task = ClassificationTask.fit(sorted(placer.labels, key=lambda x: (x is None, x or "")))
            backend = resolve_backend(config.training, task.model_spec(
                len(spec.feature_columns) if spec.kind == "features" else None))
            backend.fingerprint()
            validate = getattr(backend, "validate", None)  # e.g. a causal LM's layers against top-k
            if validate is not None:
                validate()
            built["backend"] = backend
            backend_seconds.append(time.perf_counter() - begun)
            # The columns the training data had and the spec does not read: `add` accepts these,
            # and refuses any other column rather than drop it silently.
            return {"config": config.to_dict(), "data_spec": spec.to_dict(), "task": task.to_meta(),
                    "model_spec": dataclasses.asdict(backend.spec),
                    CONFIG_DIGEST: config_digest(config, backend),  # status reads it, with no model
                    "unused_columns": unused_columns(ingest, spec)}

        # Millions of small objects are made, and most kept: the cycle collector (which finds
        # no cycle in them) would walk them again and again; it runs once, below.
        with paused_gc():
            store = ShardStore.create(store_dir, meta, placed(), config.partition.shards)
        # Reading, validating, placing and writing every record (the backend's set-up aside).
        ingest_seconds = time.perf_counter() - started - sum(backend_seconds)
        if embeddings_from is not None:
            store.copy_embeddings_from(embeddings_from)
        empty = placer.empty_shards()
        sisa = cls(store, config.execution, progress, built["backend"])
        if placer.kept is not None:
            sisa.manager.data.keep(placer.kept, store.created_versions)
            placer.kept = None
        # Ingestion made and dropped millions of tracked objects: collect them once now, rather
        # than have the cycle collector walk them again and again during training.
        gc.collect()
        sisa.training_report_ = sisa.manager.update("training shards")[0]
        sisa.training_report_.ingest_seconds = ingest_seconds
        if empty:
            sisa.training_report_.warnings.append(
                f"{len(empty)} of {config.partition.shards} shards received no record (shards "
                f"{name_some(empty)}): they train on nothing and never serve; fewer shards would "
                "use the data better")
        return sisa

    @classmethod
    @_mapped
    def open(cls, store_dir: str | Path, execution: ExecutionConfig | None = None,
             progress: Progress | None = None, recover: bool = True,
             read_only: bool = False, backend: Backend | None = None) -> Sisa:
        """Open a store. With `recover` (a writer), finish whatever a crash interrupted (the
        receipts are `recovered_`); without, change nothing (see `tidy`). `read_only`: never
        write the database (serving, status and the audit work on a store this process may
        not write); it cannot recover. `backend`: one resolved already for this store (shared
        by several `Sisa`s of one store in a process, as the service's are)."""
        if read_only and recover:
            raise ConfigError("a store opened read-only cannot recover: pass recover=False")
        if not read_only:
            preload_torch()  # a writer is about to train, most likely
        sisa = cls(ShardStore.open(store_dir, read_only=read_only), execution, progress, backend)
        if recover:
            sisa.recovered_ = sisa.recover()
        return sisa

    @_mapped
    def tidy(self) -> list[str]:
        """Remove files a crash left under checkpoints/ that the database does not register (they
        may derive from a deleted record), unless a writer is at work (it removes them before it
        lets go). Cheap: readers do it on opening. Returns the paths removed."""
        return self.store.tidy()

    def close(self) -> None:
        self.store.close()

    def __enter__(self) -> Sisa:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- the deletion lifecycle ------------------------------------------------------------------

    @_mapped
    def request_deletion(self, ids: Sequence[str] | None = None,
                         group: str | None = None) -> DeletionRequest:
        """Acknowledge a deletion of records by id, or of a whole group: durable when this returns,
        before any training; the affected shards stop serving until it is applied."""
        return self.manager.request_deletion(ids, group)

    @_mapped
    def pending(self) -> list[DeletionRequest]:
        """Deletions acknowledged but not applied."""
        return self.manager.pending()

    @_mapped
    def clean_shards(self) -> set[int]:
        """Shards with no acknowledged deletion pending against them (any process may ask)."""
        return self.manager.clean_shards()

    @_mapped
    def apply_pending(self) -> list[DeletionReceipt]:
        """Retrain the shards of every pending deletion and swap them in; returns the receipts."""
        return self.manager.apply_pending()

    @_mapped
    def forget(self, record_ids: Sequence[str]) -> DeletionReceipt:
        """Forget records by id: acknowledge, then apply; returns once the affected shards are
        retrained and swapped in."""
        preload_torch()  # while the deletion is validated and made durable
        return self._forget(self.manager.request_deletion(ids=record_ids))

    @_mapped
    def forget_group(self, group_id: str) -> DeletionReceipt:
        """Forget every record of a group (e.g. a user)."""
        preload_torch()
        return self._forget(self.manager.request_deletion(group=group_id))

    def _forget(self, request: DeletionRequest) -> DeletionReceipt:
        if not request.request_id:
            return DeletionReceipt("", [], request.already_deleted, [], 0, 0.0, {}, {})
        self.manager.apply_pending()
        row = self.store.deletion(request.request_id)
        if row is None or row.receipt is None:
            raise StoreError(f"deletion {request.request_id} was not applied")
        return DeletionReceipt.from_ledger(row.receipt, request.record_ids, request.already_deleted)

    @_mapped
    def add(self, source: Any) -> TrainingReport:
        """Add new records; each affected shard retrains from its earliest affected slice."""
        source, spec = data_source(source, self.data_spec)
        ingest = Ingest(source, spec)
        known = self.store.get_meta("unused_columns")
        # A store trained before its columns were kept: accept what it would have (unknown).
        refuse_new_columns(ingest, spec, unused_columns(ingest, spec) if known is None else known)
        # Checked under the lock: a concurrent `add` cannot slip the same ids or groups in between.
        with self.store.writer():
            placer = Placer(self.config.partition)

            def placed() -> Iterator[list[NewRecord]]:
                problems: list[str] = []
                for batch in ingest:
                    existing = self.store.find_records(batch.ids)
                    if existing:
                        problems.append(f"ids already in the store (live or deleted): "
                                        f"{sorted(existing)[:10]}")
                    problems += self.task.check_new(batch.targets)
                    if problems:
                        raise RecordError("cannot add records (nothing was written): "
                                          + "; ".join(problems))
                    fresh = sorted({g for g in batch.groups if g is not None} - set(placer.group_shard))
                    placer.group_shard.update(self.store.group_shards(fresh))
                    yield placer.place(batch)
                placer.finish()

            return self.manager.add(placed())

    @_mapped
    def repair(self, shards: Sequence[int] | None = None, from_scratch: bool = False) -> TrainingReport:
        """Retrain shards (default: all) from their first missing or damaged checkpoint, or from
        scratch; the result is bit-identical to what the store held before the damage."""
        count = self.config.partition.shards
        wanted = list(range(count)) if shards is None else list(shards)
        bad = [s for s in wanted if not 0 <= s < count]
        if bad:
            raise ConfigError(f"no shard(s) {bad} in this store: it has shards 0..{count - 1}")
        return self.manager.repair(wanted, from_scratch)

    # Crash recovery is applying what is pending: finish interrupted deletions, additions,
    # training, and remove files left over; returns the receipts of the deletions applied.
    recover = apply_pending

    # -- serving ---------------------------------------------------------------------------------

    def servable_shards(self) -> dict[int, CheckpointRow]:
        """Live checkpoints that may serve: non-empty, and with no deletion pending. None while
        the deletion journal holds a deletion the database lacks (which shards it touches is
        unknown until a writer applies it again)."""
        return servable(self.store)

    @_mapped
    def ensemble(self) -> Ensemble:
        """The servable shards' models, reloaded when the store's live checkpoints change."""
        servable = self.servable_shards()
        version = model_version({s: row.sha256 for s, row in servable.items()})
        if self._ensemble is None or self._ensemble.version != version:
            try:
                checkpoints = {s: self.manager.read_checkpoint(row.key, row)
                               for s, row in servable.items()}
            except CheckpointError:
                if self.servable_shards() == servable:
                    raise  # damage, not a writer that swapped the checkpoint meanwhile
                return self.ensemble()
            self._ensemble = Ensemble(self.backend, self.features, checkpoints,
                                      self.config.partition.seed)
        return self._ensemble

    def load_inputs(self, source: Any) -> tuple[list[str], list[Any], list[str | None]]:
        """Ids, model inputs and (where present) labels of records to predict on (all in memory:
        `input_batches` reads a large input a chunk at a time)."""
        records = load_records(*data_source(source, self.data_spec), require_target=False)
        return [r.id for r in records], [r.input for r in records], [r.target for r in records]

    def input_batches(self, source: Any) -> Iterator[Batch]:
        """Validated records to predict on, a chunk at a time (numeric inputs as one array); a
        problem anywhere in the input raises once all of it was read."""
        return iter(Ingest(*data_source(source, self.data_spec), require_target=False))

    def predict_proba(self, inputs: Sequence[Any] | np.ndarray) -> np.ndarray:
        """Class probabilities (columns in `classes_` order); argmax is always `predict`."""
        task = self._classifier()
        return task.predict_proba(self.ensemble().shard_proba(inputs), self.config.voting)

    def predict(self, inputs: Sequence[Any] | np.ndarray) -> list[str]:
        task = self._classifier()
        indices = task.predict(self.ensemble().shard_proba(inputs), self.config.voting)
        return [task.classes[i] for i in indices]

    @_mapped
    def evaluate(self, source: Any) -> EvaluationReport:
        """Accuracy and macro-F1 of the ensemble (soft and hard voting) and of each shard."""
        task = self._classifier()
        ensemble = self.ensemble()
        parts: list[dict[int, np.ndarray]] = []
        labels: list[str | None] = []
        for batch in self.input_batches(source):
            labels += batch.targets
            parts.append(ensemble.shard_proba(batch.inputs))
        y = task.labels(labels)
        proba = {s: np.concatenate([p[s] for p in parts]) for s in parts[0]} if parts else {}
        return task.evaluate(proba, y, self.config.voting)

    # -- causal LMs ------------------------------------------------------------------------------

    @_mapped
    def generate(self, prompts: Sequence[str], max_new_tokens: int = 48, combine: Combine = "mean",
                 temperature: float = 0.0, seed: int = 0, stop: Sequence[str] = (),
                 ensemble: Ensemble | None = None) -> list[Generation]:
        """Continue each prompt from the ensemble's next-token distribution (the servable shards'
        `mean` mixture or normalised `product`): greedy at temperature 0, else sampled, seeded.
        Stops at the end-of-text token or any `stop` string. `ensemble`: the shard models to use
        (default: the servable ones, reloaded as the store changes)."""
        if max_new_tokens < 1:
            raise ConfigError(f"max_new_tokens must be >= 1, got {max_new_tokens!r}")
        if not math.isfinite(temperature) or temperature < 0:
            raise ConfigError(f"temperature must be a finite number >= 0, got {temperature!r}")
        if any(not s for s in stop):
            raise ConfigError("a stop string must not be empty")
        from sisa.training.causal_lm import PROMPT_SEPARATOR  # torch and peft: a causal LM's own

        prompted = self.data_spec.prompt_column is not None
        if not prompted and any(not p for p in prompts):
            raise RecordError("a prompt is empty: give some text to continue")
        self.require_language_model()
        ensemble = ensemble if ensemble is not None else self.ensemble()
        scorer: Any = ensemble.scorer
        tok = scorer.tokenizer
        out = []
        for i, prompt in enumerate(prompts):
            # A store trained on prompts learned what follows "prompt<separator>": ask it the same.
            text = prompt + PROMPT_SEPARATOR if prompted else prompt
            ids = tok(text, add_special_tokens=False)["input_ids"]

            def stopped(new: list[int]) -> bool:
                return bool(stop) and any(s in tok.decode(new) for s in stop)

            new = scorer.generate(ids, max_new_tokens, combine, temperature, seed + i,
                                  stop=[tok.eos_token_id], should_stop=stopped)
            text = tok.decode(new, skip_special_tokens=True)
            for s in stop:
                text = text.split(s, 1)[0]
            out.append(Generation(prompt, text, len(new), ensemble.version, ensemble.shards))
        return out

    @_mapped
    def score(self, source: Any, combine: Combine = "mean",
              ensemble: Ensemble | None = None) -> ScoreReport:
        """Log-likelihood and perplexity of each record's text (after its prompt) under the
        ensemble (`ensemble`: as for `generate`)."""
        self.require_language_model()
        ensemble = ensemble if ensemble is not None else self.ensemble()
        scorer: Any = ensemble.scorer
        source, spec = data_source(source, self.data_spec)
        # Scoring needs the text (and prompt): not the label, group or prior the training read.
        records = load_records(source, dataclasses.replace(spec, label_column=None, group_column=None,
                                                           prior_column=None),
                               require_target=False)
        prompts = [r.target for r in records] if spec.prompt_column else None
        inputs = self.backend.encoder.inputs(  # type: ignore[union-attr]
            self.backend.encoder.examples([r.input for r in records], prompts), None)  # type: ignore[union-attr]
        scores = scorer.scores(inputs, combine)
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
        return store_status(self.store, self.config.to_dict(), self.manager.config_digest)

    @_mapped
    def verify_receipts(self) -> ReceiptsReport:
        """Re-check the receipt chain against the store: every receipt's keyed digest, its link to
        the one before, its deleted ids' tombstones and its config digest."""
        chain = self.store.verify_receipts(self.manager.config_digest)
        return ReceiptsReport(ok=not chain.problems, receipts=chain.receipts,
                              unchained=chain.unchained, pending=chain.pending, head=chain.head,
                              problems=chain.problems)

    @_mapped
    def receipt(self, which: str) -> dict[str, Any]:
        """One stored receipt, by deletion request id or by its sequence number in the chain."""
        for d in self.store.deletions():
            if d.receipt is not None and (d.request_id == which
                                          or str(d.receipt.get("sequence")) == which):
                return d.receipt
        pending = self.store.deletion(which)
        if pending is not None:
            raise UnknownReceiptError(f"deletion {which!r} is acknowledged but not applied yet: "
                                      "it has no receipt until it is")
        raise UnknownReceiptError(f"no receipt {which!r}: give a deletion request id or a sequence number "
                          f"(1..{self.store.verify_receipts().receipts})")

    @_mapped
    def audit(self) -> AuditReport:
        """Verify every checkpoint's files and manifest, that none holds a deleted record, that
        each live checkpoint matches its shard's records, and that nothing unregistered is on
        disk."""
        return audit(self.manager)


def _perplexity(logprob: float, tokens: int) -> float:
    return math.exp(-logprob / tokens) if tokens else math.nan


def config_digest(config: SisaConfig, backend: Backend) -> str:
    """Digest of the partition and training config and of the base model the weights depend on
    (the execution config does not enter it)."""
    fingerprint = backend.fingerprint()
    return config.digest() if not fingerprint else _digest(f"{config.digest()}/{fingerprint}")


def _digest(text: str) -> str:
    return hashlib.blake2b(text.encode(), digest_size=16).hexdigest()
