"""sisa: exact machine unlearning by SISA training (sharded, isolated, sliced, aggregated).

Public names load lazily, so `import sisa` (and `sisa --help`) does not import torch or ray.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.11.0"

_EXPORTS = {
    "Sisa": "sisa.api",
    "SisaConfig": "sisa.config",
    "PartitionConfig": "sisa.config",
    "TrainingConfig": "sisa.config",
    "MLPConfig": "sisa.config",
    "HeadConfig": "sisa.config",
    "LoraConfig": "sisa.config",
    "CausalLMConfig": "sisa.config",
    "ExecutionConfig": "sisa.config",
    "DataSpec": "sisa.config",
    "training_config": "sisa.config",
    "ClassificationTask": "sisa.tasks",
    "LanguageModelingTask": "sisa.tasks",
    "CanarySet": "sisa.workflows.proof",
    "make_canaries": "sisa.workflows.proof",
    "prove": "sisa.workflows.proof",
    "ProofReport": "sisa.workflows.proof",
    "Generation": "sisa.reports",
    "ScoreReport": "sisa.reports",
    "Ensemble": "sisa.serving.ensemble",
    "DeletionRequest": "sisa.unlearning",
    "DeletionReceipt": "sisa.unlearning",
    "TrainingReport": "sisa.unlearning",
    "AuditReport": "sisa.reports",
    "EvaluationReport": "sisa.reports",
    "StatusReport": "sisa.reports",
    "ReceiptsReport": "sisa.reports",
    "place": "sisa.partition",
    "SisaError": "sisa.errors",
    "ConfigError": "sisa.errors",
    "RecordError": "sisa.errors",
    "UnknownRecordError": "sisa.errors",
    "StoreError": "sisa.errors",
    "CheckpointError": "sisa.errors",
    "RecordCorruptError": "sisa.errors",
    "StoreCorruptError": "sisa.errors",
    "UnknownReceiptError": "sisa.errors",
    "ShardTrainingError": "sisa.errors",
    "DatasetUnavailableError": "sisa.errors",
    "DamagedStoreError": "sisa.errors",
    "StoreKeyError": "sisa.errors",
    "WitnessError": "sisa.errors",
    "SymlinkError": "sisa.errors",
    "CheckpointMovedError": "sisa.errors",
    "NoServableShardError": "sisa.errors",
    "StoreConfig": "sisa.config",
    "ServiceConfig": "sisa.config",
}

__all__ = [
    "AuditReport",
    "CanarySet",
    "CausalLMConfig",
    "CheckpointError",
    "CheckpointMovedError",
    "ClassificationTask",
    "ConfigError",
    "DamagedStoreError",
    "DataSpec",
    "DatasetUnavailableError",
    "DeletionReceipt",
    "DeletionRequest",
    "Ensemble",
    "EvaluationReport",
    "ExecutionConfig",
    "Generation",
    "HeadConfig",
    "LanguageModelingTask",
    "LoraConfig",
    "MLPConfig",
    "NoServableShardError",
    "PartitionConfig",
    "ProofReport",
    "ReceiptsReport",
    "RecordCorruptError",
    "RecordError",
    "ScoreReport",
    "ServiceConfig",
    "ShardTrainingError",
    "Sisa",
    "SisaConfig",
    "SisaError",
    "StatusReport",
    "StoreConfig",
    "StoreCorruptError",
    "StoreError",
    "StoreKeyError",
    "SymlinkError",
    "TrainingConfig",
    "TrainingReport",
    "UnknownReceiptError",
    "UnknownRecordError",
    "WitnessError",
    "__version__",
    "make_canaries",
    "place",
    "prove",
    "training_config",
]

if TYPE_CHECKING:
    from sisa.api import Sisa
    from sisa.config import (
        CausalLMConfig,
        DataSpec,
        ExecutionConfig,
        HeadConfig,
        LoraConfig,
        MLPConfig,
        PartitionConfig,
        ServiceConfig,
        SisaConfig,
        StoreConfig,
        TrainingConfig,
        training_config,
    )
    from sisa.errors import (
        CheckpointError,
        CheckpointMovedError,
        ConfigError,
        DamagedStoreError,
        DatasetUnavailableError,
        NoServableShardError,
        RecordCorruptError,
        RecordError,
        ShardTrainingError,
        SisaError,
        StoreCorruptError,
        StoreError,
        StoreKeyError,
        SymlinkError,
        UnknownReceiptError,
        UnknownRecordError,
        WitnessError,
    )
    from sisa.partition import place
    from sisa.reports import (
        AuditReport,
        EvaluationReport,
        Generation,
        ReceiptsReport,
        ScoreReport,
        StatusReport,
    )
    from sisa.serving.ensemble import Ensemble
    from sisa.tasks import ClassificationTask, LanguageModelingTask
    from sisa.unlearning import DeletionReceipt, DeletionRequest, TrainingReport
    from sisa.workflows.proof import CanarySet, ProofReport, make_canaries, prove


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'sisa' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
