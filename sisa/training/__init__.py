"""Stage 3 of the pipeline: backends behind one Protocol, and the slice-by-slice shard trainer.

A backend is resolved once from its training config (`resolve_backend`) and handed down; a
store opened to be read gets a `LazyBackend`, built on first use. This package imports neither
`ray` nor `shard_store`: it runs the same in-process or in a Ray task.
"""

from __future__ import annotations

import importlib
import threading
from collections.abc import Sequence
from typing import Any

import numpy as np

from sisa.config import HeadConfig, TextModelConfig, TrainingConfig
from sisa.errors import ConfigError
from sisa.models import encoder_fingerprint, model_fingerprint
from sisa.records import Input
from sisa.tasks import ModelSpec
from sisa.training.protocol import Backend, Encoder, ShardModel

# backend name -> (module, class); modules load on first use (lora pulls in peft).
BACKENDS = {"mlp": ("sisa.training.mlp", "MLPBackend"), "head": ("sisa.training.head", "HeadBackend"),
            "lora": ("sisa.training.lora", "LoraBackend"),
            "causal_lm": ("sisa.training.causal_lm", "CausalLMBackend")}
# Backends that load no pretrained model: building one checks nothing that could fail, so a store
# about to be trained need not build it (nor import torch) before its data is read.
MODEL_FREE = frozenset({"mlp"})


def resolve_backend(config: TrainingConfig, spec: ModelSpec) -> Backend:
    """The backend of a training config, built for a task of shape `spec`."""
    try:
        module, name = BACKENDS[config.backend]
    except KeyError:
        raise ConfigError(f"unknown backend {config.backend!r}; choose from {sorted(BACKENDS)}") from None
    backend: Backend = getattr(importlib.import_module(module), name)(config, spec)
    return backend


def backend_fingerprint(config: TrainingConfig, chat: bool = False) -> str:
    """What the backend of `config` gives as its `fingerprint()`, without building it (no torch
    import, no model loaded): its frozen encoder's digest (`head`), its base model's (`lora`,
    `causal_lm`; with its chat template's file for a store of conversations, `chat`), or ''
    (`mlp`: the weights depend on nothing outside the store)."""
    if isinstance(config, HeadConfig):
        return encoder_fingerprint(config.model, config.max_length)
    if isinstance(config, TextModelConfig):
        return model_fingerprint(config.model, chat)
    return ""


class LazyBackend:
    """A store's backend, built on first use: a store opened for its audit, its receipts or its
    status imports no torch and loads no model (torch's import alone is about 1.5 s). Its name,
    config, shape and fingerprint are known unbuilt; anything else builds it, once."""

    def __init__(self, config: TrainingConfig, spec: ModelSpec) -> None:
        self.name = config.backend
        self.config = config
        self._spec = spec  # a store's, already resolved: the built backend keeps it
        self._built: Backend | None = None
        self._fingerprint: str | None = None
        self._lock = threading.Lock()  # serving threads may all ask first

    @property
    def built(self) -> Backend:
        """The backend itself (built now if it was not)."""
        if self._built is None:
            with self._lock:
                if self._built is None:
                    self._built = resolve_backend(self.config, self._spec)
        return self._built

    @property
    def spec(self) -> ModelSpec:
        return self._built.spec if self._built is not None else self._spec

    @property
    def encoder(self) -> Encoder | None:
        return self.built.encoder

    def fingerprint(self) -> str:
        if self._fingerprint is None:
            self._fingerprint = backend_fingerprint(self.config, self._spec.chat)
        return self._fingerprint

    def prepare(self, inputs: Sequence[Input] | np.ndarray) -> Any:
        return self.built.prepare(inputs)

    def create(self, seed: int, device: str = "cpu") -> ShardModel:
        return self.built.create(seed, device)

    def __getattr__(self, name: str) -> Any:
        """What one backend adds to the Protocol (`network`, `tokenizer`, `validate`, ...)."""
        if name.startswith("_"):  # never build from a half-made object (a copy, a pickle)
            raise AttributeError(name)
        return getattr(self.built, name)


__all__ = ["BACKENDS", "MODEL_FREE", "Backend", "LazyBackend", "ModelSpec", "ShardModel",
           "backend_fingerprint", "resolve_backend"]
