"""Stage 3 of the pipeline: backends behind one Protocol, and the slice-by-slice shard trainer.

A backend is resolved once from its training config (`resolve_backend`) and handed down. This
package imports neither `ray` nor `shard_store`: it runs the same in-process or in a Ray task.
"""

from __future__ import annotations

import importlib

from sisa.config import TrainingConfig
from sisa.errors import ConfigError
from sisa.tasks import ModelSpec
from sisa.training.protocol import Backend, ShardModel

# backend name -> (module, class); modules load on first use (lora pulls in peft).
BACKENDS = {"mlp": ("sisa.training.mlp", "MLPBackend"), "head": ("sisa.training.head", "HeadBackend"),
            "lora": ("sisa.training.lora", "LoraBackend"),
            "causal_lm": ("sisa.training.causal_lm", "CausalLMBackend")}


def resolve_backend(config: TrainingConfig, spec: ModelSpec) -> Backend:
    """The backend of a training config, built for a task of shape `spec`."""
    try:
        module, name = BACKENDS[config.backend]
    except KeyError:
        raise ConfigError(f"unknown backend {config.backend!r}; choose from {sorted(BACKENDS)}") from None
    backend: Backend = getattr(importlib.import_module(module), name)(config, spec)
    return backend


__all__ = ["BACKENDS", "Backend", "ModelSpec", "ShardModel", "resolve_backend"]
