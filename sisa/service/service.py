"""The service's library side, with no HTTP in it: a store opened for serving (a read-only reader
that answers, and one writer that acknowledges deletions and, on the worker's thread, applies
them) and the deletion worker. The FastAPI app (`sisa.service.app`) is a thin shell over it, as
the CLI is over `Sisa`."""

from __future__ import annotations

import contextlib
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from sisa.api import Sisa
from sisa.config import Combine, ExecutionConfig, ServiceConfig, StoreConfig
from sisa.errors import (
    ConfigError,
    InputKindError,
    NoServableShardError,
    RecordError,
    SisaError,
    UnknownRecordError,
)
from sisa.inputs import model_reads
from sisa.records import FLOAT32_MAX, feature_problems, spec_columns
from sisa.reports import Generation, ScoreReport
from sisa.service.batching import GenerationBatcher
from sisa.service.metrics import Metrics
from sisa.service.model import LiveModel, ModelVersion
from sisa.service.worker import DeletionWorker, WorkerProcess, ack_to_applied
from sisa.tasks import ClassificationTask
from sisa.unlearning import DeletionReceipt, DeletionRequest

log = logging.getLogger("sisa.service")


@dataclass(frozen=True)
class Prediction:
    labels: list[str]
    probabilities: np.ndarray  # (n, classes), columns in `classes` order
    classes: list[str]
    model: ModelVersion


class Service:
    """One store, served. `worker=False`: deletions are acknowledged here and applied by a worker
    elsewhere (another `Service`'s, the Ray Serve driver's, or a CLI `sisa recover`). `opened`:
    the store as opened elsewhere, to read and acknowledge with (a Ray Serve replica's
    `RemoteSisa`; with `worker=False`)."""

    def __init__(self, store_dir: str | Path, config: ServiceConfig,
                 execution: ExecutionConfig | None = None, worker: bool = True,
                 store_config: StoreConfig | None = None, opened: Sisa | None = None) -> None:
        self.config = config
        self._opened = opened
        self.handoff_secret: str | None = None  # set where `sisa forget` may hand deletions here
        self.metrics = Metrics()
        self.started = time.time()
        self.writer: Sisa | None = None
        self.worker: DeletionWorker | WorkerProcess | None = None
        if config.deletions:
            # The writer first: where the worker runs, it finishes whatever a crash interrupted
            # before anything serves.
            self.writer = opened or Sisa.open(store_dir, execution, recover=worker,
                                              store_config=store_config)
            failed = lambda _exc: self.metrics.worker_failures.inc()  # noqa: E731
            if worker and config.worker == "process":
                self.worker = WorkerProcess(self.writer, store_dir, execution, store_config,
                                            config.batch_window, config.poll_interval,
                                            config.worker_nice, self._after_run, failed)
            elif worker:
                self.worker = DeletionWorker(self.writer, config.batch_window, config.poll_interval,
                                             self._after_run, failed)
        self.reader = opened or Sisa.open(store_dir, execution, recover=False, read_only=True,
                                          share_with=self.writer, store_config=store_config)
        self.model = LiveModel(self.reader, config.on_pending, config.wait_timeout)
        self.generations = GenerationBatcher()  # every request's prompts decode on one thread
        self._ack_lock = threading.Lock()
        self._counted = 0  # checkpoints read, as counted in the metrics

    def start(self) -> Service:
        """Load the servable shards, then start the worker (it applies anything still pending)."""
        from sisa.training.shard_trainer import setup_process  # torch's settings, once, up front

        setup_process(self.reader.config.training.torch_threads, self.reader.config.execution.device)
        # No shard may serve yet (a deletion pending): /readyz says so until the worker is done.
        with contextlib.suppress(NoServableShardError):
            self.model.refresh()
        self._loaded()
        if self.worker is not None:
            self.worker.start()
            self.worker.notify()
        return self

    def close(self) -> None:
        """Stop the worker, close the reader, and then truncate the WAL if a truncation after a
        deletion is still owed (this process's own reader may have kept it from completing)."""
        self.generations.close()
        if self.worker is not None:
            self.worker.stop()
        self.reader.close()
        if self.worker is not None:
            with contextlib.suppress(SisaError, OSError, sqlite3.Error):
                self.worker.scrub()
        if self.writer is not None:
            self.writer.close()

    # -- answers ---------------------------------------------------------------------------------

    @property
    def classifier(self) -> bool:
        return isinstance(self.reader.task, ClassificationTask)

    def named_inputs(self, inputs: Sequence[Mapping[str, Any]]) -> list[Any]:
        """Objects of column -> value as the model's rows (or texts), matched by name: each must
        hold the columns the model reads, and no key that no part of the data spec names. Errors
        name the input and the model's columns, never a key or a value of the request."""
        spec = self.reader.data_spec
        reads = model_reads(spec)
        known = set(spec_columns(spec))
        out: list[Any] = []
        for i, item in enumerate(inputs):
            if not isinstance(item, Mapping):
                raise InputKindError(f"input {i}: give every input as an object, or none")
            missing = [c for c in reads if c not in item]
            if missing:
                raise InputKindError(f"input {i} lacks the column(s) {missing}; the model reads "
                                     f"{reads}")
            if any(k not in known for k in item):
                raise InputKindError(f"input {i} has key(s) the model does not read; it reads {reads}")
            values = [item[c] for c in reads]
            if spec.kind == "text":
                out.append(values[0])
                continue
            for c, v in zip(reads, values, strict=True):
                if isinstance(v, bool) or not isinstance(v, (int, float)):
                    raise InputKindError(f"input {i}: column {c!r} must be a number")
            out.append(values)
        return out

    def check_inputs(self, inputs: Sequence[Any]) -> None:
        """Inputs of the kind and width this store's model takes (a RecordError names the first
        bad one)."""
        spec = self.reader.data_spec
        if spec.kind == "text":
            for i, x in enumerate(inputs):
                if not isinstance(x, str) or not x:
                    raise InputKindError(f"input {i}: this store's model takes non-empty texts")
            return
        width = len(spec.feature_columns)
        for i, x in enumerate(inputs):
            if isinstance(x, str) or len(x) != width:
                raise InputKindError(f"input {i}: this store's model takes rows of {width} numbers")
        # The same rules as a file's rows: finite, and within float32 (the models compute in it).
        finite, huge = feature_problems(np.asarray(inputs, dtype=np.float64).reshape(len(inputs), width))
        for i, (ok, big) in enumerate(zip(finite, huge, strict=True)):
            if not ok or big:
                raise RecordError(f"input {i}: numbers must be finite and within float32's range "
                                  f"(|x| <= {FLOAT32_MAX:.4g})")

    def predict(self, inputs: Sequence[Any]) -> Prediction:
        task = self.reader.task
        if not isinstance(task, ClassificationTask):
            raise InputKindError("this store holds a causal LM: use /v1/generate or /v1/score")
        if inputs and isinstance(inputs[0], Mapping):
            inputs = self.named_inputs(inputs)
        self.check_inputs(inputs)
        features = self.reader.data_spec.kind == "features"
        batch = np.asarray(inputs, dtype=np.float32) if features else list(inputs)
        proba, version = self.model.shard_proba(batch)
        voting = self.reader.config.voting
        combined = task.predict_proba(proba, voting)
        labels = [task.classes[i] for i in combined.argmax(axis=-1)]
        self._note(version)
        return Prediction(labels, combined, list(task.classes), version)

    def generate(self, prompts: Sequence[str], max_new_tokens: int, combine: Combine | None,
                 temperature: float, seed: int, stop: Sequence[str]) -> tuple[list[Generation], ModelVersion]:
        """`Sisa.generate`'s answer from the servable shards (`LiveModel.run` checks them before
        and after, and computes it again if they changed): the prompts decode beside those of
        concurrent requests under the very same shards (`GenerationBatcher`), with the same tokens."""
        self.reader.require_language_model()
        out, version = self.model.run(lambda ensemble: self.reader.generate(
            prompts, max_new_tokens, combine, temperature, seed, stop,
            ensemble=self.generations.bind(ensemble)))
        self._note(version)
        return out, version

    def score(self, texts: Sequence[str], prompts: Sequence[str] | None,
              combine: Combine | None) -> tuple[ScoreReport, ModelVersion]:
        self.reader.require_language_model()
        spec = self.reader.data_spec
        if prompts is not None and spec.prompt_column is None:
            raise RecordError("this store was trained without prompts: give texts only")
        if prompts is not None and len(prompts) != len(texts):
            raise RecordError(f"{len(prompts)} prompts for {len(texts)} texts: give one per text")
        # A store of conversations reads each text as one, a JSON list of messages.
        rows = [{spec.id_column: str(i), spec.input_column: t,
                 **({spec.prompt_column: prompts[i]} if prompts is not None and spec.prompt_column else {})}
                for i, t in enumerate(texts)]
        report, version = self.model.run(lambda ensemble: self.reader.score(rows, combine, ensemble=ensemble))
        self._note(version)
        return report, version

    def _note(self, version: ModelVersion) -> None:
        self.metrics.excluded.set(len(version.excluded))

    # -- deletions -------------------------------------------------------------------------------

    def acknowledge(self, ids: Sequence[str] | None, group: str | None) -> DeletionRequest:
        """Make a deletion durable and exclude its shards; the worker applies it."""
        if self.writer is None:
            raise ConfigError("this service serves no deletions")
        if ids is not None and len(ids) > self.config.max_deletion_ids:
            raise RecordError(f"{len(ids)} record ids in one request; at most "
                              f"{self.config.max_deletion_ids}: split it")
        begun = time.perf_counter()
        with self._ack_lock:
            try:
                # The ids in clear stay with the caller, not in this long-lived process's memory.
                request = self.writer.request_deletion(ids, group, keep_ids=False)
            except UnknownRecordError:  # its message quotes the ids: name the field, count them
                if group is not None:
                    raise UnknownRecordError("group: no record has that group id; nothing was "
                                             "deleted") from None
                unknown = len(set(ids or ()) - set(self.writer.records(list(ids or ()))))
                raise UnknownRecordError(f"ids: {unknown} of the {len(set(ids or ()))} ids are not in "
                                         "the store; nothing was deleted") from None
        if request.request_id:
            self.metrics.ack_seconds.observe(time.perf_counter() - begun)
            self.metrics.acknowledged.inc()
            log.info("deletion %s acknowledged: %d record(s), shard(s) %s", request.request_id,
                     len(request.record_ids), request.shards)
            if self.worker is not None:
                self.worker.notify()
        self.metrics.pending.set(len(self.reader.pending()))
        return request

    def deletion(self, request_id: str) -> dict[str, Any] | None:
        """A deletion's state: pending, applied (with its receipt) or failed (the worker's last
        attempt failed; it stays pending, its shards excluded, and is tried again)."""
        found = self.reader.deletion(request_id)
        return None if found is None else self._describe(found)

    def deletions(self, status: str | None, limit: int) -> list[dict[str, Any]]:
        """The last `limit` deletions (of a status), oldest first."""
        found = self.reader.deletions("pending" if status in ("pending", "failed") else None)
        described = [self._describe(d) for d in found]
        return [d for d in described if status is None or d["status"] == status][-limit:]

    def _describe(self, d: DeletionRequest) -> dict[str, Any]:
        failure = self.worker.failures.get(d.request_id) if self.worker is not None else None
        status = "failed" if d.status == "pending" and failure else d.status
        return {"request_id": d.request_id, "status": status, "shards": d.shards,
                "records": len(d.record_digests), "requested_at": d.requested_at,
                "applied_at": d.applied_at, "receipt": d.receipt,
                "error": failure.splitlines()[0][:300] if failure and status == "failed" else None}

    def _after_run(self, receipts: list[DeletionReceipt]) -> None:
        """The worker's hook: count and time the deletions it applied (those of a run that failed
        after committing some too), and load the retrained shards before the next request needs
        them."""
        self.metrics.pending.set(len(self.reader.pending()))
        for receipt in receipts:
            self.metrics.applied.inc()
            seconds = ack_to_applied(receipt)
            if seconds is not None:
                self.metrics.ack_to_applied.observe(seconds)
        with contextlib.suppress(NoServableShardError):  # nothing servable yet: requests say so
            self.model.refresh()
        self._loaded()

    def _loaded(self) -> None:
        read = self.reader.checkpoints_read
        self.metrics.shards_loaded.inc(read - self._counted)
        self._counted = read

    # -- reporting -------------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        store = self.reader.status().to_dict()
        live = self.reader.loaded
        worker = self.worker
        return {
            "store": store,
            "service": {
                "pid": os.getpid(),  # which process (Ray Serve replica) answered
                # how this process reads the store: its directory, or a keeper's answers
                "store_access": "directory" if self._opened is None else "keeper",
                "on_pending": self.config.on_pending,
                "loaded": {str(s): sha for s, sha in sorted(live.items())},
                "checkpoints_read": self.reader.checkpoints_read,
                "uptime_seconds": round(time.time() - self.started, 3),
                "worker": None if worker is None else {
                    "alive": worker.alive, "busy": worker.busy, "runs": worker.runs,
                    "failing": sorted(worker.failures),
                    "process": worker.pid if isinstance(worker, WorkerProcess) else None,
                    # a process worker: started, its store open (a deletion waits for it)
                    "ready": worker.ready if isinstance(worker, WorkerProcess) else worker.alive},
            },
        }

    def ready(self) -> tuple[bool, str]:
        """Whether an answer can be given now, and why not (the shards that may not serve, each
        with why)."""
        if self.worker is not None and not self.worker.alive:
            return False, "the deletion worker is not running"
        live = self.model.servable()
        out = self.reader.unservable()
        why = "; ".join(f"shard {s}: {reason}" for s, reason in out.items())
        if not live:
            return False, "no shard can serve" + (f" ({why})" if why else "")
        return True, f"{len(live)} shard(s) serving" + (f"; not serving: {why}" if why else "")
