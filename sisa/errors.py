"""Error hierarchy: every error sisa raises is a `SisaError`.

Subclasses also inherit the matching built-in, so `except KeyError` keeps working, and every class
pickles across Ray processes (fields travel through `__reduce__`).
"""

from __future__ import annotations

from typing import Any


class SisaError(Exception):
    """Base class of every error raised by sisa and shard_store."""

    def __reduce__(self) -> tuple[Any, ...]:
        return (self.__class__, self.args)


class ConfigError(SisaError, ValueError):
    """A configuration value is invalid; the message quotes it."""


class RecordError(SisaError, ValueError):
    """Input records are malformed: duplicate, empty or missing ids, missing labels, bad columns."""


class UnknownRecordError(SisaError, KeyError):
    """A record id (or group id) given to forget is not in the store."""

    def __str__(self) -> str:  # KeyError quotes its message; keep it readable
        return str(self.args[0]) if self.args else ""


class StoreError(SisaError, RuntimeError):
    """The store on disk is missing, of another version, or inconsistent."""


class CheckpointError(StoreError):
    """A checkpoint file is missing, malformed, or does not match its recorded sha256."""


class DatasetUnavailableError(SisaError, RuntimeError):
    """A built-in data set's package is not installed; the message says how to install it."""


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
