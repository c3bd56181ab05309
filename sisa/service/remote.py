"""Serving a store from a node that cannot see its directory: a keeper beside the store
(`StoreKeeper`) answers what a replica asks, and the replica's `RemoteSisa` stands for the store.

The servable shards, the change counter and the deletions are the keeper's answers at the moment
asked (never kept by the replica), and checkpoints travel as bytes by (shard, weights sha256),
verified at both ends and cached by that digest. No transport here: `sisa.service.ray_serve`
carries the calls over Ray (and the bytes through its object store).
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable, Collection, Sequence
from pathlib import Path
from typing import Any, NoReturn, cast

from shard_store import RecordRow, ShardStore
from sisa.api import Sisa, serving_device
from sisa.checkpoint import Checkpoint
from sisa.config import DataSpec, ExecutionConfig, SisaConfig, StoreConfig
from sisa.custody import open_store
from sisa.errors import ConfigError, SisaError
from sisa.features import Features
from sisa.reports import StatusReport
from sisa.serving.loader import CheckpointFiles, Loader, received, store_files
from sisa.status import store_errors
from sisa.tasks import ModelSpec, task_from_meta
from sisa.training import LazyBackend
from sisa.unlearning import DeletionManager, DeletionRequest, TrainingReport

# call(method, *args) -> (True, what the keeper's method returned) or (False, the SisaError it
# raised); a transport that cannot reach the keeper raises a StoreError of its own.
Call = Callable[..., tuple[bool, Any]]
_META = ("config", "data_spec", "task", "model_spec")  # what a replica builds its model from


class StoreKeeper:
    """The store, for replicas that cannot read it: run where its directory is (the driver's
    node). It opens a reader (and, where the service takes deletions, a writer that only
    acknowledges: the deletion worker applies them elsewhere), and answers `call`s, each as a
    read of the store at that moment. Many calls at once (one thread each)."""

    METHODS = frozenset({"describe", "change_counter", "servable", "unservable", "excluded",
                         "checkpoint", "request_deletion", "records", "pending", "deletion",
                         "deletions", "status"})

    def __init__(self, store_dir: str | Path, execution: ExecutionConfig | None = None,
                 store_config: StoreConfig | None = None, deletions: bool = True) -> None:
        self.writer = (Sisa.open(store_dir, execution, recover=False, store_config=store_config)
                       if deletions else None)
        self.reader = Sisa.open(store_dir, execution, recover=False, read_only=True,
                                share_with=self.writer, store_config=store_config)
        self._store = open_store(store_dir, True, store_config)  # its checkpoint files, by digest
        self._files = store_files(self._store)
        self._ack = threading.Lock()  # one acknowledgement at a time, as `Service` makes them
        self.sent = 0  # checkpoints sent

    def call(self, method: str, *args: Any) -> tuple[bool, Any]:
        """`method(*args)`, one of `METHODS`: (True, its value), or (False, the SisaError it
        raised, which pickles, for the replica to raise)."""
        if method not in self.METHODS:
            return False, ConfigError(f"the store keeper answers {sorted(self.METHODS)}, not "
                                      f"{method!r}")
        try:
            return True, getattr(self, method)(*args)
        except SisaError as exc:
            return False, exc

    def close(self) -> None:
        self.reader.close()
        if self.writer is not None:
            self.writer.close()
        self._store.close()

    def describe(self) -> dict[str, Any]:
        """What a replica builds its model from: the store's config, data spec, task and model
        spec as the store holds them, and where the store is (for messages)."""
        with store_errors(repr(str(self.reader.root / "store.db"))):
            meta = {key: self._store.get_meta(key) for key in _META}
        return {**meta, "root": str(self.reader.root), "config_digest": self.reader.config_digest}

    def change_counter(self) -> int:
        return self.reader.change_counter()

    def servable(self, wait: float = 0.0) -> dict[int, str]:
        return self.reader.servable(wait)

    def unservable(self) -> dict[int, str]:
        return self.reader.unservable()

    def excluded(self, used: Collection[int]) -> list[int]:
        return self.reader.excluded(used)

    def checkpoint(self, shard: int, sha256: str) -> CheckpointFiles:
        """The live checkpoint of `shard` whose weights hash to `sha256`, as verified bytes
        (CheckpointMovedError once it is no longer live)."""
        with store_errors(repr(str(self.reader.root / "store.db"))):
            files = self._files(shard, sha256)
        self.sent += 1
        return files

    def request_deletion(self, ids: Sequence[str] | None, group: str | None) -> DeletionRequest:
        """Acknowledge a deletion: durable (and its shards excluded) when this returns."""
        if self.writer is None:
            raise ConfigError("this service serves no deletions")
        with self._ack:
            return self.writer.request_deletion(ids, group, keep_ids=False)

    def records(self, ids: Sequence[str]) -> dict[str, RecordRow]:
        return self.reader.records(ids)

    def pending(self) -> list[DeletionRequest]:
        return self.reader.pending()

    def deletion(self, request_id: str) -> DeletionRequest | None:
        return self.reader.deletion(request_id)

    def deletions(self, status: str | None = None) -> list[DeletionRequest]:
        return self.reader.deletions(status)

    def status(self) -> StatusReport:
        return self.reader.status()


class _Elsewhere:
    """The store's place in a `RemoteSisa`: no embedding cache (a replica encodes what it is
    asked, and keeps nothing), and anything else said to need the store itself."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def get_embeddings(self, model: str, digests: Sequence[str]) -> dict[str, bytes]:
        return {}

    def put_embeddings(self, model: str, dim: int, vectors: Any) -> None:
        return None

    def __getattr__(self, name: str) -> NoReturn:
        if name.startswith("__"):
            raise AttributeError(name)
        raise ConfigError(f"this replica serves {str(self.root)!r} through its keeper and cannot "
                          f"read the store itself ({name}): run that where the store is")


class RemoteSisa(Sisa):
    """A store read through its keeper (`call`): the `Sisa` that `Service` and `LiveModel` use,
    for a replica that cannot read the store's directory. Reads and acknowledges; the rest
    (training, forgetting, the audit) needs the store itself and raises ConfigError.

    Every look at the servable shards asks the keeper, which reads the store then (nothing is
    kept here but this replica's own damaged checkpoints), so `LiveModel`'s guarantee holds as on
    the store itself: a deletion acknowledged, by any replica, before a request arrived is never
    in its answer. Models load through this replica's own `Loader`, whose fetch asks the keeper
    for a checkpoint by shard and weights sha256 and verifies the bytes (`received`); they are
    cached by that digest. Acknowledgements keep no id in clear here (`keep_ids` is always off).
    """

    def __init__(self, call: Call, execution: ExecutionConfig | None = None) -> None:
        self._call = call
        about = self._ask("describe")
        self._root = Path(about["root"])
        self._digest: str = about["config_digest"]
        config = SisaConfig.from_dict(about["config"])
        self.config = config if execution is None else config.replace(execution=execution)
        self.data_spec = DataSpec(**about["data_spec"])
        self.task = task_from_meta(about["task"])
        elsewhere = _Elsewhere(self._root)
        self._store = cast(ShardStore, elsewhere)
        self._manager = cast(DeletionManager, elsewhere)
        self._progress = None
        self._backend = LazyBackend(self.config.training, ModelSpec(**about["model_spec"]))
        self._features = Features(self._store, self._backend)
        self._loader = Loader(self._backend, self._features, self.config.partition.seed,
                              functools.partial(serving_device, self.config.execution), self._fetch)
        self.training_report_ = TrainingReport()
        self.recovered_ = []
        self.damage_ = None

    def _ask(self, method: str, *args: Any) -> Any:
        ok, value = self._call(method, *args)
        if not ok:
            raise value
        return value

    def _fetch(self, shard: int, sha256: str) -> Checkpoint:
        files = self._ask("checkpoint", shard, sha256)
        return received(files, shard, sha256, f"shard {shard}@{sha256[:16]} of {str(self._root)!r}")

    @property
    def root(self) -> Path:
        """The store's directory, on the keeper's node."""
        return self._root

    @property
    def config_digest(self) -> str:
        return self._digest

    def close(self) -> None:
        return None  # nothing open here: the keeper holds the store

    # -- what `LiveModel` looks at, asked afresh every time --------------------------------------

    def change_counter(self) -> int:
        # Both terms only grow (the keeper's store counter; this replica's damaged checkpoints).
        return int(self._ask("change_counter")) + len(self._loader.damaged)

    def servable(self, wait: float = 0.0) -> dict[int, str]:
        live: dict[int, str] = self._ask("servable", wait)
        return {s: sha for s, sha in live.items() if s not in self._loader.unservable(live)}

    def unservable(self) -> dict[int, str]:
        why: dict[int, str] = dict(self._ask("unservable"))
        damaged = self._loader.unservable(self._ask("servable"))
        why.update({s: reason for s, reason in damaged.items() if s not in why})
        return dict(sorted(why.items()))

    def excluded(self, used: Collection[int]) -> list[int]:
        return list(self._ask("excluded", sorted(used)))

    # -- deletions and reports, the keeper's ------------------------------------------------------

    def request_deletion(self, ids: Sequence[str] | None = None, group: str | None = None,
                         keep_ids: bool = True) -> DeletionRequest:
        request: DeletionRequest = self._ask("request_deletion",
                                             None if ids is None else list(ids), group)
        return request

    def records(self, ids: Sequence[str]) -> dict[str, RecordRow]:
        return dict(self._ask("records", list(ids)))

    def pending(self) -> list[DeletionRequest]:
        return list(self._ask("pending"))

    def deletion(self, request_id: str) -> DeletionRequest | None:
        found: DeletionRequest | None = self._ask("deletion", request_id)
        return found

    def deletions(self, status: str | None = None) -> list[DeletionRequest]:
        return list(self._ask("deletions", status))

    def status(self) -> StatusReport:
        report: StatusReport = self._ask("status")
        return report

