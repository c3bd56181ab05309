"""What a shard task is given and gives back: light (no torch), so the driver can plan jobs and
read results without loading the trainer."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from sisa.checkpoint import Checkpoint
from sisa.config import TrainingConfig
from sisa.schedule import ShardSchedule, derive_seed
from sisa.tasks import ModelSpec


@dataclass(frozen=True)
class ShardJob:
    """Train the shard of `schedule` from `start_slice` to its last slice (resuming from
    `resume`, the checkpoint of slice start_slice - 1, if given)."""

    schedule: ShardSchedule
    training: TrainingConfig
    spec: ModelSpec
    seed: int
    device: str  # "cpu", or "cuda" (the CPU where no GPU is visible)
    config_digest: str  # enters every manifest
    inputs: Any  # every record, in training order: an (n, d) array (features, embeddings) or texts
    targets: np.ndarray  # training targets (class indices), in training order
    start_slice: int
    resume: Checkpoint | None = None

    @property
    def shard(self) -> int:
        return self.schedule.shard


@dataclass(frozen=True)
class ShardResult:
    shard: int
    checkpoints: list[Checkpoint]  # one per trained slice, in slice order
    samples: int
    seconds: float
    attempts: int = 1
    node: str = field(default="")


def init_seed(seed: int, shard: int) -> int:
    return derive_seed(seed, "init", shard)
