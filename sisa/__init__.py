"""sisa: exact machine unlearning by SISA training (sharded, isolated, sliced, aggregated).

Public names load lazily, so `import sisa` (and `sisa --help`) does not import torch or ray.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS = {
    "Sisa": "sisa.api",
    "SisaConfig": "sisa.config",
    "PartitionConfig": "sisa.config",
    "TrainingConfig": "sisa.config",
    "ExecutionConfig": "sisa.config",
    "DataSpec": "sisa.config",
    "Ensemble": "sisa.ensemble",
    "DeletionReceipt": "sisa.unlearning",
    "SyncReport": "sisa.unlearning",
    "place": "sisa.partition",
    "SisaError": "sisa.errors",
    "ConfigError": "sisa.errors",
    "RecordError": "sisa.errors",
    "UnknownRecordError": "sisa.errors",
    "StoreError": "sisa.errors",
    "CheckpointError": "sisa.errors",
    "ShardTrainingError": "sisa.errors",
    "DatasetUnavailableError": "sisa.errors",
}

__all__ = [
    "CheckpointError",
    "ConfigError",
    "DataSpec",
    "DatasetUnavailableError",
    "DeletionReceipt",
    "Ensemble",
    "ExecutionConfig",
    "PartitionConfig",
    "RecordError",
    "ShardTrainingError",
    "Sisa",
    "SisaConfig",
    "SisaError",
    "StoreError",
    "SyncReport",
    "TrainingConfig",
    "UnknownRecordError",
    "__version__",
    "place",
]

if TYPE_CHECKING:
    from sisa.api import Sisa
    from sisa.config import DataSpec, ExecutionConfig, PartitionConfig, SisaConfig, TrainingConfig
    from sisa.ensemble import Ensemble
    from sisa.errors import (
        CheckpointError,
        ConfigError,
        DatasetUnavailableError,
        RecordError,
        ShardTrainingError,
        SisaError,
        StoreError,
        UnknownRecordError,
    )
    from sisa.partition import place
    from sisa.unlearning import DeletionReceipt, SyncReport


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'sisa' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
