"""Slice checkpoints on disk: a safetensors weights file plus a JSON manifest, one directory each.

Written atomically (a temporary directory, fsynced, then renamed into place) and sha256-verified on
every read. Nothing here unpickles: weights go through safetensors, metadata through JSON.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors

from sisa.errors import CheckpointError

WEIGHTS = "weights.safetensors"
MANIFEST = "manifest.json"
TMP_PREFIX = ".tmp-"


@dataclass(frozen=True)
class CheckpointPayload:
    """A checkpoint in transit: bytes, not paths, so it crosses Ray's object store between nodes."""

    shard: int
    slice: int
    key: str
    weights: bytes  # a safetensors file
    manifest: dict[str, Any]  # JSON-serialisable; "files" maps extra file names to sha256
    files: dict[str, bytes] = field(default_factory=dict)  # extra files, e.g. a peft adapter

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.weights).hexdigest()


def checkpoint_dirname(shard: int, slice_: int, key: str) -> str:
    return f"shard-{shard:03d}/slice-{slice_:03d}-{key[:20]}"


def _fsync_file(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_checkpoint(root: Path, payload: CheckpointPayload) -> tuple[str, str]:
    """Write a payload under `root`; returns (path relative to root, sha256 of the weights).

    A checkpoint directory is content-addressed by its key: if it already exists it is verified and
    reused, so a crash between writing files and recording them in SQLite is harmless.
    """
    relative = checkpoint_dirname(payload.shard, payload.slice, payload.key)
    final = root / relative
    sha = payload.sha256
    if final.exists():
        try:
            read_checkpoint(final, sha)
            return relative, sha
        except CheckpointError:
            shutil.rmtree(final)  # a stale or damaged copy; replace it with the fresh one
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = root / f"{TMP_PREFIX}{uuid.uuid4().hex}"
    tmp.mkdir(parents=True)
    try:
        _fsync_file(tmp / WEIGHTS, payload.weights)
        for name, data in payload.files.items():
            if Path(name).is_absolute() or ".." in Path(name).parts:
                raise CheckpointError(f"checkpoint file name {name!r} leaves its directory")
            target = tmp / name
            target.parent.mkdir(parents=True, exist_ok=True)
            _fsync_file(target, data)
        manifest_bytes = json.dumps(payload.manifest, sort_keys=True, separators=(",", ":")).encode()
        _fsync_file(tmp / MANIFEST, manifest_bytes)
        _fsync_dir(tmp)
        os.replace(tmp, final)
        _fsync_dir(final.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return relative, sha


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def read_checkpoint_bytes(directory: Path, expected_sha256: str) -> tuple[bytes, dict[str, Any]]:
    """The verified weights bytes and manifest of a checkpoint directory."""
    weights_path = directory / WEIGHTS
    manifest_path = directory / MANIFEST
    for p in (weights_path, manifest_path):
        if not p.is_file():
            raise CheckpointError(f"checkpoint file {str(p)!r} is missing")
    weights = weights_path.read_bytes()
    actual = hashlib.sha256(weights).hexdigest()
    if actual != expected_sha256:
        raise CheckpointError(
            f"checkpoint file {str(weights_path)!r} is corrupt: sha256 {actual[:16]}... "
            f"does not match the recorded {expected_sha256[:16]}...; `sisa repair` retrains the "
            "shard from its last intact checkpoint"
        )
    try:
        manifest = json.loads(manifest_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"checkpoint manifest {str(manifest_path)!r} is malformed: {exc}") from exc
    if not isinstance(manifest, dict):
        raise CheckpointError(f"checkpoint manifest {str(manifest_path)!r} is not a JSON object")
    for name, sha in (manifest.get("files") or {}).items():
        extra = directory / name
        if not extra.is_file():
            raise CheckpointError(f"checkpoint file {str(extra)!r} is missing")
        if sha256_file(extra) != sha:
            raise CheckpointError(f"checkpoint file {str(extra)!r} is corrupt: sha256 mismatch")
    return weights, manifest


def read_checkpoint(directory: Path, expected_sha256: str) -> CheckpointPayload:
    """Read and verify a checkpoint directory into a payload (weights stay as bytes)."""
    weights, manifest = read_checkpoint_bytes(directory, expected_sha256)
    try:
        shard, slice_, key = int(manifest["shard"]), int(manifest["slice"]), str(manifest["key"])
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(
            f"checkpoint manifest in {str(directory)!r} lacks shard/slice/key: {exc}"
        ) from exc
    try:
        load_safetensors(weights)  # parse once, so a malformed file is named here, not later
    except (SafetensorError, ValueError) as exc:
        raise CheckpointError(f"checkpoint weights in {str(directory)!r} are malformed: {exc}") from exc
    return CheckpointPayload(shard=shard, slice=slice_, key=key, weights=weights, manifest=manifest)


def remove_checkpoint_dir(root: Path, relative: str) -> None:
    shutil.rmtree(root / relative, ignore_errors=True)


def clean_temporaries(root: Path) -> int:
    """Remove half-written checkpoint directories left by a crash; returns how many."""
    if not root.exists():
        return 0
    removed = 0
    for tmp in root.glob(f"{TMP_PREFIX}*"):
        shutil.rmtree(tmp, ignore_errors=True)
        removed += 1
    return removed
