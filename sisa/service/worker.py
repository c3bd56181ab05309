"""The service's deletion worker: one thread that applies acknowledged deletions (its own, and any
another process acknowledged) and brings the retrained shards into the live model.

A deletion wakes it; it waits `batch_window` seconds for more to arrive, then applies everything
pending in one run, so a burst retrains each affected shard once (deletions acknowledged while it
retrains join the same run: the deletion manager plans again until nothing is pending). The store
commits each swap in one transaction; the live model then loads only the changed shards. At
every poll it also retries a WAL truncation a reader kept from completing (the old pages of a
deleted record may sit in the WAL until it succeeds).

Under uvicorn it runs in a process of its own (`WorkerProcess`, running `main`),
so retraining never competes with the request threads for one interpreter. The service talks to
it in JSON lines over the child's stdin and a copy of its stdout (nothing is pickled): it sends
`notify`, `ping` and `stop`; the child reports each run's receipts (as the ledger stores them,
no id in clear) and its failures, and the service loads the retrained shards as they arrive.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict
from datetime import datetime
from pathlib import Path
from typing import Any

from sisa.api import Sisa
from sisa.config import ExecutionConfig, StoreConfig
from sisa.errors import SisaError
from sisa.unlearning import DeletionReceipt

log = logging.getLogger("sisa.service")
_MAX_BACKOFF = 30.0  # seconds between attempts after repeated failures
_CHILD = "import sys; from sisa.service.worker import main; main(int(sys.argv[1]))"


def _longer(backoff: float) -> float:
    """The next wait after another failure: 1 s, then doubling, up to `_MAX_BACKOFF`."""
    return min(_MAX_BACKOFF, max(1.0, 2 * backoff))


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
                 on_failure: Callable[[Exception], None] | None = None,
                 on_begin: Callable[[], None] | None = None) -> None:
        """`after_run`: called after every run that tried to apply something, failed or not, with
        the receipts of the deletions it applied (a failed run may have committed some before it
        failed). `on_begin`: called as a run begins to apply something."""
        self.sisa = sisa
        self.batch_window = batch_window
        self.poll_interval = poll_interval
        self.after_run = after_run
        self.on_failure = on_failure
        self.on_begin = on_begin
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
                backoff = _longer(backoff)
                first = str(exc).splitlines()[0][:200] if isinstance(exc, SisaError) else ""
                log.error("applying deletions failed (retrying in %.0f s): %s %s", backoff,
                          type(exc).__name__, first)
                if self.on_failure is not None:
                    try:
                        self.on_failure(exc)
                    except Exception as hook:  # a hook's failure must not end the loop either
                        log.error("the deletion worker's failure hook failed: %s", type(hook).__name__)

    def apply(self) -> list[DeletionReceipt]:
        """Apply whatever is pending now (nothing to do is cheap: one query)."""
        pending = self.sisa.pending()
        if not pending and not self.sisa.lost_deletions():
            return []
        self.busy = True
        if self.on_begin is not None:
            self.on_begin()
        receipts: list[DeletionReceipt] = []
        try:
            try:
                self.sisa.apply_pending(receipts)
            except Exception as exc:
                for request in pending:
                    self.failures[request.request_id] = f"{type(exc).__name__}: {exc}"
                raise
            else:
                self.runs += 1
                for receipt in receipts:
                    self.failures.pop(receipt.request_id, None)
            finally:  # after the counts: the hook reports them
                if self.after_run is not None:
                    self.after_run(receipts)
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


class WorkerError(SisaError):
    """The worker process failed a run, or stopped."""


class WorkerProcess:
    """The deletion worker in a process of its own, with the interface of `DeletionWorker`.

    `sisa` is the service's writer of the same store (pending deletions, and the WAL truncation at
    close, which only the last connection can complete). The child opens its own writer (and
    finishes whatever a crash interrupted). If the child dies, it is started again (after 1 s,
    doubling up to 30 s while it keeps dying); the deletions it had not applied stay pending,
    durable, and their shards excluded."""

    def __init__(self, sisa: Sisa, store_dir: str | Path, execution: ExecutionConfig | None,
                 store_config: StoreConfig | None, batch_window: float = 0.2,
                 poll_interval: float = 1.0, nice: int = 0,
                 after_run: Callable[[list[DeletionReceipt]], None] | None = None,
                 on_failure: Callable[[Exception], None] | None = None) -> None:
        self.sisa = sisa
        self.after_run = after_run
        self.on_failure = on_failure
        self.failures: dict[str, str] = {}
        self.runs = 0
        self.busy = False
        self.starts = 0  # processes started (more than 1: it died and was started again)
        self.ready = False  # the child has opened the store and waits for deletions
        self._settings = {"store": str(Path(store_dir).resolve()), "batch_window": batch_window,
                          "poll_interval": poll_interval, "nice": nice,
                          "execution": asdict(execution) if execution is not None else None,
                          "store_config": asdict(store_config.resolved()) if store_config else None}
        self._process: subprocess.Popen[str] | None = None
        self._events: Any = None
        self._send_lock = threading.Lock()
        self._stop = threading.Event()
        self._pongs: dict[int, bool | None] = {}  # waiting pings -> their answer
        self._pinged = threading.Condition()
        self._pings = 0
        self._thread = threading.Thread(target=self._run, name="sisa-deletion-worker-events",
                                        daemon=True)

    @property
    def pid(self) -> int | None:
        process = self._process
        return process.pid if process is not None else None

    @property
    def alive(self) -> bool:
        process = self._process
        return process is not None and process.poll() is None and self._thread.is_alive()

    def start(self) -> WorkerProcess:
        """Start the child; it opens the store and applies whatever is pending. Deletions
        notified meanwhile wait in its input."""
        self._spawn()
        self._thread.start()
        return self

    def notify(self) -> None:
        self._send({"cmd": "notify"})

    def stop(self, timeout: float | None = 60.0) -> None:
        """Stop after the current run (a run stopped by a kill is finished by the next writer)."""
        self._stop.set()
        self._send({"cmd": "stop"})
        process = self._process
        if process is not None:
            try:
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                log.error("the deletion worker process did not stop in %s s: killed", timeout)
                process.kill()
                process.wait()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def scrub(self) -> bool:
        return self.sisa.scrub()

    def wait_idle(self, timeout: float) -> bool:
        """True once nothing is pending and every run's report was handled here (the retrained
        shards loaded): the child answers a ping only once idle, after its reports."""
        deadline = time.monotonic() + timeout
        with self._pinged:
            self._pings += 1
            ping = self._pings
            self._pongs[ping] = None
        try:
            if not self._send({"cmd": "ping", "id": ping, "timeout": timeout}):
                return False
            with self._pinged:
                while self._pongs[ping] is None:
                    left = deadline - time.monotonic()
                    if left <= 0 or not self.alive:
                        return False
                    self._pinged.wait(min(left, 0.5))
                return bool(self._pongs[ping]) and not self.sisa.pending()
        finally:
            with self._pinged:
                self._pongs.pop(ping, None)  # a late answer finds no waiter and is dropped

    # -- the channel -----------------------------------------------------------------------------

    def _send(self, message: Mapping[str, Any]) -> bool:
        process = self._process
        if process is None or process.stdin is None:
            return False
        with self._send_lock, contextlib.suppress(OSError, ValueError):
            process.stdin.write(json.dumps(message) + "\n")
            process.stdin.flush()
            return True
        return False

    def _spawn(self) -> None:
        """Start a child and send it its settings; its events come on a pipe of their own, so
        nothing it prints mixes in."""
        read, write = os.pipe()
        try:
            process = subprocess.Popen([sys.executable, "-c", _CHILD, str(write)],
                                       stdin=subprocess.PIPE, pass_fds=(write,), text=True)
        except BaseException:
            os.close(read)
            raise
        finally:
            os.close(write)
        with contextlib.suppress(OSError):  # the settings first: before anyone else may write
            assert process.stdin is not None
            process.stdin.write(json.dumps({"cmd": "settings", **self._settings}) + "\n")
            process.stdin.flush()
        self._events = os.fdopen(read, "r", encoding="utf-8")
        with self._send_lock:
            self._process = process
        self.starts += 1

    def _run(self) -> None:
        backoff = 0.0
        while True:
            try:
                for line in self._events:
                    try:
                        event = json.loads(line)
                        if event.get("event") == "ready":  # it opened the store: not dying at start
                            backoff, self.ready = 0.0, True
                        self._handle(event)
                    except Exception as exc:  # a report the service could not handle: log, go on
                        log.error("deletion worker process: handling its report failed: %s: %s",
                                  type(exc).__name__, str(exc).splitlines()[0][:200] if str(exc) else "")
            finally:
                with contextlib.suppress(OSError, ValueError):
                    self._events.close()
            process = self._process
            code = process.wait() if process is not None else None
            if process is not None and process.stdin is not None:
                with contextlib.suppress(OSError):
                    process.stdin.close()
            self.busy = self.ready = False
            with self._pinged:
                self._pinged.notify_all()
            if self._stop.is_set():
                return
            backoff = _longer(backoff)
            log.error("the deletion worker process exited (code %s): starting it again in %.0f s",
                      code, backoff)
            if self.on_failure is not None:
                self.on_failure(WorkerError(f"the deletion worker process exited with code {code}"))
            if self._stop.wait(backoff):
                return
            try:
                self._spawn()
            except OSError as exc:
                log.error("the deletion worker process could not start: %s", exc)
                return
            if self._stop.is_set():  # `stop` may have looked at the child before this one
                self._send({"cmd": "stop"})

    def _handle(self, event: dict[str, Any]) -> None:
        kind = event.get("event")
        if "failures" in event:
            self.failures = dict(event["failures"])
        if kind == "begin":
            self.busy = True
        elif kind == "run":
            self.runs = int(event.get("runs", self.runs))
            try:
                if self.after_run is not None:
                    self.after_run([DeletionReceipt.from_ledger(r) for r in event["receipts"]])
            finally:
                self.busy = False
        elif kind == "failure":
            if self.on_failure is not None:
                self.on_failure(WorkerError(str(event.get("error", ""))))
        elif kind == "pong":
            with self._pinged:
                if int(event["id"]) in self._pongs:
                    self._pongs[int(event["id"])] = bool(event.get("idle"))
                self._pinged.notify_all()


def main(events_fd: int) -> None:
    """The worker process: settings, then commands, as JSON lines on stdin; events on `events_fd`.
    Ends at `stop` or when stdin closes (the service is gone)."""
    events = os.fdopen(events_fd, "w", encoding="utf-8")
    lock = threading.Lock()

    def emit(**event: Any) -> None:
        with lock, contextlib.suppress(OSError, ValueError):  # the service is gone: stdin ends too
            events.write(json.dumps(event) + "\n")
            events.flush()

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a Ctrl-C is the service's to handle: it stops us
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings = json.loads(sys.stdin.readline() or "{}")
    os.nice(int(settings.get("nice", 0)))  # requests first: a retrain takes the CPU they leave
    execution = ExecutionConfig(**settings["execution"]) if settings.get("execution") else None
    store_config = StoreConfig(**settings["store_config"]) if settings.get("store_config") else None
    sisa = Sisa.open(settings["store"], execution, store_config=store_config)  # recovers first
    from sisa.training.shard_trainer import setup_process  # before the first retrain is timed

    setup_process(sisa.config.training.torch_threads, sisa.config.execution.device)
    worker: DeletionWorker

    def after_run(receipts: list[DeletionReceipt]) -> None:
        emit(event="run", receipts=[r.ledger_dict() for r in receipts], runs=worker.runs,
             failures=worker.failures)

    def on_failure(exc: Exception) -> None:
        emit(event="failure", error=f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}"
             if str(exc) else type(exc).__name__, failures=worker.failures)

    worker = DeletionWorker(sisa, float(settings["batch_window"]), float(settings["poll_interval"]),
                            after_run, on_failure, on_begin=lambda: emit(event="begin"))
    emit(event="ready", pid=os.getpid())
    if sisa.recovered_:  # deletions acknowledged while it started, applied as it opened the store
        after_run(sisa.recovered_)  # reported as a run (the worker has not started: 0 runs)
    worker.start()
    worker.notify()  # whatever is pending already

    def pong(ping: dict[str, Any]) -> None:
        idle = worker.wait_idle(float(ping.get("timeout", 60)))
        emit(event="pong", id=ping["id"], idle=idle)

    try:
        for line in sys.stdin:
            command = json.loads(line)
            if command.get("cmd") == "notify":
                worker.notify()
            elif command.get("cmd") == "ping":
                threading.Thread(target=pong, args=(command,), daemon=True).start()
            elif command.get("cmd") == "stop":
                break
    finally:
        worker.stop()
        with contextlib.suppress(SisaError, OSError):
            worker.scrub()
        sisa.close()

