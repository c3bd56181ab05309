"""Serving: the shard models that may answer, loaded from verified checkpoints (`loader`), scored
together (`scorers`, `ensemble`), and generation from a causal-LM ensemble (`generation`).

Training lives in `sisa.training`; this package only reads what training wrote. Its modules, in
their internal order: scorers, ensemble, generation, loader. Importing the package (or the loader
and the ensemble) imports no torch: the scorers do, when a model is loaded.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "ClassifierScorer": "sisa.serving.scorers", "LMScorer": "sisa.serving.scorers",
    "LoraScorer": "sisa.serving.scorers", "NetScorer": "sisa.serving.scorers",
    "Scorer": "sisa.serving.scorers", "TokenScores": "sisa.serving.scorers",
    "build_scorer": "sisa.serving.scorers", "Ensemble": "sisa.serving.ensemble",
    "decode": "sisa.serving.generation", "generate_texts": "sisa.serving.generation",
    "Loader": "sisa.serving.loader", "read_checkpoint": "sisa.serving.loader",
    "store_fetch": "sisa.serving.loader",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'sisa.serving' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
