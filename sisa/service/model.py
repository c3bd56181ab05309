"""The service's view of the ensemble: the live checkpoints that may serve, and the rule that no
answer ever comes from a shard a deletion has reached.

Every answer is checked twice against the store: before (which shards may serve, and which
checkpoint is live in each) and after the model ran. A shard whose checkpoint stopped being the
servable one in between (a deletion was acknowledged, here or by another process, or a retrained
checkpoint went live) does not count towards the answer. So an answer reflects the store at a
moment between the request's arrival and its reply, and a deletion acknowledged (its `202` sent)
before a request arrived is never in it. The models come from `Sisa.ensemble` (the one loader),
which caches checkpoints by shard and weights sha256 (named `shard-3@<sha256 prefix>` in answers),
so no cache can hand out a pre-deletion adapter. Each check costs microseconds: the store is read
in full only when its change counter moved (see `LiveModel._read`).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar, cast

import numpy as np

from sisa.api import Sisa
from sisa.errors import CheckpointMovedError, NoServableShardError
from sisa.serving.ensemble import Ensemble
from sisa.status import model_version

T = TypeVar("T")
_ATTEMPTS = 5  # answers computed again when the servable shards changed while one ran
_JOURNAL_WAIT = 1.0  # seconds a journalled deletion may take to reach the database
_POLL = 0.05  # seconds between looks at the store while a request waits for a retrained shard


def adapter_id(shard: int, sha256: str) -> str:
    """How a shard's weights are named everywhere in the service: shard and content digest."""
    return f"shard-{shard}@{sha256[:16]}"


@dataclass(frozen=True)
class ModelVersion:
    """Which checkpoints produced an answer."""

    version: str  # digest of the (shard, weights sha256) pairs below
    shards: dict[int, str]  # shard -> sha256 of the weights that served
    excluded: list[int]  # shards holding records that did not serve (a deletion pending, damage)
    why: dict[int, str] = field(default_factory=dict)  # excluded shard -> why it did not serve

    def to_dict(self) -> dict[str, Any]:
        return {"version": self.version,
                "shards": {str(s): sha for s, sha in sorted(self.shards.items())},
                "adapters": [adapter_id(s, sha) for s, sha in sorted(self.shards.items())],
                "excluded_shards": self.excluded,
                "excluded_why": {str(s): w for s, w in sorted(self.why.items())}}


class Unavailable(NoServableShardError):
    """No answer now: every shard is excluded, or a waited-for shard stayed pending."""

    def __init__(self, message: str, excluded: Sequence[int]) -> None:
        super().__init__(message)
        self.excluded = list(excluded)

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (str(self), self.excluded))


@dataclass(frozen=True)
class _View:
    """One read of the store: the servable shards, and every shard holding records."""

    live: dict[int, str]  # shard -> weights sha256 (see `Sisa.servable`); never changed once made
    holding: frozenset[int]

    def excluded(self, used: Collection[int]) -> list[int]:
        """Shards holding records that are not among `used`."""
        return sorted(self.holding.difference(used))


class LiveModel:
    """The servable shards of one store (opened read-only), for many request threads at once."""

    def __init__(self, sisa: Sisa, on_pending: Literal["exclude", "wait"] = "exclude",
                 wait_timeout: float = 30.0) -> None:
        self.sisa = sisa
        self.on_pending = on_pending
        self.wait_timeout = wait_timeout
        self.full_reads = 0  # reads of the servable shards from the store (most looks need none)
        self._lock = threading.Lock()
        self._counter = -1  # the store's change counter at which everything in `_known` was read
        self._known: dict[str, Any] = {}  # what was read then, by what it is

    def servable(self) -> dict[int, str]:
        """shard -> sha256 of the live checkpoint that may serve now (see `Sisa.servable`)."""
        return dict(self._look().live)

    def _look(self) -> _View:
        """The store now: the servable shards, and which shards hold records."""
        return self._read("view", self._read_view)

    def _read_view(self) -> _View:
        with self._lock:
            self.full_reads += 1
        live = self.sisa.servable(wait=_JOURNAL_WAIT)
        return _View(live, frozenset(self.sisa.excluded(())))

    def _read(self, what: str, read: Callable[[], T]) -> T:
        """`read()`, or what it returned at this very change counter: the value a read now gives.

        Why the guarantee holds exactly. `Sisa.change_counter` returns the same number at two
        calls only if nothing a read sees changed between them: no commit by any connection of
        any process (SQLite's `data_version`, on a connection of its own that never writes, read
        in a read transaction of its own, so it sees every commit made before it began), no
        change to the deletion journal or the witness, no checkpoint found damaged by this
        process's loader. A value is kept only if the counter was the same before and after it
        was read: the store did not change during the read, so the value is what a read at any
        moment with that number gives. A later look that finds that number gets it (the store is
        as it was read); one that finds another number reads in full, as every look did before.
        So each look still reflects the store at the moment it is made: the look after the model
        ran sees a deletion acknowledged before it, wherever it was made. Interleavings:
        - a deletion acknowledged by another process (or this one's writer) between the looks:
          its commit, which unregisters the shard's live checkpoint in the same transaction,
          moves the counter, so the look after reads in full and the shard does not count;
        - an acknowledgement in flight (journalled, not yet committed): the journal's append
          moves the counter, and the full read waits for the commit (`_JOURNAL_WAIT`) as before;
        - a retrained checkpoint swapped in: one transaction, one commit, as a deletion;
        - WAL: a commit sits in the WAL, and a new read transaction sees it (the WAL index's
          header changes), so `data_version` moves; a WAL checkpoint or truncation may move it
          with nothing changed: one more full read, never a missed change;
        - a read that raced a change is used for the look that made it (as any full read was)
          and not kept; a value read at an older counter than one already kept is dropped.
        """
        counter = self.sisa.change_counter()
        with self._lock:
            if counter == self._counter and what in self._known:
                return cast(T, self._known[what])
        value = read()
        if self.sisa.change_counter() == counter:  # the store stood still while it was read
            with self._lock:
                if counter > self._counter:
                    self._counter, self._known = counter, {}
                if counter == self._counter:
                    self._known[what] = value
        return value

    def refresh(self, live: dict[int, str] | None = None, exact: bool = True) -> Ensemble:
        """The ensemble of the servable shards (`live`), reading only checkpoints not loaded yet;
        without `exact`, one holding more shards (with the same weights) will do."""
        for _ in range(_ATTEMPTS):
            live = self.servable() if live is None else live
            if not live:
                raise Unavailable("no shard can serve: every shard is empty or has a deletion "
                                  "pending", self._look().excluded(()))
            try:
                return self.sisa.ensemble(live, exact)
            except CheckpointMovedError:
                live = None  # a writer replaced one meanwhile: read the store again
        raise Unavailable("the servable shards kept changing while loading; try again",
                          self._look().excluded(()))

    def _live(self) -> _View:
        """The servable shards; in wait mode, once no shard with records is excluded."""
        view = self._look()
        if self.on_pending == "exclude":
            return view
        deadline = time.monotonic() + self.wait_timeout
        while excluded := view.excluded(view.live):
            if time.monotonic() >= deadline:
                raise Unavailable(f"shard(s) {excluded} still retraining after a deletion; waited "
                                  f"{self.wait_timeout:g} s", excluded)
            time.sleep(_POLL)
            view = self._look()
        return view

    def shard_proba(self, inputs: Sequence[Any] | np.ndarray) -> tuple[dict[int, np.ndarray], ModelVersion]:
        """Each servable shard's class probabilities; a shard whose checkpoint stopped being
        servable while the model ran is left out of the answer."""
        for _ in range(_ATTEMPTS):
            live = self._live().live
            ensemble = self.refresh(live, exact=False)
            proba = ensemble.shard_proba(inputs)
            after = self._look()
            used = {s: sha for s, sha in live.items() if after.live.get(s) == sha and s in proba}
            if used and (self.on_pending == "exclude" or used == after.live):
                return {s: proba[s] for s in sorted(used)}, self._version(used, after)
        raise Unavailable("the servable shards kept changing while answering; try again",
                          self._look().excluded(()))

    def run(self, answer: Callable[[Ensemble], T]) -> tuple[T, ModelVersion]:
        """`answer(ensemble)` from exactly the servable shards, computed again if they changed
        while it ran (generation and scoring mix every shard at every token)."""
        for _ in range(_ATTEMPTS):
            live = self._live().live
            ensemble = self.refresh(live, exact=True)
            result = answer(ensemble)
            after = self._look()
            if after.live == live:
                return result, self._version(live, after)
        raise Unavailable("the servable shards kept changing while answering; try again",
                          self._look().excluded(()))

    def _version(self, used: dict[int, str], after: _View) -> ModelVersion:
        """Which checkpoints answered, and which shards sat out as the look `after` found them."""
        excluded = after.excluded(used)
        why = {}
        if excluded:  # read only when a shard sits out (rarely): the reasons cost a few queries
            reasons = self._read("unservable", self.sisa.unservable)
            why = {s: reasons.get(s, "it changed while the answer was computed") for s in excluded}
        return ModelVersion(model_version(used), dict(sorted(used.items())), excluded, why)
