"""Append-only logs of keyed JSON lines: the store's deletion journal, and the witness kept outside it.

Each line is a JSON object with a `mac`, the keyed digest of the rest (so a line cannot be forged or
edited without the store's key). A line is written whole and fsynced before the caller goes on; a
last line that a crash cut short (no newline) is cut off before the next append, never joined to
it. A log is never read or written through a symbolic link, and a log rebuilt is written to a
temporary file, fsynced and renamed into place.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import stat
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from shard_store.errors import StoreCorrupt, SymlinkError
from shard_store.files import fsync_dir
from shard_store.schema import keyed

PRIVATE_FILE = 0o600


def canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


def _open(path: Path, flags: int) -> int:
    try:
        return os.open(path, flags | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0), PRIVATE_FILE)
    except OSError as exc:
        if exc.errno == errno.ELOOP or path.is_symlink():
            raise SymlinkError(f"{str(path)!r} is a symbolic link: a log is never read or written "
                               "through one") from None
        raise


class KeyedLog:
    """A log file whose lines each carry a keyed digest in `domain`; `fields` are a line's body."""

    def __init__(self, path: Path, key: Callable[[], bytes], domain: str,
                 fields: tuple[str, ...] | None = None) -> None:
        self.path = path
        self.key = key  # called when a line is written or checked (the key may be external)
        self.domain = domain
        self.fields = fields  # None: every field but the mac
        self._cache: tuple[tuple[int, int, int], list[dict[str, Any]], list[int]] | None = None

    def _line(self, body: Mapping[str, Any]) -> bytes:
        return (canonical({**body, "mac": keyed(self.key(), self.domain, canonical(body))}) + "\n").encode()

    def exists(self) -> bool:
        return self.path.exists() or self.path.is_symlink()

    def _data(self) -> bytes:
        fd = _open(self.path, os.O_RDONLY)
        with open(fd, "rb") as f:
            return f.read()

    def append(self, bodies: Iterable[Mapping[str, Any]]) -> None:
        """Append lines and fsync them (and the directory, for a new file)."""
        data = b"".join(self._line(b) for b in bodies)
        if not data:
            return
        created = not self.exists()
        self.cut_tail()  # a line a crash cut short must not swallow the first one written now
        fd = _open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
        try:
            view = memoryview(data)
            while view:  # a short write (a full disk) must not pass for a whole line
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        if created:
            fsync_dir(self.path.parent)

    def tail(self) -> int:
        """Bytes after the last newline: a line a crash cut short (0 when whole)."""
        if not self.exists():
            return 0
        data = self._data()
        return len(data) - (data.rfind(b"\n") + 1)

    def cut_tail(self) -> None:
        """Cut a line a crash left unfinished (what it recorded never took effect)."""
        tail = self.tail()
        if tail:
            fd = _open(self.path, os.O_WRONLY)
            try:
                os.ftruncate(fd, os.fstat(fd).st_size - tail)
                os.fsync(fd)
            finally:
                os.close(fd)

    def read(self) -> tuple[list[dict[str, Any]], list[int]]:
        """The sound lines' bodies, and the numbers of the lines that are damaged or were edited
        (a last line cut short is neither: it is ignored). Cached while the file is unchanged."""
        if not self.exists():
            return [], []
        fd = _open(self.path, os.O_RDONLY)
        with open(fd, "rb") as f:
            info = os.fstat(f.fileno())
            stamp = (info.st_size, info.st_mtime_ns, info.st_ino)
            if self._cache is not None and self._cache[0] == stamp:
                return list(self._cache[1]), list(self._cache[2])
            complete = f.read().split(b"\n")[:-1]  # what follows the last newline: cut short
        entries, damaged = [], []
        key = self.key() if complete else b""
        for number, raw in enumerate(complete, start=1):
            try:
                entry = json.loads(raw)
                body = ({k: entry[k] for k in self.fields} if self.fields is not None
                        else {k: v for k, v in entry.items() if k != "mac"})
                sound = entry["mac"] == keyed(key, self.domain, canonical(body))
            except (ValueError, KeyError, TypeError, AttributeError):
                sound = False
            if sound:
                entries.append(body)
            else:
                damaged.append(number)
        self._cache = (stamp, entries, damaged)
        return list(entries), list(damaged)

    def first(self) -> dict[str, Any] | None:
        """The first line as written, unchecked (to say whose a log is before its mac is)."""
        if not self.exists():
            return None
        try:
            first = json.loads(self._data().split(b"\n", 1)[0])
        except ValueError:
            return None
        return first if isinstance(first, dict) else None

    def entries(self) -> list[dict[str, Any]]:
        """The lines' bodies; a damaged or edited line is StoreCorrupt (nothing it says can be
        trusted until the log is rebuilt)."""
        entries, damaged = self.read()
        if damaged:
            raise StoreCorrupt(f"{str(self.path)!r} line {damaged[0]} is damaged or was edited: "
                               "what it records cannot be trusted")
        return entries

    def rewrite(self, bodies: Iterable[Mapping[str, Any]]) -> None:
        """Replace the log with these lines, atomically (a temporary beside it, fsynced, renamed);
        a link in its place is replaced, never followed."""
        tmp = self.path.with_name(f".{self.path.name}.rebuild")
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, PRIVATE_FILE)
        try:
            data = b"".join(self._line(b) for b in bodies)
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, self.path)
        fsync_dir(self.path.parent)
        self._cache = None

    def mode(self) -> int | None:
        """The file's permission bits (None if it is missing)."""
        try:
            return stat.S_IMODE(os.stat(self.path, follow_symlinks=False).st_mode)
        except FileNotFoundError:
            return None
