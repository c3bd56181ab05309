"""Stage 3 of the pipeline: backends behind one Protocol, and the slice-by-slice shard trainer."""

from __future__ import annotations

from sisa.errors import ConfigError
from sisa.training.head import HeadBackend
from sisa.training.lora import LoraBackend
from sisa.training.mlp import MLPBackend
from sisa.training.protocol import Backend, ModelSpec, ShardModel

BACKENDS: dict[str, type] = {"mlp": MLPBackend, "head": HeadBackend, "lora": LoraBackend}


def get_backend(name: str) -> type[Backend]:
    try:
        return BACKENDS[name]
    except KeyError:
        raise ConfigError(f"unknown backend {name!r}; choose from {sorted(BACKENDS)}") from None


__all__ = ["BACKENDS", "Backend", "ModelSpec", "ShardModel", "get_backend"]
