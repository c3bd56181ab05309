"""Error hierarchy: every error sisa raises is a `SisaError`.

Subclasses also inherit the matching built-in, so `except KeyError` keeps working, and every class
pickles across Ray processes (fields travel through `__reduce__`). Messages name the bad value and
what is wrong; the CLI adds the command that fixes it (see `sisa.cli.HINTS`).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

MAX_NAMED = 10  # values quoted in one message before "... and N more"


MAX_ITEM_CHARS = 80  # an item longer than this is cut: an error never echoes a huge input back


def _shorten(text: str) -> str:
    if len(text) <= MAX_ITEM_CHARS:
        return text
    return f"{text[:MAX_ITEM_CHARS]}... ({len(text):,} characters)"


def name_some(items: Iterable[Any], limit: int = MAX_NAMED, quote: bool = False,
              total: int | None = None) -> str:
    """Up to `limit` items, comma-separated, then "... and N more"; each item at most
    MAX_ITEM_CHARS characters (the rest is counted, not shown). `total`: how many there are, where
    `items` holds only the first few."""
    items = list(items)
    shown = items[:limit]
    more = (len(items) if total is None else total) - len(shown)
    text = ", ".join(_shorten(repr(i) if quote else str(i)) for i in shown)
    return text + (f" ... and {more} more" if more > 0 else "")


class SisaError(Exception):
    """Base class of every error raised by sisa."""

    def __reduce__(self) -> tuple[Any, ...]:
        return (self.__class__, self.args)


class ConfigError(SisaError, ValueError):
    """A configuration value is invalid; the message quotes it."""


class InputKindError(ConfigError):
    """The backend needs the other kind of input (a text column, or numeric feature columns)."""


class RecordError(SisaError, ValueError):
    """Input records are malformed: duplicate, empty or missing ids, missing labels, bad columns."""


class DeletionTargetError(RecordError):
    """A deletion names both record ids and a group, or neither: it names one or the other."""


def check_deletion_target(ids: Iterable[str] | None, group: str | None) -> None:
    """A deletion names record ids or a group, never both nor neither (else `DeletionTargetError`,
    a `RecordError`): one rule for the library, the CLI and the HTTP service. Here, in the light
    module, so that `sisa forget` checks it before handing the deletion to a running service
    without importing torch."""
    if ids is not None and group is not None:
        raise DeletionTargetError("give either record ids or a group id to delete, not both "
                                  "(nothing was deleted)")
    if ids is None and group is None:
        raise DeletionTargetError("give either record ids or a group id to delete")


class ColumnError(RecordError):
    """The input lacks a column the data spec names, or the data spec names none."""


class UnknownRecordError(SisaError, KeyError):
    """A record id (or group id) given to forget is not in the store."""

    def __str__(self) -> str:  # KeyError quotes its message; keep it readable
        return str(self.args[0]) if self.args else ""


class UnknownReceiptError(UnknownRecordError):
    """No applied deletion has the receipt asked for (by request id or sequence number)."""


class StoreError(SisaError, RuntimeError):
    """The store on disk is missing, of another version, or inconsistent."""


class StoreNotFoundError(StoreError):
    """There is no store at the given path."""


class StoreExistsError(StoreError):
    """A store (or other content) is already where a new store should go."""


class IncompleteStoreError(StoreError):
    """The store's creation was interrupted; creating it again replaces it."""


class NoServableShardError(StoreError):
    """Every shard is empty, or has a deletion pending: the ensemble has nothing to serve."""


class RecordCorruptError(StoreError):
    """A stored record's content no longer matches its content digest (damage or tampering)."""


class StoreCorruptError(StoreError):
    """The store's SQLite database is damaged or is not a database."""


class CheckpointError(StoreError):
    """A checkpoint file is missing, malformed, or does not match its recorded sha256."""


class SymlinkError(CheckpointError):
    """A path inside the store is a symbolic link: nothing is read or written through one."""


class StoreKeyError(StoreError):
    """The store's ledger key is kept outside it and was not given, or the key given is not its."""


class WitnessError(StoreError):
    """The witness kept outside the store is missing, unreadable or another store's, or a writer
    of a witnessed store was not given it."""


class DamagedStoreError(StoreError):
    """A writer found damage it did not build on: the shards it blocks stay out of service (the
    others' work was done); the message names them and the remedy."""

    def __init__(self, message: str, blocked: dict[int, str] | None = None,
                 applied: list[str] | None = None) -> None:
        super().__init__(message)
        self.blocked = dict(blocked or {})
        self.applied = list(applied or [])

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (str(self), self.blocked, self.applied))


class CheckpointMovedError(StoreError):
    """A live checkpoint was replaced (by a deletion or a retrain) while it was being read: read
    the servable shards again. Transient, never damage."""


class RayExposureError(SisaError, RuntimeError):
    """A local Ray would listen on more than the loopback interface, so sisa does not start it."""


class DatasetUnavailableError(SisaError, RuntimeError):
    """A built-in data set's or model's package is not installed; the message says how to install it."""


class ShardTrainingError(SisaError, RuntimeError):
    """Training one shard failed after its retries; carries the shard and the original traceback."""

    def __init__(self, shard: int, attempts: int, traceback_text: str) -> None:
        super().__init__(shard, attempts, traceback_text)
        self.shard = shard
        self.attempts = attempts
        self.traceback_text = traceback_text

    def __str__(self) -> str:
        return (
            f"training shard {self.shard} failed after {self.attempts} attempt(s); "
            f"original traceback:\n{self.traceback_text}"
        )
