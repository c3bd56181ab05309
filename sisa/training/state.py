"""Flatten model tensors and an optimizer into safetensors-ready tensors plus JSON, and back.

Optimizer state dicts hold tensors (moments, step counts) and plain values (hyperparameters); the
tensors go to safetensors and the rest to the JSON manifest, so nothing needs pickle.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from sisa.checkpoint import RNG_TENSOR
from sisa.training.optim import Optimizer

MODEL = "model."
OPTIM = "optim."
RNG = RNG_TENSOR


def export_state(
    model_tensors: dict[str, torch.Tensor], optimizer: Optimizer
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """`model_tensors`: what the model must restore (all weights, or only an adapter's)."""
    tensors = {MODEL + k: v.detach().cpu().contiguous().clone() for k, v in model_tensors.items()}
    opt = optimizer.state_dict()
    plain: dict[str, dict[str, Any]] = {}
    for index, entry in opt["state"].items():
        for name, value in entry.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{OPTIM}{index}.{name}"] = value.detach().cpu().contiguous().clone()
            else:
                plain.setdefault(str(index), {})[name] = value
    tensors[RNG] = torch.get_rng_state().clone()
    meta = {"optimizer": {"param_groups": opt["param_groups"], "plain_state": plain}}
    return tensors, meta


def model_tensors(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k[len(MODEL):]: v for k, v in tensors.items() if k.startswith(MODEL)}


def import_state(
    load_model: Callable[[dict[str, torch.Tensor]], None],
    optimizer: Optimizer,
    tensors: dict[str, torch.Tensor],
    meta: dict[str, Any],
) -> None:
    load_model(model_tensors(tensors))
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        if key.startswith(OPTIM):
            index, name = key[len(OPTIM):].split(".", 1)
            state.setdefault(int(index), {})[name] = value
    for index, entry in meta["optimizer"].get("plain_state", {}).items():
        state.setdefault(int(index), {}).update(entry)
    # load_state_dict moves the moments to the parameters' device.
    optimizer.load_state_dict({"state": state, "param_groups": meta["optimizer"]["param_groups"]})
    if RNG in tensors:
        torch.set_rng_state(tensors[RNG])
