"""Continuous batching of the service's generation: one thread decodes every request's prompts
(`sisa.serving.generation.Batch`), a prompt joining the others at the next step after it arrives
and leaving when it is done; each request still runs in its own `LiveModel.run`.

Prompts decode together only under the very same model and adapters (one base model of one
version of the store, one set of shards, one `combine`), so a request's answer comes from exactly
the shards its version names, and `LiveModel.run` checks them after it as before. A prompt alone
decodes as `Sisa.generate` does, at its speed; in company its tokens are still those (see
`sisa.serving.generation`).
"""

from __future__ import annotations

import copy
import logging
import threading
from collections.abc import Hashable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from sisa.config import Combine
from sisa.service.model import Unavailable
from sisa.serving.ensemble import Ensemble

if TYPE_CHECKING:  # the decoding imports torch, when the first prompt arrives
    from sisa.serving.generation import Batch, DecodeRequest

log = logging.getLogger("sisa.service")


@dataclass(eq=False)
class _Job:
    request: DecodeRequest
    done: Future[list[int]] = field(default_factory=Future)


class GenerationBatcher:
    """Decodes the prompts of every caller on one thread, side by side per model and set of
    adapters. Started at the first request; `close` stops it, failing what it still holds."""

    def __init__(self) -> None:
        self.steps = 0  # shared steps run (several prompts in one pass)
        self.solo_steps = 0  # steps of a prompt decoding alone (a prefill counts)
        self.prompts = 0  # prompts decoded
        self.fullest = 0  # the most prompts one shared step has run
        self._cond = threading.Condition()
        self._arrived: list[tuple[Hashable, Any, Combine, _Job]] = []
        self._groups: dict[Hashable, Batch] = {}  # the decoding thread's own
        self._thread: threading.Thread | None = None
        self._closed = False

    @property
    def pending(self) -> int:
        """Prompts handed in that the decoding thread has not taken up yet."""
        with self._cond:
            return len(self._arrived)

    @property
    def running(self) -> bool:
        """Whether the decoding thread is alive."""
        return self._thread is not None and self._thread.is_alive()

    def bind(self, ensemble: Ensemble) -> Ensemble:
        """A view of `ensemble` whose scorer decodes here (for `Sisa.generate(ensemble=...)`)."""
        view = copy.copy(ensemble)
        view.scorer = _Shared(ensemble.scorer, self)
        return view

    def decode(self, scorer: Any, requests: Sequence[DecodeRequest], combine: Combine) -> list[list[int]]:
        """Each request's new tokens under `scorer` (an `LMScorer`), decoded beside other callers'
        prompts; an error of one prompt is raised here, to its caller."""
        jobs = [_Job(r) for r in requests]
        # Same base model object (kept alive by its group), same adapters, same combine.
        key = (id(scorer.model), tuple(scorer.names), combine)
        with self._cond:
            if self._closed:
                raise Unavailable("the service is shutting down; try again", [])
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name="sisa-generate", daemon=True)
                self._thread.start()
            self._arrived.extend((key, scorer, combine, job) for job in jobs)
            self._cond.notify()
        return [job.done.result() for job in jobs]

    def close(self) -> None:
        """Stop the decoding thread; requests it still holds fail as `Unavailable`."""
        with self._cond:
            self._closed = True
            self._cond.notify()
            thread = self._thread
        if thread is not None:
            thread.join()

    # -- the decoding thread -----------------------------------------------------------------------

    def _loop(self) -> None:
        try:
            self._serve()
        finally:  # closed, or (never meant to happen) the loop itself broke: no caller waits forever
            with self._cond:
                self._closed = True
                arrived, self._arrived = self._arrived, []
            gone = Unavailable("the service is shutting down; try again", [])
            for *_, job in arrived:
                job.done.set_exception(gone)
            for group in self._groups.values():
                self._fail(group, gone)
            self._groups.clear()

    def _serve(self) -> None:
        from sisa.serving.generation import Batch

        while True:
            with self._cond:
                while not self._closed and not self._arrived and not self._groups:
                    self._cond.wait()
                if self._closed:
                    return
                arrived, self._arrived = self._arrived, []
            for key, scorer, combine, job in arrived:
                group = self._groups.get(key)
                if group is None:
                    try:
                        group = self._groups[key] = Batch(scorer, combine)
                    except Exception as exc:  # (the merged adapter): this prompt's error
                        job.done.set_exception(exc)
                        continue
                group.add(job.request, job)
            for key, group in list(self._groups.items()):
                steps, solo = group.shared_steps, group.solo_steps
                try:
                    finished = group.step()
                except Exception as exc:  # a fault of this loop's own: fail the group, go on
                    log.error("generation failed: %s", type(exc).__name__)  # the message may quote
                    self._fail(group, exc)
                    del self._groups[key]
                    continue
                self.steps += group.shared_steps - steps
                self.solo_steps += group.solo_steps - solo
                self.fullest = max(self.fullest, group.fullest)
                for job, result in finished:
                    if isinstance(result, Exception):
                        job.done.set_exception(result)
                    else:
                        self.prompts += 1
                        job.done.set_result(result)
                if not group.busy:
                    del self._groups[key]  # nothing left: let its model go

    @staticmethod
    def _fail(group: Batch, exc: BaseException) -> None:
        for job in group.tags:
            if not job.done.done():
                job.done.set_exception(exc)


class _Shared:
    """A scorer whose decoding runs on a `GenerationBatcher` (`SharedDecoding`); everything else
    is the scorer's."""

    def __init__(self, scorer: Any, batcher: GenerationBatcher) -> None:
        self._scorer = scorer
        self._batcher = batcher

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):  # not set yet (a copy being made): not the scorer's
            raise AttributeError(name)
        return getattr(self._scorer, name)

    def decode_requests(self, requests: Sequence[DecodeRequest], combine: Combine) -> list[list[int]]:
        return self._batcher.decode(self._scorer, requests, combine)
