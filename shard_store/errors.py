"""The store's own exceptions: it knows nothing of sisa, and its messages name files, not commands.

The `sisa` library maps each to its matching `SisaError`; the CLI adds the command that fixes it.
"""

from __future__ import annotations


class StoreError(Exception):
    """Base class: the store on disk is missing, of another version, or inconsistent."""


class StoreNotFound(StoreError):
    """There is no store at the given path."""


class StoreExists(StoreError):
    """A complete store (or some other content) is already at the path a new store should take."""


class StoreIncomplete(StoreError):
    """The store's creation was interrupted before its records were written."""


class StoreVersionError(StoreError):
    """The store's schema is not the one this code reads."""


class StoreCorrupt(StoreError):
    """The SQLite database cannot be read."""


class CheckpointFileError(StoreError):
    """A checkpoint file is missing, or its bytes do not match the digest the database recorded."""


class NotLocked(StoreError):
    """An operation that removes files ran without the writer lock."""


class SymlinkError(CheckpointFileError):
    """A path inside the store is a symbolic link: nothing is read or written through one."""


class StoreKeyError(StoreError):
    """The store's key is kept outside it and was not given, or the key given is not its key."""


class WitnessError(StoreError):
    """The witness kept outside the store is unreadable, of another store, or says the store is
    behind it."""
