"""Checkpoint directories on disk: named files written atomically, and verified against their sha256.

The store writes and reads bytes; what the bytes mean (weights, a manifest, an adapter) is the
business of `sisa.checkpoint`. A directory is written to a temporary name, fsynced and renamed into
place, so a crash leaves either the whole directory or a temporary that `sweep` removes.

No symbolic link inside a store is ever followed: files are opened one path component at a time
with `O_NOFOLLOW` (a link anywhere on the way is an error naming it), walks never descend through
one, and removal unlinks a link itself, never what it points to. The bytes hashed are the bytes
returned: a file is read once.
"""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
import stat
import uuid
from collections.abc import Collection, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path, PurePosixPath

from shard_store.errors import CheckpointFileError, SymlinkError

TMP_PREFIX = ".tmp-"
PRIVATE_DIR, PRIVATE_FILE = 0o700, 0o600  # checkpoints are readable by the store's owner only


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)
_FILE = os.O_RDONLY | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)


@contextmanager
def opened(root: Path, relative: str | PurePosixPath, flags: int = _FILE,
           mode: int = 0o600) -> Iterator[int]:
    """A file descriptor of `root/relative`, opened one component at a time without following a
    symbolic link (the store's root itself is taken as given). A link on the way is SymlinkError;
    a missing file FileNotFoundError."""
    parts = PurePosixPath(relative).parts
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | getattr(os, "O_CLOEXEC", 0))
    try:
        for i, part in enumerate(parts):
            last = i == len(parts) - 1
            try:
                new = os.open(part, flags if last else _DIR, mode, dir_fd=fd)
            except OSError as exc:
                if exc.errno in (errno.ELOOP, errno.ENOTDIR) and _is_link(fd, part):
                    where = root.joinpath(*parts[:i + 1])
                    raise SymlinkError(f"{str(where)!r} is a symbolic link: nothing in a store is "
                                       "read or written through one") from None
                raise
            os.close(fd)
            fd = new
        yield fd
    finally:
        os.close(fd)


def _is_link(dir_fd: int, name: str) -> bool:
    try:
        return stat.S_ISLNK(os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mode)
    except OSError:
        return False


def read_bytes(root: Path, relative: str | PurePosixPath) -> bytes:
    """A file's bytes, read without following a link."""
    with opened(root, relative) as fd, open(fd, "rb", closefd=False) as f:
        return f.read()


def sha256_file(root: Path, relative: str | PurePosixPath) -> str:
    with opened(root, relative) as fd, open(fd, "rb", closefd=False) as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def symlinks(root: Path) -> list[str]:
    """Every symbolic link under `root`, as a path relative to it (the walk never follows one)."""
    found = []
    for top, dirs, names in os.walk(root, followlinks=False):
        for name in [*dirs, *names]:
            path = Path(top) / name
            if path.is_symlink():
                found.append(str(path.relative_to(root)))
    return sorted(found)


def dirname(shard: int, slice_: int, key: str) -> str:
    return f"shard-{shard:03d}/slice-{slice_:03d}-{key[:20]}"


def _fsync_file(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_CREAT | os.O_TRUNC | os.O_WRONLY, PRIVATE_FILE)
    with open(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _check_name(name: str) -> None:
    parts = PurePosixPath(name).parts
    if not parts or PurePosixPath(name).is_absolute() or ".." in parts:
        raise CheckpointFileError(f"checkpoint file name {name!r} leaves its directory")


def write_dir(root: Path, relative: str, blobs: Mapping[str, bytes]) -> dict[str, str]:
    """Write `blobs` (file name -> bytes) as the directory `root/relative`; returns each file's
    sha256. An existing directory with the very same files is kept (its name is content-addressed
    by the caller); any other is replaced."""
    digests = {name: sha256_bytes(data) for name, data in blobs.items()}
    for name in blobs:
        _check_name(name)
    final = root / relative
    if final.is_symlink() or final.exists():
        try:
            verify_dir(root, relative, digests)
            return digests
        except (CheckpointFileError, OSError):
            remove(root, relative)  # a stale or damaged copy (or a link): replace it
    _real_dirs(root, PurePosixPath(relative).parent)
    final.parent.mkdir(parents=True, exist_ok=True, mode=PRIVATE_DIR)
    # Beside its final place: the rename stays in one directory, and `entries` lists it.
    tmp = final.parent / f"{TMP_PREFIX}{uuid.uuid4().hex}"
    tmp.mkdir(parents=True, mode=PRIVATE_DIR)
    try:
        for name, data in blobs.items():
            target = tmp / name
            target.parent.mkdir(parents=True, exist_ok=True, mode=PRIVATE_DIR)
            _fsync_file(target, data)
        fsync_dir(tmp)
        os.replace(tmp, final)
        fsync_dir(final.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return digests


def read_files(root: Path, relative: str, digests: Mapping[str, str],
               names: Collection[str]) -> dict[str, bytes]:
    """The bytes of `names` from the checkpoint directory `root/relative`, each read once (without
    following a link) and checked against its recorded sha256."""
    directory = root / relative
    out = {}
    for name in names:
        if name not in digests:
            raise CheckpointFileError(f"checkpoint {str(directory)!r} has no recorded file {name!r}")
        path = directory / name
        try:
            data = read_bytes(root, PurePosixPath(relative) / name)
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            raise CheckpointFileError(f"checkpoint file {str(path)!r} is missing") from None
        actual = sha256_bytes(data)
        if actual != digests[name]:
            raise CheckpointFileError(
                f"checkpoint file {str(path)!r} is corrupt: sha256 {actual[:16]}... does not "
                f"match the recorded {digests[name][:16]}..."
            )
        out[name] = data
    return out


def verify_dir(root: Path, relative: str, digests: Mapping[str, str]) -> None:
    """Every recorded file is present and intact, and the directory holds nothing else (no other
    file, and no link anywhere)."""
    directory = root / relative
    for name, expected in digests.items():
        path = directory / name
        try:
            actual = sha256_file(root, PurePosixPath(relative) / name)
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            raise CheckpointFileError(f"checkpoint file {str(path)!r} is missing") from None
        if actual != expected:
            raise CheckpointFileError(
                f"checkpoint file {str(path)!r} is corrupt: its sha256 does not match the recorded one")
    links = symlinks(directory)
    if links:
        raise SymlinkError(f"checkpoint {str(directory)!r} holds symbolic links {links[:5]}")
    extra = sorted(str(p.relative_to(directory)) for p in directory.rglob("*")
                   if p.is_file() and str(p.relative_to(directory)) not in digests)
    if extra:
        raise CheckpointFileError(f"checkpoint {str(directory)!r} holds unrecorded files {extra[:5]}")


def entries(root: Path, top: str) -> list[str]:
    """Every checkpoint directory, temporary or stray file under `root/top`, as paths relative to
    `root` (the form the database records), e.g. `checkpoints/shard-000/slice-001-...`. A link is
    not listed (nor followed): links are the audit's to report and `repair`'s to remove."""
    base = root / top
    if base.is_symlink() or not base.is_dir():
        return []
    found = []
    with os.scandir(base) as listing:  # scandir: no stat per entry (a store has S x R of them)
        for entry in listing:
            if entry.is_symlink():
                continue
            if entry.is_dir(follow_symlinks=False) and not entry.name.startswith(TMP_PREFIX):
                with os.scandir(entry.path) as inner:  # shard-NNN/slice-... and shard-NNN/.tmp-...
                    found += [f"{top}/{entry.name}/{e.name}" for e in inner if not e.is_symlink()]
            else:
                found.append(f"{top}/{entry.name}")  # a file (or temporary) with no business here
    return sorted(found)


def _real_dirs(root: Path, relative: PurePosixPath) -> None:
    """Refuse to write under `root/relative` if any directory on the way is a link."""
    for i in range(1, len(relative.parts) + 1):
        path = root.joinpath(*relative.parts[:i])
        if path.is_symlink():
            raise SymlinkError(f"{str(path)!r} is a symbolic link: nothing in a store is written "
                               "through one")


def remove(root: Path, relative: str) -> None:
    """Remove a file or directory of the store; a link is unlinked, never followed."""
    path = root / relative
    if path.is_symlink():
        path.unlink()
    elif path.is_dir():
        shutil.rmtree(path)  # never follows a link inside (it unlinks them)
    elif path.exists():
        path.unlink()
