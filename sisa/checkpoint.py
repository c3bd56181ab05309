"""The one checkpoint format: what a slice checkpoint holds, how it becomes bytes and back.

A checkpoint is the weights file (safetensors: model tensors, optimizer moments, the RNG state), a
JSON manifest (`Manifest`, below) and any files a backend adds (a peft adapter directory). The
store writes and reads these as bytes, and checks each file against the sha256 it recorded; this
module builds and parses them, and checks that they agree with what the store says they are. It
never unpickles anything, and it does not touch the store, so shard tasks can build checkpoints
anywhere and send them back as bytes.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from sisa.errors import CheckpointError

if TYPE_CHECKING:
    import torch

FORMAT = 3  # 3: typed manifest; the store records every file's sha256 (1 and 2 were pre-release)
WEIGHTS = "weights.safetensors"
MANIFEST = "manifest.json"
RNG_TENSOR = "rng.torch_cpu"


@dataclass(frozen=True)
class Manifest:
    """What a slice checkpoint was trained on, and how to resume from it."""

    format: int
    backend: str
    config_digest: str  # of the partition and training config (and any base model)
    shard: int
    slice: int
    key: str  # digest of (config digest, shard, slice, the records of slices 0..slice)
    parent: str | None  # key of the checkpoint of the slice before (None for slice 0)
    record_set_digest: str  # of the records of slices 0..slice, in training order
    record_count: int  # records of slices 0..slice
    records: tuple[str, ...]  # ids of the records this slice added (the parents list the rest)
    samples_seen: int  # examples trained on so far, all slices and epochs
    state: dict[str, Any]  # optimizer parameter groups and plain (non-tensor) state
    # The global torch RNG state is the tensor RNG_TENSOR in the weights file; every later draw is
    # reseeded from (seed, shard, slice, epoch), so resuming needs nothing else.
    rng: dict[str, Any] = field(default_factory=dict)

    def to_bytes(self) -> bytes:
        data = dataclasses.asdict(self)
        data["records"] = list(self.records)
        return json.dumps(data, sort_keys=True, separators=(",", ":")).encode()

    @classmethod
    def from_bytes(cls, data: bytes, where: str) -> Manifest:
        """Parse a manifest; `where` names it in errors."""
        try:
            raw = json.loads(data)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise CheckpointError(f"checkpoint manifest {where} is malformed: {exc}") from exc
        if not isinstance(raw, dict):
            raise CheckpointError(f"checkpoint manifest {where} is not a JSON object")
        if raw.get("format") != FORMAT:
            raise CheckpointError(f"checkpoint manifest {where} has format {raw.get('format')!r}; "
                                  f"this version reads format {FORMAT}")
        names = {f.name for f in dataclasses.fields(cls)}
        missing, extra = sorted(names - set(raw) - {"rng"}), sorted(set(raw) - names)
        if missing or extra:
            raise CheckpointError(f"checkpoint manifest {where} has missing fields {missing} "
                                  f"and unknown fields {extra}")
        try:
            manifest = cls(**{**raw, "records": tuple(raw["records"])})
            _check_types(manifest)
        except (TypeError, ValueError) as exc:
            raise CheckpointError(f"checkpoint manifest {where} is malformed: {exc}") from exc
        return manifest


def _check_types(m: Manifest) -> None:
    for name in ("format", "shard", "slice", "record_count", "samples_seen"):
        if not isinstance(getattr(m, name), int):
            raise TypeError(f"{name} must be an integer")
    for name in ("backend", "config_digest", "key", "record_set_digest"):
        if not isinstance(getattr(m, name), str):
            raise TypeError(f"{name} must be a string")
    if m.parent is not None and not isinstance(m.parent, str):
        raise TypeError("parent must be a string or null")
    if not all(isinstance(r, str) for r in m.records):
        raise TypeError("records must be a list of ids")
    if not isinstance(m.state, dict) or "optimizer" not in m.state:
        raise TypeError("state must hold the optimizer's state")


@dataclass(frozen=True)
class Checkpoint:
    """A checkpoint in transit: bytes, not paths, so it crosses Ray's object store between nodes."""

    manifest: Manifest
    weights: bytes  # a safetensors file
    files: Mapping[str, bytes] = field(default_factory=dict)  # extra files, e.g. a peft adapter

    @property
    def shard(self) -> int:
        return self.manifest.shard

    @property
    def slice(self) -> int:
        return self.manifest.slice

    @property
    def key(self) -> str:
        return self.manifest.key

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.weights).hexdigest()

    def blobs(self) -> dict[str, bytes]:
        """Every file of the checkpoint directory, by name."""
        return {WEIGHTS: self.weights, MANIFEST: self.manifest.to_bytes(), **self.files}

    @classmethod
    def create(cls, manifest: Manifest, tensors: Mapping[str, torch.Tensor],
               files: Mapping[str, bytes] | None = None) -> Checkpoint:
        """Serialise `tensors` (no timestamps: the same inputs give byte-identical files)."""
        from safetensors.torch import save

        weights = save(dict(tensors), metadata={"key": manifest.key})
        return cls(manifest, weights, dict(files or {}))

    @classmethod
    def from_blobs(cls, blobs: Mapping[str, bytes], key: str, where: str) -> Checkpoint:
        """A checkpoint from the store's (already sha256-verified) files; checks that the manifest
        is the one the store registered under `key` and that the weights parse."""
        manifest = Manifest.from_bytes(blobs[MANIFEST], where)
        if manifest.key != key:
            raise CheckpointError(f"checkpoint manifest {where} names key {manifest.key!r}, "
                                  f"not the registered {key!r}")
        checkpoint = cls(manifest, blobs[WEIGHTS],
                         {n: b for n, b in blobs.items() if n not in (WEIGHTS, MANIFEST)})
        checkpoint.check_weights(where)  # so a malformed file is named here, not later
        return checkpoint

    def check_weights(self, where: str = "") -> None:
        """Parse the weights file (its header, and every tensor's bytes against its dtype and
        shape) without torch: the audit and the receipts, which read checkpoints, load no model."""
        from safetensors import SafetensorError, deserialize

        try:
            deserialize(self.weights)  # what safetensors.torch.load parses before handing to torch
        except (SafetensorError, ValueError) as exc:
            raise CheckpointError(f"checkpoint weights {where or self.key} are malformed: {exc}") from exc

    def tensors(self, where: str = "") -> dict[str, torch.Tensor]:
        from safetensors import SafetensorError
        from safetensors.torch import load

        try:
            return load(self.weights)
        except (SafetensorError, ValueError) as exc:
            raise CheckpointError(f"checkpoint weights {where or self.key} are malformed: {exc}") from exc
