"""The library's front door: `Sisa` trains a store, serves it, forgets, adds, audits and reports.

The CLI (and later the HTTP service) are thin shells over these methods.
"""

from __future__ import annotations

import dataclasses
import gc
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from shard_store.checkpoints import read_checkpoint_bytes
from shard_store.store import ShardStore
from sisa import builtin
from sisa.config import DataSpec, ExecutionConfig, SisaConfig
from sisa.ensemble import Ensemble
from sisa.errors import CheckpointError, ConfigError, RecordError, StoreError
from sisa.features import EmbeddingCache
from sisa.partition import place
from sisa.records import Record, load_rows, paused_gc, records_from_rows
from sisa.training import get_backend
from sisa.training.protocol import ModelSpec
from sisa.unlearning import DeletionManager, DeletionReceipt, Progress, SyncReport


def resolve_source(source: Any, spec: DataSpec | None) -> tuple[list[dict[str, Any]], DataSpec]:
    """Rows and column spec of a data source; built-ins bring their own spec."""
    if builtin.is_builtin(source):
        rows, builtin_spec = builtin.load_builtin(str(source))
        return rows, spec or builtin_spec
    if spec is None:
        raise RecordError(
            "name the columns (--id-column, --label-column, --text-column or --feature-columns)"
        )
    return load_rows(source, spec), spec


def _sort_classes(labels: set[str]) -> list[str]:
    try:
        return sorted(labels, key=lambda x: (float(x), x))
    except ValueError:
        return sorted(labels)


def _placed_rows(records: Sequence[Record], config: SisaConfig,
                 known_groups: dict[str, int] | None = None) -> list[dict[str, Any]]:
    """Placement of every record; a group whose records would straddle shards is an error."""
    p = config.partition
    rows = []
    group_shard: dict[str, int] = dict(known_groups or {})
    straddling: set[str] = set()
    with paused_gc():
        for r in records:
            likely = r.prior is not None and r.prior >= p.prior_threshold
            where = place(r.id, r.group, seed=p.seed, shards=p.shards, slices=p.slices,
                          likely=likely, strategy=p.placement, late_slices=p.late_slices,
                          dedicated_shards=p.dedicated_shards)
            if r.group is not None and group_shard.setdefault(r.group, where.shard) != where.shard:
                straddling.add(r.group)
            rows.append({"id": r.id, "group_id": r.group, "digest": r.digest, "shard": where.shard,
                         "slice": where.slice, "order_key": where.order, "payload": r.payload(),
                         "features": r.features, "input_digest": r.input_digest})
    if straddling:
        raise RecordError(
            "with dedicated_shards placement every record of a group needs the same prior side of "
            f"the threshold; these groups mix both (nothing was written): {sorted(straddling)[:10]}"
        )
    return rows


class Sisa:
    """A SISA store on disk: create it with `Sisa.train`, reopen it with `Sisa.open`."""

    def __init__(self, store: ShardStore, config: SisaConfig, progress: Progress | None = None):
        self.store = store
        self.config = config
        meta_spec = store.get_meta("data_spec")
        if meta_spec is None:
            raise StoreError(f"store {str(store.root)!r} has no data spec; it was never trained")
        self.data_spec = DataSpec(**meta_spec)
        self.classes: list[str] = store.get_meta("classes")
        self.model_spec = ModelSpec(**store.get_meta("model_spec"))
        self.backend = get_backend(config.training.backend)(config.training, self.model_spec)
        encoder = self.backend.encoder()
        self.features = EmbeddingCache(store, encoder, progress) if encoder is not None else None
        transform = self.features.vectors if self.features is not None else None
        spec = self.data_spec
        self.manager = DeletionManager(
            store, config, self.model_spec, self.classes, progress, transform=transform,
            fingerprint=self.backend.fingerprint(),
            feature_dim=len(spec.feature_columns) if spec.kind == "features" else None)
        self._ensemble: Ensemble | None = None
        self.recovered: list[DeletionReceipt] = []  # receipts of deletions finished on open

    # -- creation and opening --------------------------------------------------------------------

    @classmethod
    def train(
        cls,
        store_dir: str | Path,
        source: Any,
        config: SisaConfig,
        spec: DataSpec | None = None,
        progress: Progress | None = None,
        embeddings_from: str | Path | None = None,
    ) -> tuple[Sisa, SyncReport]:
        """Validate the data, create the store, and train every shard from scratch.

        `embeddings_from` seeds the embedding cache from another store (same keys, same vectors),
        so a second store on the same texts never re-encodes them."""
        rows, spec = resolve_source(source, spec)
        records = records_from_rows(rows, spec)
        placed = _placed_rows(records, config)
        classes = _sort_classes({r.label for r in records})
        if len(classes) < 2:
            raise RecordError(f"need at least two classes to train, found {classes}")
        model_spec = ModelSpec(
            num_classes=len(classes),
            input_dim=len(spec.feature_columns) if spec.kind == "features" else None,
        )
        # Build the backend before writing anything: a bad model or config fails here. It also
        # resolves the input width (an encoder's embedding size for the head backend).
        backend_cls = get_backend(config.training.backend)
        if backend_cls.input_kind != spec.kind:
            need = "a --text-column" if backend_cls.input_kind == "text" else "numeric --feature-columns"
            raise ConfigError(
                f"backend {config.training.backend!r} needs {need}; the data has "
                f"{'a text column' if spec.kind == 'text' else 'feature columns'} (for text use the "
                "'head' or 'lora' backend, for numeric features the 'mlp' backend)"
            )
        backend = backend_cls(config.training, model_spec)
        backend.fingerprint()  # resolves the base model: a missing one fails before any write
        model_spec = backend.spec
        store = ShardStore.create(store_dir)
        if embeddings_from is not None:
            store.copy_embeddings_from(embeddings_from)
        with store.db.atomic():
            store.set_meta("config", config.to_dict())
            store.set_meta("data_spec", dataclasses.asdict(spec))
            store.set_meta("classes", classes)
            store.set_meta("model_spec", dataclasses.asdict(model_spec))
        sisa = cls(store, config, progress)
        with store.writer():
            versions = store.insert_records(placed)
            sisa.manager.records_added(versions, placed, records, whole_store=True)
            del rows, records, placed
            # Ingestion made and dropped millions of tracked objects: collect them once now,
            # rather than have the cycle collector walk them again and again during training.
            gc.collect()
            report = sisa.manager.sync(range(config.partition.shards), description="training shards")
        return sisa, report

    @classmethod
    def open(
        cls,
        store_dir: str | Path,
        execution: ExecutionConfig | None = None,
        progress: Progress | None = None,
        recover: bool = True,
    ) -> Sisa:
        """Open a store; with `recover`, finish any deletion or addition a crash interrupted."""
        store = ShardStore.open(store_dir)
        config = SisaConfig.from_dict(store.get_meta("config"))
        if execution is not None:
            config = config.replace(execution=execution)
        sisa = cls(store, config, progress)
        if recover:
            sisa.recover()
        return sisa

    def close(self) -> None:
        self.store.close()

    def __enter__(self) -> Sisa:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- changes ---------------------------------------------------------------------------------

    def forget(self, record_ids: Sequence[str]) -> DeletionReceipt:
        """Forget records by id; returns once the affected shards are retrained and swapped."""
        self._ensemble = None
        with self.store.writer():
            return self.manager.forget(record_ids)

    def forget_group(self, group_id: str) -> DeletionReceipt:
        """Forget every record of a group (e.g. a user)."""
        self._ensemble = None
        with self.store.writer():
            return self.manager.forget_group(group_id)

    def add(self, source: Any) -> SyncReport:
        """Add new records; each affected shard retrains from its earliest affected slice."""
        rows, _ = resolve_source(source, self.data_spec)
        records = records_from_rows(rows, self.data_spec)
        existing = self.store.find_records([r.id for r in records])
        problems = []
        if existing:
            clash = sorted(existing)[:10]
            problems.append(f"ids already in the store (live or deleted): {clash}")
        unknown_labels = sorted({r.label for r in records} - set(self.classes))
        if unknown_labels:
            problems.append(f"labels {unknown_labels} are not among the store's classes {self.classes}")
        if problems:
            raise RecordError("cannot add records (nothing was written): " + "; ".join(problems))
        groups = sorted({r.group for r in records if r.group is not None})
        placed = _placed_rows(records, self.config, self.store.group_shards(groups))
        self._ensemble = None
        with self.store.writer():
            versions = self.store.insert_records(placed)
            self.manager.records_added(versions, placed, records, whole_store=False)
            shards = sorted({r["shard"] for r in placed})
            return self.manager.sync(shards, description="retraining shards")

    def repair(self, shards: Sequence[int] | None = None, from_scratch: bool = False) -> SyncReport:
        """Retrain shards (default: all) from their first missing or damaged checkpoint, or from
        scratch; the result is bit-identical to what the store held before the damage."""
        count = self.config.partition.shards
        wanted = list(range(count)) if shards is None else list(shards)
        bad = [s for s in wanted if not 0 <= s < count]
        if bad:
            raise ConfigError(f"no shard(s) {bad} in this store: it has shards 0..{count - 1}")
        self._ensemble = None
        with self.store.writer():
            return self.manager.repair(wanted, from_scratch)

    def recover(self) -> list[DeletionReceipt]:
        """Finish deletions and additions a crash interrupted; returns the deletions' receipts."""
        self._ensemble = None
        with self.store.writer():
            self.recovered = self.manager.recover()
        return self.recovered

    # -- serving ---------------------------------------------------------------------------------

    def servable_shards(self) -> dict[int, Any]:
        """Live checkpoints that may serve: non-empty, and with no deletion pending."""
        pending = self.store.pending_shards()
        return {s: row for s, row in self.store.live().items()
                if s not in pending and row.record_count > 0}

    def ensemble(self) -> Ensemble:
        if self._ensemble is None:
            payloads = {s: self.store.read_payload(row) for s, row in self.servable_shards().items()}
            transform = self.features.vectors if self.features is not None else None
            self._ensemble = Ensemble(self.config, self.model_spec, payloads, transform=transform)
        return self._ensemble

    def load_inputs(self, source: Any) -> tuple[list[str], list[Any], list[str | None]]:
        """Ids, model inputs and (where present) labels of records to predict on."""
        rows, _ = resolve_source(source, self.data_spec)
        spec = self.data_spec
        if rows and spec.label_column not in rows[0]:
            rows = [{**r, spec.label_column: "?"} for r in rows]  # labels are optional here
            records = records_from_rows(rows, spec)
            return [r.id for r in records], [r.input for r in records], [None] * len(records)
        records = records_from_rows(rows, spec)
        return [r.id for r in records], [r.input for r in records], [r.label for r in records]

    def predict_proba(self, inputs: list[Any]) -> np.ndarray:
        return self.ensemble().predict_proba(inputs)

    def predict(self, inputs: list[Any]) -> list[str]:
        return [self.classes[i] for i in self.ensemble().predict(inputs)]

    def evaluate(self, source: Any) -> dict[str, Any]:
        """Accuracy and macro-F1 of the ensemble (soft and hard voting) and of each shard."""
        from sklearn.metrics import f1_score

        _, inputs, labels = self.load_inputs(source)
        if any(label is None for label in labels):
            raise RecordError("evaluation data needs a label column")
        index = {c: i for i, c in enumerate(self.classes)}
        unknown = sorted({str(lbl) for lbl in labels} - set(index))
        if unknown:
            raise RecordError(f"labels {unknown} are not among the store's classes {self.classes}")
        y = np.array([index[str(lbl)] for lbl in labels])
        ens = self.ensemble()
        per_shard = ens.shard_proba(inputs)

        def scores(pred: np.ndarray) -> dict[str, float]:
            return {"accuracy": float((pred == y).mean()),
                    "macro_f1": float(f1_score(y, pred, average="macro", zero_division=0))}

        return {
            "examples": len(y),
            "voting": self.config.voting,
            "ensemble": scores(Ensemble.decide(per_shard, self.config.voting)),
            "ensemble_soft": scores(Ensemble.decide(per_shard, "soft")),
            "ensemble_hard": scores(Ensemble.decide(per_shard, "hard")),
            "shards": {str(s): scores(p.argmax(-1)) for s, p in per_shard.items()},
        }

    # -- reporting -------------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        live = self.store.live()
        counts = self.store.record_counts()
        pending = self.store.pending_deletions()
        pending_shards = {s for d in pending for s in d["shards"]}
        shards = []
        for s in range(self.config.partition.shards):
            row = live.get(s)
            c = counts.get(s, {"live": 0, "deleted": 0})
            shards.append({
                "shard": s,
                "live_slice": row.slice if row else None,
                "checkpoint_key": row.key if row else None,
                "weights_path": str(self.store.root / row.path / "weights.safetensors") if row else None,
                "sha256": row.sha256 if row else None,
                "live_records": c["live"],
                "deleted_records": c["deleted"],
                "deletion_pending": s in pending_shards,
            })
        return {
            "store": str(self.store.root),
            "config": self.config.to_dict(),
            "config_digest": self.config.digest(),
            "classes": self.classes,
            "live_records": sum(s["live_records"] for s in shards),
            "deleted_records": sum(s["deleted_records"] for s in shards),
            "deletion_requests": len(self.store.deletions()),
            "pending_deletions": [d["request_id"] for d in pending],
            "checkpoints": len(self.store.checkpoints()),
            "embeddings_cached": self.store.embedding_count(),
            "shards": shards,
        }

    def audit(self) -> dict[str, Any]:
        """Verify every checkpoint's sha256; no checkpoint may hold a deleted record, and every
        live checkpoint must match its shard's current records."""
        self.manager.data.clear()  # check against what the store holds, not what was loaded
        deleted = self.store.deleted_ids()
        live = self.store.live()
        live_keys = {row.key: s for s, row in live.items()}
        expected = {p.shard: p.schedule.keys[-1]
                    for p in self.manager.plan(range(self.config.partition.shards))}
        violations: list[dict[str, Any]] = []

        def flag(row: Any, problem: str) -> None:
            violations.append({"shard": row.shard, "slice": row.slice, "key": row.key,
                               "path": str(self.store.root / row.path), "problem": problem})

        checked = 0
        rows = self.store.checkpoints()
        parents: dict[str, str | None] = {}
        for row in rows:
            checked += 1
            try:
                _, manifest = read_checkpoint_bytes(self.store.root / row.path, row.sha256)
            except CheckpointError as exc:
                flag(row, str(exc))
                continue
            parents[row.key] = manifest.get("parent")
            # Format 1 listed [id, digest] pairs of slices 0..k; format 2 the ids slice k added.
            held = {r[0] if isinstance(r, list) else r for r in manifest.get("records", [])} & deleted
            if held:
                flag(row, f"holds {len(held)} deleted record(s), e.g. {sorted(held)[:3]}")
            if manifest.get("key") != row.key:
                flag(row, f"manifest key {manifest.get('key')!r} differs from the recorded key")
            if row.key in live_keys and expected.get(row.shard) != row.key:
                flag(row, "live checkpoint does not match the shard's current records")
        # A checkpoint lists only the records its own slice added: the rest are in its parents,
        # which must all be present (and were checked above).
        known = {row.key for row in rows}
        for row in live.values():
            key: str | None = row.key
            while key is not None and key in parents:
                key = parents[key]
                if key is not None and key not in known:
                    flag(row, f"parent checkpoint {key} is missing: the records it trained on "
                              "cannot be accounted for")
        for s in range(self.config.partition.shards):
            if s not in live:
                violations.append({"shard": s, "slice": None, "key": None, "path": None,
                                   "problem": "shard has no live checkpoint"})
        for d in self.store.pending_deletions():
            violations.append({"shard": None, "slice": None, "key": None, "path": None,
                               "problem": f"deletion {d['request_id']} is pending on shards "
                                          f"{d['shards']}; run `sisa recover`"})
        return {"ok": not violations, "checkpoints_checked": checked, "violations": violations}
