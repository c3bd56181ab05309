"""Trains one shard slice by slice, cumulatively, returning a checkpoint payload after every slice.

A job carries everything by value (records, config, the checkpoint to resume from), and the result
carries checkpoints as bytes, so the same function runs in-process or in a Ray task on any node.
Every random draw is seeded from (seed, shard, slice, epoch); model init from (seed, shard).
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from shard_store.checkpoints import CheckpointPayload
from sisa.config import SisaConfig
from sisa.errors import CheckpointError
from sisa.schedule import Member, derive_seed
from sisa.training import get_backend
from sisa.training.protocol import ModelSpec, ShardModel

MANIFEST_FORMAT = 2  # 2: "records" lists the ids slice k added; "parent" and "record_count"


@dataclass(frozen=True)
class ShardJob:
    """Train `shard` from `start_slice` to the last slice (resuming from `resume` if given)."""

    shard: int
    config: SisaConfig
    spec: ModelSpec
    config_digest: str
    inputs: Any  # every record, in training order: an (n, d) array (features, embeddings) or texts
    labels: np.ndarray  # class indices, in training order
    members: Sequence[Member]  # id and content digest of every record, in training order
    sizes: list[int]  # records in slice k (slice k trains on the first sum(sizes[:k+1]))
    set_digests: list[str]  # record-set digest of slices 0..k
    keys: list[str]  # checkpoint key of slice k
    start_slice: int
    resume: CheckpointPayload | None = None  # checkpoint of slice start_slice - 1

    @property
    def samples_to_train(self) -> int:
        """Examples processed: cumulative slice sizes times epochs, over the slices to train."""
        epochs = self.config.training.epochs_per_slice
        return sum(sum(self.sizes[: k + 1]) * epochs for k in range(self.start_slice, len(self.sizes)))


@dataclass(frozen=True)
class ShardResult:
    shard: int
    checkpoints: list[CheckpointPayload]  # one per trained slice, in slice order
    samples: int
    seconds: float
    attempts: int = 1
    node: str = field(default="")


def init_seed(seed: int, shard: int) -> int:
    return derive_seed(seed, "init", shard)


def device_for(config: SisaConfig) -> str:
    """CUDA when the shard asked Ray for a GPU and one is visible; else the CPU."""
    if config.execution.gpus_per_shard > 0 and torch.cuda.is_available():
        return "cuda"
    return "cpu"


def payload_state(payload: CheckpointPayload) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The tensors and JSON state a checkpoint payload holds; a named error when unreadable."""
    try:
        return load_safetensors(payload.weights), payload.manifest["state"]
    except (KeyError, ValueError, RuntimeError) as exc:
        raise CheckpointError(
            f"checkpoint {payload.key} of shard {payload.shard} slice {payload.slice} "
            f"cannot be loaded: {type(exc).__name__}: {exc}"
        ) from exc


def load_model(config: SisaConfig, spec: ModelSpec, payload: CheckpointPayload,
               device: str = "cpu") -> ShardModel:
    """A shard model restored from a checkpoint payload (to resume training)."""
    backend = get_backend(config.training.backend)(config.training, spec)
    model = backend.create(init_seed(config.partition.seed, payload.shard), device)
    tensors, state = payload_state(payload)
    try:
        model.load_state(tensors, state)
    except (KeyError, ValueError, RuntimeError) as exc:
        raise CheckpointError(
            f"checkpoint {payload.key} of shard {payload.shard} slice {payload.slice} "
            f"does not fit this model: {type(exc).__name__}: {exc}"
        ) from exc
    return model


def _payload(job: ShardJob, slice_: int, model: ShardModel, samples_seen: int) -> CheckpointPayload:
    tensors, meta = model.state()
    start = sum(job.sizes[:slice_])
    end = start + job.sizes[slice_]
    manifest: dict[str, Any] = {
        "format": MANIFEST_FORMAT,
        "backend": job.config.training.backend,
        "config_digest": job.config_digest,
        "shard": job.shard,
        "slice": slice_,
        "key": job.keys[slice_],
        # Slice k trains on slices 0..k: this checkpoint lists the records slice k added, and
        # names its parent (slice k-1), whose manifest lists the rest. The record-set digest
        # covers them all, and the parent chain of every live checkpoint stays in the store.
        "parent": job.keys[slice_ - 1] if slice_ > 0 else None,
        "record_set_digest": job.set_digests[slice_],
        "record_count": end,
        "records": [m.id for m in job.members[start:end]],
        "samples_seen": samples_seen,
        "state": meta,
        # The global RNG state is the tensor "rng.torch_cpu" in the weights file; every later draw
        # is reseeded from (seed, shard, slice, epoch), so resuming needs nothing else.
        "rng": {"tensor": "rng.torch_cpu", "next_seed_parts": [job.shard, slice_ + 1, 0]},
    }
    files = model.export_files()
    manifest["files"] = {name: hashlib.sha256(data).hexdigest() for name, data in files.items()}
    # No timestamps: the same inputs give byte-identical files, whoever trains them.
    weights = save_safetensors(tensors, metadata={"key": job.keys[slice_]})
    return CheckpointPayload(job.shard, slice_, job.keys[slice_], weights, manifest, files)


def train_shard(job: ShardJob) -> ShardResult:
    """Run one shard job; pure apart from the seeded RNG it owns."""
    started = time.perf_counter()
    training = job.config.training
    seed = job.config.partition.seed
    # Thread count changes float summation order: fix it so every executor gets the same bits.
    torch.set_num_threads(training.torch_threads)
    device = device_for(job.config)
    if device == "cuda":  # deterministic cuBLAS needs this before the first CUDA call
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True, warn_only=device == "cpu")
    backend = get_backend(training.backend)(training, job.spec)
    if job.resume is not None:
        model = load_model(job.config, job.spec, job.resume, device)
        samples_seen = int(job.resume.manifest.get("samples_seen", 0))
    else:
        model = backend.create(init_seed(seed, job.shard), device)
        samples_seen = 0

    all_inputs = backend.prepare(job.inputs)
    all_labels = torch.as_tensor(np.asarray(job.labels, dtype=np.int64))
    cumulative = 0
    sizes = []
    for n in job.sizes:
        cumulative += n
        sizes.append(cumulative)

    checkpoints: list[CheckpointPayload] = []
    samples = 0
    for k in range(job.start_slice, len(job.sizes)):
        n = sizes[k]
        for epoch in range(training.epochs_per_slice):
            epoch_seed = derive_seed(seed, job.shard, k, epoch)
            # Dropout and any other draw inside the model. (The CPU generator only, unless the
            # model is on a GPU: seeding CUDA is queued with a captured stack trace every call.)
            if device == "cuda":
                torch.manual_seed(epoch_seed)
            else:
                torch.default_generator.manual_seed(epoch_seed)
            if n == 0:
                continue
            generator = torch.Generator().manual_seed(epoch_seed)
            order = torch.randperm(n, generator=generator)
            model.train_epoch(all_inputs, all_labels, order)
            samples += n
        samples_seen += n * training.epochs_per_slice
        checkpoints.append(_payload(job, k, model, samples_seen))
    return ShardResult(job.shard, checkpoints, samples, time.perf_counter() - started)
