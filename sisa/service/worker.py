"""The service's deletion worker: one thread that applies acknowledged deletions (its own, and any
another process acknowledged) and brings the retrained shards into the live model.

A deletion wakes it; it waits `batch_window` seconds for more to arrive, then applies everything
pending in one run, so a burst retrains each affected shard once (deletions acknowledged while it
retrains join the same run: the deletion manager plans again until nothing is pending). The store
commits each swap in one transaction; the live model then loads only the changed shards. At
every poll it also retries a WAL truncation a reader kept from completing (the old pages of a
deleted record may sit in the WAL until it succeeds).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from datetime import datetime

from sisa.api import Sisa
from sisa.errors import SisaError
from sisa.unlearning import DeletionReceipt

log = logging.getLogger("sisa.service")
_MAX_BACKOFF = 30.0  # seconds between attempts after repeated failures


def ack_to_applied(receipt: DeletionReceipt) -> float | None:
    """Seconds from a deletion's acknowledgement to its receipt (the shards live again)."""
    if not receipt.requested_at or not receipt.applied_at:
        return None
    return (datetime.fromisoformat(receipt.applied_at)
            - datetime.fromisoformat(receipt.requested_at)).total_seconds()


class DeletionWorker:
    """Applies pending deletions on its own thread, with its own writer of the store."""

    def __init__(self, sisa: Sisa, batch_window: float = 0.2, poll_interval: float = 1.0,
                 after_run: Callable[[list[DeletionReceipt]], None] | None = None,
                 on_failure: Callable[[Exception], None] | None = None) -> None:
        """`after_run`: called after every run that tried to apply something, failed or not, with
        the receipts of the deletions it applied (a failed run may have committed some before it
        failed)."""
        self.sisa = sisa
        self.batch_window = batch_window
        self.poll_interval = poll_interval
        self.after_run = after_run
        self.on_failure = on_failure
        self.failures: dict[str, str] = {}  # request id -> why the last attempt failed
        self.runs = 0  # apply runs that did something
        self.busy = False
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="sisa-deletion-worker", daemon=True)

    def start(self) -> DeletionWorker:
        self._thread.start()
        return self

    def notify(self) -> None:
        """A deletion was acknowledged: apply it (after the batching window)."""
        self._wake.set()

    def stop(self, timeout: float | None = None) -> None:
        """Stop after the current run (a run stopped by a crash is finished by the next writer)."""
        self._stop.set()
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def _loop(self) -> None:
        backoff = 0.0
        while not self._stop.is_set():
            woken = self._wake.wait(max(self.poll_interval, backoff))
            if self._stop.is_set():
                return
            if woken:
                self._wake.clear()
                if self.batch_window:
                    self._stop.wait(self.batch_window)  # let a burst arrive
            try:
                self.apply()
                self.scrub()
                backoff = 0.0
            except Exception as exc:  # the deletion stays pending (and its shards excluded)
                # Never let the thread die: a pending deletion would stay so forever.
                backoff = min(_MAX_BACKOFF, max(1.0, 2 * backoff))
                first = str(exc).splitlines()[0][:200] if isinstance(exc, SisaError) else ""
                log.error("applying deletions failed (retrying in %.0f s): %s %s", backoff,
                          type(exc).__name__, first)
                if self.on_failure is not None:
                    self.on_failure(exc)

    def apply(self) -> list[DeletionReceipt]:
        """Apply whatever is pending now (nothing to do is cheap: one query)."""
        pending = self.sisa.pending()
        if not pending and not self.sisa.lost_deletions():
            return []
        self.busy = True
        receipts: list[DeletionReceipt] = []
        try:
            try:
                self.sisa.apply_pending(receipts)
            except Exception as exc:
                for request in pending:
                    self.failures[request.request_id] = f"{type(exc).__name__}: {exc}"
                raise
            finally:
                if self.after_run is not None:
                    self.after_run(receipts)
            self.runs += 1
            for receipt in receipts:
                self.failures.pop(receipt.request_id, None)
        finally:
            self.busy = False  # after the hook: `wait_idle` then sees its counts and reloads
        return receipts

    def scrub(self) -> bool:
        """Truncate the WAL if a deletion's truncation is still owed (the service's own readers
        may have held it then); True when none is owed. Tried again at every poll until done."""
        return self.sisa.scrub()

    def wait_idle(self, timeout: float) -> bool:
        """True once nothing is pending (tests and shutdown)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.busy and not self.sisa.pending():
                return True
            time.sleep(0.05)
        return False
