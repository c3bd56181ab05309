"""The service's view of the ensemble: the live checkpoints that may serve, loaded once each, and
the rule that no answer ever comes from a shard a deletion has reached.

Every answer is checked twice against the store: before (which shards may serve, and which
checkpoint is live in each) and after the model ran. A shard whose checkpoint stopped being the
servable one in between (a deletion was acknowledged, here or by another process, or a retrained
checkpoint went live) does not count towards the answer. So an answer reflects the store at a
moment between the request's arrival and its reply, and a deletion acknowledged (its `202` sent)
before a request arrived is never in it. Checkpoints are cached by shard and weights sha256 (and
named `shard-3@<sha256 prefix>` in answers), so no cache can hand out a pre-deletion adapter.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

import numpy as np

from sisa.api import Sisa
from sisa.checkpoint import Checkpoint
from sisa.ensemble import Ensemble
from sisa.errors import CheckpointError, NoServableShardError
from sisa.status import model_version, servable, store_errors

T = TypeVar("T")
_ATTEMPTS = 5  # answers computed again when the servable shards changed while one ran
_JOURNAL_WAITS = 100  # x 10 ms: how long a journalled deletion may take to reach the database
_POLL = 0.05  # seconds between looks at the store while a request waits for a retrained shard


def adapter_id(shard: int, sha256: str) -> str:
    """How a shard's weights are named everywhere in the service: shard and content digest."""
    return f"shard-{shard}@{sha256[:16]}"


@dataclass(frozen=True)
class ModelVersion:
    """Which checkpoints produced an answer."""

    version: str  # digest of the (shard, weights sha256) pairs below
    shards: dict[int, str]  # shard -> sha256 of the weights that served
    excluded: list[int]  # shards holding records that did not serve (a deletion pending, reloading)

    def to_dict(self) -> dict[str, Any]:
        return {"version": self.version,
                "shards": {str(s): sha for s, sha in sorted(self.shards.items())},
                "adapters": [adapter_id(s, sha) for s, sha in sorted(self.shards.items())],
                "excluded_shards": self.excluded}


class Unavailable(NoServableShardError):
    """No answer now: every shard is excluded, or a waited-for shard stayed pending."""

    def __init__(self, message: str, excluded: Sequence[int]) -> None:
        super().__init__(message)
        self.excluded = list(excluded)

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (str(self), self.excluded))


class LiveModel:
    """The servable shards of one store (opened read-only), for many request threads at once."""

    def __init__(self, sisa: Sisa, on_pending: Literal["exclude", "wait"] = "exclude",
                 wait_timeout: float = 30.0) -> None:
        self.sisa = sisa
        self.on_pending = on_pending
        self.wait_timeout = wait_timeout
        self.shard_count = sisa.config.partition.shards
        self._lock = threading.Lock()  # one reload at a time
        self._cache: dict[tuple[int, str], Checkpoint] = {}  # (shard, weights sha256) -> checkpoint
        self._ensemble: Ensemble | None = None
        self._loaded: dict[int, str] = {}  # shard -> sha256 of what the ensemble holds
        self.shards_read = 0  # checkpoints read from disk since start (a reload reads only changes)

    # -- the store's view ------------------------------------------------------------------------

    def servable(self) -> dict[int, str]:
        """shard -> sha256 of the live checkpoint that may serve now. While the journal holds a
        deletion the database lacks, nothing may serve (see `sisa.status.servable`); that is
        almost always a deletion being acknowledged this moment (the journal is written first,
        and its `202` sent only once the database has it), so wait for it a little. A journal
        found complete before the database is read means every deletion acknowledged by then is
        in what is read."""
        store = self.sisa.store
        with store_errors(repr(str(store.root / "store.db"))):
            for _ in range(_JOURNAL_WAITS):
                if not store.journal_missing():
                    return {s: row.sha256 for s, row in servable(store, journal=False).items()}
                time.sleep(0.01)
        return {}

    def excluded(self, used: dict[int, str]) -> list[int]:
        """Shards with records that are not among `used` (pending, or not loaded yet)."""
        with store_errors(repr(str(self.sisa.store.root / "store.db"))):
            empty = {s for s, row in self.sisa.store.live().items() if row.record_count == 0}
        return sorted(set(range(self.shard_count)) - set(used) - empty)

    @property
    def loaded(self) -> dict[int, str]:
        return dict(self._loaded)

    def refresh(self, live: dict[int, str] | None = None, exact: bool = True) -> Ensemble:
        """The ensemble of the servable shards (`live`), reading only checkpoints not yet cached.
        Without `exact`, an ensemble holding more shards (with the same weights) will do: the
        caller drops the extra shards' outputs. A new checkpoint rebuilds the ensemble from the
        cache (for the adapter backends, on a base model loaded again)."""
        live = self.servable() if live is None else live
        with self._lock:
            current = self._ensemble
            if current is not None and live and all(self._loaded.get(s) == sha for s, sha in live.items()):
                # Everything that may serve is loaded: with `exact`, a view of just those shards
                # (a shard excluded reloads nothing; only a new checkpoint does).
                return current if not exact or self._loaded == live else current.subset(live)
            if not live:
                raise Unavailable("no shard can serve: every shard is empty or has a deletion pending",
                                  self.excluded({}))
            wanted = set(live.items())
            for key in sorted(wanted):
                shard, sha = key
                if key not in self._cache:
                    row = self.sisa.store.live().get(shard)
                    if row is None or row.sha256 != sha:
                        break  # it changed since `live` was read: read the store again
                    try:
                        self._cache[key] = self.sisa.manager.read_checkpoint(row.key, row)
                    except CheckpointError:
                        if self.servable().get(shard) == sha:
                            raise  # damage, not a writer that swapped it meanwhile
                        break
                    self.shards_read += 1
            else:
                for key in set(self._cache) - set(wanted):
                    del self._cache[key]
                checkpoints = {s: self._cache[(s, sha)] for s, sha in wanted}
                ensemble = Ensemble(self.sisa.backend, self.sisa.features, checkpoints,
                                    self.sisa.config.partition.seed)
                self._ensemble, self._loaded = ensemble, dict(live)  # the swap, all at once
                return ensemble
        return self.refresh(None, exact)

    # -- answering -------------------------------------------------------------------------------

    def _live(self) -> dict[int, str]:
        """The servable shards; in wait mode, once no shard with records is excluded."""
        live = self.servable()
        if self.on_pending == "exclude":
            return live
        deadline = time.monotonic() + self.wait_timeout
        while self.excluded(live):
            if time.monotonic() >= deadline:
                excluded = self.excluded(live)
                raise Unavailable(f"shard(s) {excluded} still retraining after a deletion; waited "
                                  f"{self.wait_timeout:g} s", excluded)
            time.sleep(_POLL)
            live = self.servable()
        return live

    def shard_proba(self, inputs: Sequence[Any] | np.ndarray) -> tuple[dict[int, np.ndarray], ModelVersion]:
        """Each servable shard's class probabilities; a shard whose checkpoint stopped being
        servable while the model ran is left out of the answer."""
        for _ in range(_ATTEMPTS):
            live = self._live()
            ensemble = self.refresh(live, exact=False)
            proba = ensemble.shard_proba(inputs)
            after = self.servable()
            used = {s: sha for s, sha in live.items() if after.get(s) == sha and s in proba}
            if used and (self.on_pending == "exclude" or used == after):
                return {s: proba[s] for s in sorted(used)}, self._version(used)
        raise Unavailable("the servable shards kept changing while answering; try again",
                          self.excluded({}))

    def run(self, answer: Callable[[Ensemble], T]) -> tuple[T, ModelVersion]:
        """`answer(ensemble)` from exactly the servable shards, computed again if they changed
        while it ran (generation and scoring mix every shard at every token)."""
        for _ in range(_ATTEMPTS):
            live = self._live()
            ensemble = self.refresh(live, exact=True)
            result = answer(ensemble)
            if self.servable() == live:
                return result, self._version(live)
        raise Unavailable("the servable shards kept changing while answering; try again",
                          self.excluded({}))

    def _version(self, used: dict[int, str]) -> ModelVersion:
        return ModelVersion(model_version(used), dict(sorted(used.items())), self.excluded(used))
