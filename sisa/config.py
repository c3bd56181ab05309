"""Configuration: frozen dataclasses for partitioning, training and execution, validated on creation.

`SisaConfig.digest()` covers everything that changes the weights (partition and training), and is
part of every checkpoint key; execution settings (local or Ray, retries) never change the weights.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from typing import Any, Literal

from sisa.errors import ConfigError

Executor = Literal["local", "ray"]
Voting = Literal["soft", "hard"]
Placement = Literal["uniform", "late_slices", "dedicated_shards"]


def _check(errors: list[str], ok: bool, message: str) -> None:
    if not ok:
        errors.append(message)


def _raise_all(name: str, errors: list[str]) -> None:
    # Collect every problem and report them together, so a user fixes a config in one pass.
    if errors:
        raise ConfigError(f"invalid {name}: " + "; ".join(errors))


@dataclass(frozen=True)
class PartitionConfig:
    """Where each record goes: S shards, R slices per shard, placement keyed by `seed`."""

    shards: int = 4  # S: independent models; a deletion retrains about 1/S of the work
    slices: int = 4  # R: checkpoints per shard; a deletion restarts from the slice before it
    seed: int = 0  # keys every hash and every random draw
    # Deletion-aware placement, for records whose prior (DataSpec.prior_column) is >= threshold:
    # "uniform" ignores the prior; "late_slices" puts them in the last `late_slices` slices of
    # their shard (a deletion retrains little); "dedicated_shards" puts them in the last
    # `dedicated_shards` shards (deletions leave the other shards alone).
    placement: Placement = "uniform"
    prior_threshold: float = 0.5  # a record is "likely to be deleted" when prior >= this
    late_slices: int = 1
    dedicated_shards: int = 1

    def __post_init__(self) -> None:
        errors: list[str] = []
        _check(errors, self.shards >= 1, f"shards must be >= 1, got {self.shards!r}")
        _check(errors, self.slices >= 1, f"slices must be >= 1, got {self.slices!r}")
        _check(errors, 0 <= self.seed < 2**63, f"seed must be in [0, 2**63), got {self.seed!r}")
        _check(errors, self.placement in ("uniform", "late_slices", "dedicated_shards"),
               f"placement must be uniform, late_slices or dedicated_shards, got {self.placement!r}")
        if self.placement == "late_slices":
            _check(errors, 1 <= self.late_slices < self.slices,
                   f"late_slices must be in [1, slices), got {self.late_slices!r} "
                   f"with slices={self.slices}")
        if self.placement == "dedicated_shards":
            _check(errors, 1 <= self.dedicated_shards < self.shards,
                   f"dedicated_shards must be in [1, shards), got {self.dedicated_shards!r} "
                   f"with shards={self.shards}")
        _raise_all("partition config", errors)


@dataclass(frozen=True)
class TrainingConfig:
    """How each shard model is trained; every field changes the weights, so all enter the digest."""

    backend: str = "mlp"  # "mlp" (numeric features), "head" (frozen encoder + head), "lora"
    epochs_per_slice: int = 5  # epochs run over slices 1..k after adding slice k
    batch_size: int = 32  # examples per optimizer step
    learning_rate: float = 1e-3  # AdamW learning rate
    weight_decay: float = 0.0  # AdamW weight decay
    hidden_sizes: tuple[int, ...] = (64,)  # mlp / head: hidden widths; () makes head logistic
    torch_threads: int = 1  # intra-op threads; fixed so every executor computes the same floats
    model: str = "all-MiniLM-L6-v2"  # head / lora: model directory, cached hub id, or packaged name
    max_length: int = 128  # head / lora: tokens per text (longer texts are truncated)
    lora_r: int = 8  # lora: adapter rank
    lora_alpha: int = 16  # lora: scaling numerator (scale = alpha / r)
    lora_dropout: float = 0.1  # lora: dropout on the adapter input
    lora_target_modules: tuple[str, ...] = ("query", "value")  # lora: adapted linear layers
    bf16: bool = False  # lora on CUDA: bf16 autocast

    def __post_init__(self) -> None:
        # Tuples survive JSON as lists; normalise so configs round-trip and digest equally.
        object.__setattr__(self, "hidden_sizes", tuple(int(h) for h in self.hidden_sizes))
        object.__setattr__(self, "lora_target_modules", tuple(self.lora_target_modules))
        errors: list[str] = []
        _check(errors, bool(self.backend), "backend must be a non-empty name")
        _check(errors, self.epochs_per_slice >= 1,
               f"epochs_per_slice must be >= 1, got {self.epochs_per_slice!r}")
        _check(errors, self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size!r}")
        _check(errors, self.learning_rate > 0,
               f"learning_rate must be > 0, got {self.learning_rate!r}")
        _check(errors, self.weight_decay >= 0,
               f"weight_decay must be >= 0, got {self.weight_decay!r}")
        _check(errors, all(h >= 1 for h in self.hidden_sizes),
               f"hidden_sizes must all be >= 1, got {self.hidden_sizes!r}")
        _check(errors, self.torch_threads >= 1,
               f"torch_threads must be >= 1, got {self.torch_threads!r}")
        _check(errors, self.max_length >= 8, f"max_length must be >= 8, got {self.max_length!r}")
        _check(errors, self.lora_r >= 1, f"lora_r must be >= 1, got {self.lora_r!r}")
        _check(errors, 0 <= self.lora_dropout < 1,
               f"lora_dropout must be in [0, 1), got {self.lora_dropout!r}")
        _check(errors, bool(self.lora_target_modules), "lora_target_modules must not be empty")
        _raise_all("training config", errors)


@dataclass(frozen=True)
class ExecutionConfig:
    """Where shard jobs run. Never changes the weights, so it is not part of the digest."""

    executor: Executor = "local"  # "local": in this process; "ray": one Ray task per shard
    ray_address: str | None = None  # None starts a local Ray on 127.0.0.1; else an existing cluster
    ray_temp_dir: str | None = None  # local Ray's temp dir; None: <system temp>/sisa-ray
    cpus_per_shard: float = 1.0  # Ray CPUs reserved by each shard task
    gpus_per_shard: float = 0.0  # Ray GPUs reserved by each shard task (0.25: four per GPU)
    resources_per_shard: dict[str, float] = field(default_factory=dict)  # custom Ray resources
    max_retries: int = 2  # extra attempts for a failing shard before the error surfaces
    progress: bool = True  # show progress bars on long work

    def __post_init__(self) -> None:
        errors: list[str] = []
        _check(errors, self.executor in ("local", "ray"),
               f"executor must be 'local' or 'ray', got {self.executor!r}")
        _check(errors, self.cpus_per_shard >= 0,
               f"cpus_per_shard must be >= 0, got {self.cpus_per_shard!r}")
        _check(errors, self.gpus_per_shard >= 0,
               f"gpus_per_shard must be >= 0, got {self.gpus_per_shard!r}")
        _check(errors, self.max_retries >= 0, f"max_retries must be >= 0, got {self.max_retries!r}")
        _raise_all("execution config", errors)


@dataclass(frozen=True)
class DataSpec:
    """Which input columns hold the record id, label, inputs and optional group."""

    id_column: str = "id"
    label_column: str = "label"
    text_column: str | None = None  # exactly one of text_column / feature_columns
    feature_columns: tuple[str, ...] = ()
    group_column: str | None = None  # all records of a group go to one shard
    prior_column: str | None = None  # a number per record: how likely it is to be deleted

    def __post_init__(self) -> None:
        object.__setattr__(self, "feature_columns", tuple(self.feature_columns))
        errors: list[str] = []
        _check(errors, bool(self.id_column), "id_column must be given")
        _check(errors, bool(self.label_column), "label_column must be given")
        _check(errors, (self.text_column is None) != (not self.feature_columns),
               "give exactly one of text_column or feature_columns, got "
               f"text_column={self.text_column!r}, feature_columns={list(self.feature_columns)!r}")
        _raise_all("data spec", errors)

    @property
    def kind(self) -> Literal["text", "features"]:
        return "text" if self.text_column is not None else "features"


@dataclass(frozen=True)
class SisaConfig:
    """Everything a store is trained with."""

    partition: PartitionConfig = field(default_factory=PartitionConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    execution: ExecutionConfig = field(default_factory=ExecutionConfig)
    voting: Voting = "soft"  # ensemble: "soft" = mean probability, "hard" = majority vote

    def __post_init__(self) -> None:
        if self.voting not in ("soft", "hard"):
            raise ConfigError(f"voting must be 'soft' or 'hard', got {self.voting!r}")

    def digest(self) -> str:
        """Digest of every setting that changes the weights (partition and training)."""
        payload = {
            "partition": dataclasses.asdict(self.partition),
            "training": dataclasses.asdict(self.training),
        }
        text = json.dumps(payload, sort_keys=True, separators=(",", ":"))
        return hashlib.blake2b(text.encode(), digest_size=16).hexdigest()

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SisaConfig:
        try:
            return cls(
                partition=PartitionConfig(**data.get("partition", {})),
                training=TrainingConfig(**data.get("training", {})),
                execution=ExecutionConfig(**data.get("execution", {})),
                voting=data.get("voting", "soft"),
            )
        except TypeError as exc:  # an unknown key
            raise ConfigError(f"invalid config: {exc}") from exc

    def replace(self, **changes: Any) -> SisaConfig:
        return dataclasses.replace(self, **changes)
