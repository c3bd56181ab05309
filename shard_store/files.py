"""Checkpoint directories on disk: named files written atomically, and verified against their sha256.

The store writes and reads bytes; what the bytes mean (weights, a manifest, an adapter) is the
business of `sisa.checkpoint`. A directory is written to a temporary name, fsynced and renamed into
place, so a crash leaves either the whole directory or a temporary that `sweep` removes.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import uuid
from collections.abc import Collection, Mapping
from pathlib import Path, PurePosixPath

from shard_store.errors import CheckpointFileError

TMP_PREFIX = ".tmp-"
PRIVATE_DIR, PRIVATE_FILE = 0o700, 0o600  # checkpoints are readable by the store's owner only


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


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
    if final.exists():
        try:
            verify_dir(final, digests)
            return digests
        except CheckpointFileError:
            shutil.rmtree(final)  # a stale or damaged copy: replace it with the fresh one
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


def read_files(directory: Path, digests: Mapping[str, str], names: Collection[str]) -> dict[str, bytes]:
    """The bytes of `names` from a checkpoint directory, each checked against its recorded sha256."""
    out = {}
    for name in names:
        if name not in digests:
            raise CheckpointFileError(f"checkpoint {str(directory)!r} has no recorded file {name!r}")
        path = directory / name
        if not path.is_file():
            raise CheckpointFileError(f"checkpoint file {str(path)!r} is missing")
        data = path.read_bytes()
        actual = sha256_bytes(data)
        if actual != digests[name]:
            raise CheckpointFileError(
                f"checkpoint file {str(path)!r} is corrupt: sha256 {actual[:16]}... does not "
                f"match the recorded {digests[name][:16]}..."
            )
        out[name] = data
    return out


def verify_dir(directory: Path, digests: Mapping[str, str]) -> None:
    """Every recorded file is present and intact, and the directory holds no other file."""
    for name, expected in digests.items():
        path = directory / name
        if not path.is_file():
            raise CheckpointFileError(f"checkpoint file {str(path)!r} is missing")
        if sha256_file(path) != expected:
            raise CheckpointFileError(
                f"checkpoint file {str(path)!r} is corrupt: its sha256 does not match the recorded one")
    extra = sorted(str(p.relative_to(directory)) for p in directory.rglob("*")
                   if p.is_file() and str(p.relative_to(directory)) not in digests)
    if extra:
        raise CheckpointFileError(f"checkpoint {str(directory)!r} holds unrecorded files {extra[:5]}")


def entries(root: Path, top: str) -> list[str]:
    """Every checkpoint directory, temporary or stray file under `root/top`, as paths relative to
    `root` (the form the database records), e.g. `checkpoints/shard-000/slice-001-...`."""
    base = root / top
    if not base.is_dir():
        return []
    found = []
    with os.scandir(base) as listing:  # scandir: no stat per entry (a store has S x R of them)
        for entry in listing:
            if entry.is_dir(follow_symlinks=False) and not entry.name.startswith(TMP_PREFIX):
                with os.scandir(entry.path) as inner:  # shard-NNN/slice-... and shard-NNN/.tmp-...
                    found += [f"{top}/{entry.name}/{e.name}" for e in inner]
            else:
                found.append(f"{top}/{entry.name}")  # a file (or temporary) with no business here
    return sorted(found)


def remove(root: Path, relative: str) -> None:
    path = root / relative
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()
