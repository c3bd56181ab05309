"""The service's view of the ensemble: the live checkpoints that may serve, and the rule that no
answer ever comes from a shard a deletion has reached.

Every answer is checked twice against the store: before (which shards may serve, and which
checkpoint is live in each) and after the model ran. A shard whose checkpoint stopped being the
servable one in between (a deletion was acknowledged, here or by another process, or a retrained
checkpoint went live) does not count towards the answer. So an answer reflects the store at a
moment between the request's arrival and its reply, and a deletion acknowledged (its `202` sent)
before a request arrived is never in it. The models come from `Sisa.ensemble` (the one loader),
which caches checkpoints by shard and weights sha256 (named `shard-3@<sha256 prefix>` in answers),
so no cache can hand out a pre-deletion adapter.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

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


class LiveModel:
    """The servable shards of one store (opened read-only), for many request threads at once."""

    def __init__(self, sisa: Sisa, on_pending: Literal["exclude", "wait"] = "exclude",
                 wait_timeout: float = 30.0) -> None:
        self.sisa = sisa
        self.on_pending = on_pending
        self.wait_timeout = wait_timeout

    def servable(self) -> dict[int, str]:
        """shard -> sha256 of the live checkpoint that may serve now (see `Sisa.servable`)."""
        return self.sisa.servable(wait=_JOURNAL_WAIT)

    def refresh(self, live: dict[int, str] | None = None, exact: bool = True) -> Ensemble:
        """The ensemble of the servable shards (`live`), reading only checkpoints not loaded yet;
        without `exact`, one holding more shards (with the same weights) will do."""
        for _ in range(_ATTEMPTS):
            live = self.servable() if live is None else live
            if not live:
                raise Unavailable("no shard can serve: every shard is empty or has a deletion "
                                  "pending", self.sisa.excluded({}))
            try:
                return self.sisa.ensemble(live, exact)
            except CheckpointMovedError:
                live = None  # a writer replaced one meanwhile: read the store again
        raise Unavailable("the servable shards kept changing while loading; try again",
                          self.sisa.excluded({}))

    def _live(self) -> dict[int, str]:
        """The servable shards; in wait mode, once no shard with records is excluded."""
        live = self.servable()
        if self.on_pending == "exclude":
            return live
        deadline = time.monotonic() + self.wait_timeout
        while self.sisa.excluded(live):
            if time.monotonic() >= deadline:
                excluded = self.sisa.excluded(live)
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
                          self.sisa.excluded({}))

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
                          self.sisa.excluded({}))

    def _version(self, used: dict[int, str]) -> ModelVersion:
        excluded = self.sisa.excluded(used)
        why = {}
        if excluded:  # read only when a shard sits out (rarely): the reasons cost a few queries
            reasons = self.sisa.unservable()
            why = {s: reasons.get(s, "it changed while the answer was computed") for s in excluded}
        return ModelVersion(model_version(used), dict(sorted(used.items())), excluded, why)
