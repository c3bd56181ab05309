"""Trains one shard slice by slice, cumulatively, returning a checkpoint after every slice.

A job carries everything by value (the shard's schedule and records, the training config, the seed,
the device, the checkpoint to resume from), and the result carries checkpoints as bytes, so the same
function runs in-process or in a Ray task on any node. Every random draw is seeded from (seed, shard,
slice, epoch); model init from (seed, shard).
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable

import numpy as np
import torch

from sisa.checkpoint import FORMAT, RNG_TENSOR, Checkpoint, Manifest
from sisa.errors import CheckpointError
from sisa.schedule import derive_seed
from sisa.training import resolve_backend
from sisa.training.jobs import ShardJob, ShardResult, init_seed
from sisa.training.protocol import Backend, ShardModel


def load_model(backend: Backend, checkpoint: Checkpoint, seed: int, device: str = "cpu") -> ShardModel:
    """A shard model restored from a checkpoint (to resume training, or to score)."""
    model = backend.create(init_seed(seed, checkpoint.shard), device)
    try:
        model.load_state(checkpoint.tensors(), checkpoint.manifest.state)
    except (KeyError, ValueError, RuntimeError) as exc:
        raise CheckpointError(
            f"checkpoint {checkpoint.key} of shard {checkpoint.shard} slice {checkpoint.slice} "
            f"does not fit this model: {type(exc).__name__}: {exc}"
        ) from exc
    return model


def _checkpoint(job: ShardJob, slice_: int, model: ShardModel, samples_seen: int) -> Checkpoint:
    sched = job.schedule
    tensors, state = model.state()
    end = sched.cumulative_counts()[slice_]  # slice k's own records are the last sizes[k] of 0..k
    start = end - sched.sizes[slice_]
    manifest = Manifest(
        format=FORMAT,
        backend=job.training.backend,
        config_digest=job.config_digest,
        shard=job.shard,
        slice=slice_,
        key=sched.keys[slice_],
        # Slice k trains on slices 0..k: this checkpoint lists the records slice k added, and
        # names its parent (slice k-1), whose manifest lists the rest. The record-set digest
        # covers them all, and the parent chain of every live checkpoint stays in the store.
        parent=sched.keys[slice_ - 1] if slice_ > 0 else None,
        record_set_digest=sched.set_digests[slice_],
        record_count=end,
        records=tuple(m.id for m in sched.members[start:end]),
        samples_seen=samples_seen,
        state=state,
        rng={"tensor": RNG_TENSOR, "next_seed_parts": [job.shard, slice_ + 1, 0]},
    )
    return Checkpoint.create(manifest, tensors, model.export_files())


def setup_process(torch_threads: int, device: str) -> str:
    """The process-wide torch settings every shard trains under; returns the device used. Callers
    run it before they start timing a retrain."""
    # Thread count changes float summation order: fix it so every executor gets the same bits.
    torch.set_num_threads(torch_threads)
    device = device if device == "cpu" or torch.cuda.is_available() else "cpu"
    if device == "cuda":  # deterministic cuBLAS needs this before the first CUDA call
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    # What torch.use_deterministic_algorithms does for eager code, without its import of
    # torch._inductor.config (about 1 s in a fresh process, for torch.compile, which sisa never
    # uses); inductor's flag is set too where it is loaded.
    inductor = sys.modules.get("torch._inductor.config")
    if inductor is not None:
        inductor.deterministic = True  # type: ignore[attr-defined]
    torch._C._set_deterministic_algorithms(True, warn_only=device == "cpu")
    return device


def train_shard(job: ShardJob, backend: Backend | None = None,
                on_epoch: Callable[[int, int], None] | None = None) -> ShardResult:
    """Run one shard job; pure apart from the seeded RNG it owns. `backend`: the driver's, when
    the job runs in-process (a Ray task resolves its own from the job's training config).
    `on_epoch(slice, epoch)`: called as each epoch ends (progress; it never changes the result).
    The result's seconds cover the training, not the process set-up."""
    training = job.training
    device = setup_process(training.torch_threads, job.device)
    started = time.perf_counter()
    if backend is None:
        backend = resolve_backend(training, job.spec)
    if job.resume is not None:
        model = load_model(backend, job.resume, job.seed, device)
        samples_seen = job.resume.manifest.samples_seen
    else:
        model = backend.create(init_seed(job.seed, job.shard), device)
        samples_seen = 0

    inputs = backend.prepare(job.inputs)
    targets = torch.as_tensor(np.asarray(job.targets, dtype=np.int64))  # unused by a causal LM
    counts = job.schedule.cumulative_counts()
    checkpoints: list[Checkpoint] = []
    samples = 0
    for k in range(job.start_slice, len(counts)):
        n = counts[k]
        for epoch in range(training.epochs_per_slice):
            epoch_seed = derive_seed(job.seed, job.shard, k, epoch)
            # Dropout and any other draw inside the model. (The CPU generator only, unless the
            # model is on a GPU: seeding CUDA is queued with a captured stack trace every call.)
            if device == "cuda":
                torch.manual_seed(epoch_seed)
            else:
                torch.default_generator.manual_seed(epoch_seed)
            if n:
                generator = torch.Generator().manual_seed(epoch_seed)
                order = torch.randperm(n, generator=generator)
                model.train_epoch(inputs, targets, order)
                samples += n
            if on_epoch is not None:
                on_epoch(k, epoch)
        samples_seen += n * training.epochs_per_slice
        checkpoints.append(_checkpoint(job, k, model, samples_seen))
    return ShardResult(job.shard, checkpoints, samples, time.perf_counter() - started)
