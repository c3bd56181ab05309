"""One frozen base model with named LoRA adapters (peft): the construction that the adapter
backends (`lora`, `causal_lm`) share, for training one adapter and for serving every shard's.

The only module that imports peft. A shard's adapter is a named adapter (`shard-3`) on the one
base, so an ensemble holds the base once and runs every shard in one mixed-adapter batch (peft's
`adapter_names`), exactly as each adapter alone would compute it.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch

from sisa.config import CausalLMConfig, LoraConfig

if TYPE_CHECKING:
    from peft import PeftModel


def adapter_name(shard: int) -> str:
    """How a shard's adapter is named on the shared base."""
    return f"shard-{shard}"


def lora_config(training: LoraConfig | CausalLMConfig, task_type: str,
                layers: Sequence[int] | None = None) -> Any:
    """peft's LoraConfig for a training config (`layers`: adapt only these layers' modules)."""
    from peft import LoraConfig as PeftLoraConfig

    return PeftLoraConfig(
        task_type=task_type, r=training.lora_r, lora_alpha=training.lora_alpha,
        lora_dropout=training.lora_dropout, target_modules=list(training.lora_target_modules),
        layers_to_transform=list(layers) if layers is not None else None,
    )


def with_adapter(base: Any, config: Any, name: str = "default") -> PeftModel:
    """`base` wrapped with one fresh adapter (its initialisation draws from the global RNG)."""
    from peft import get_peft_model

    with warnings.catch_warnings():  # peft calls a transformers API deprecated in v5
        warnings.simplefilter("ignore", FutureWarning)
        return get_peft_model(base, config, adapter_name=name)


def with_adapters(base: Any, config: Any, adapters: Mapping[str, Mapping[str, torch.Tensor]],
                  seed: int) -> PeftModel:
    """`base` holding every adapter of `adapters` (name -> its tensors) as a named adapter. The
    adapters' throwaway initialisation draws from a forked RNG seeded with `seed`: the caller's
    RNG is untouched, and the tensors loaded then replace every drawn value."""
    names = list(adapters)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = with_adapter(base, config, names[0])
        for name in names[1:]:
            model.add_adapter(name, config)
    for name in names:
        load_adapter(model, adapters[name], name)
    return model


def adapter_tensors(model: Any, name: str = "default") -> dict[str, torch.Tensor]:
    """An adapter's tensors (with a classifier's head, for sequence classification)."""
    from peft import get_peft_model_state_dict

    return get_peft_model_state_dict(model, adapter_name=name)


def load_adapter(model: Any, tensors: Mapping[str, torch.Tensor], name: str = "default") -> None:
    """Load an adapter's tensors; a tensor the model has no place for is an error (a KeyError
    naming the first few), never silently dropped."""
    from peft import set_peft_model_state_dict

    result = set_peft_model_state_dict(model, dict(tensors), adapter_name=name)
    unexpected = getattr(result, "unexpected_keys", None)
    if unexpected:
        raise KeyError(f"adapter tensors this model does not have: {unexpected[:3]}")


_PEFT_PREFIX = "base_model.model."


def merged_deltas(adapters: Mapping[int, Mapping[str, torch.Tensor]],
                  scaling: float) -> dict[str, torch.Tensor]:
    """The mean of the shards' LoRA weight updates, module by module: (1/S) sum over shards of
    scaling * B @ A, in float64, summed in shard order, so the same adapters always give the same
    bits. Keys: the base model's weight names (`model.layers.3.self_attn.q_proj.weight`).
    `adapters`: shard -> an adapter's tensors as peft names them on the full model."""
    if not adapters:
        raise ValueError("no adapter to merge")
    total: dict[str, torch.Tensor] = {}
    for shard in sorted(adapters):
        tensors = adapters[shard]
        for key, a in sorted(tensors.items()):
            if not key.endswith(".lora_A.weight"):
                continue
            module = key[:-len(".lora_A.weight")]
            b = tensors[f"{module}.lora_B.weight"]
            name = module.removeprefix(_PEFT_PREFIX) + ".weight"
            delta = scaling * (b.double() @ a.double())
            total[name] = total[name] + delta if name in total else delta
    return {name: delta / len(adapters) for name, delta in total.items()}


def merged_adapter(adapters: Mapping[int, Mapping[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """One LoRA adapter of rank S*r whose update is the sum of the S shards' updates: each
    module's A matrices stacked (rows) and B matrices side by side (columns), in shard order, so
    that B_cat @ A_cat = sum over shards of B_s @ A_s exactly (concatenation: no arithmetic, the
    same adapters always give the same bits). Served with `merged_lora_config`, whose scaling
    alpha / (S*r) is the shards' alpha / r divided by S: the mean of their updates, in one pass.
    `adapters`: shard -> an adapter's tensors as peft names them (LoRA A and B only)."""
    if not adapters:
        raise ValueError("no adapter to merge")
    shards = sorted(adapters)
    keys = sorted(adapters[shards[0]])
    for shard in shards[1:]:
        if sorted(adapters[shard]) != keys:
            raise ValueError(f"shard {shard}'s adapter adapts other modules than shard {shards[0]}'s")
    out: dict[str, torch.Tensor] = {}
    for key in keys:
        parts = [adapters[s][key] for s in shards]
        if key.endswith(".lora_A.weight"):
            out[key] = torch.cat(parts, dim=0)
        elif key.endswith(".lora_B.weight"):
            out[key] = torch.cat(parts, dim=1)
        else:
            raise ValueError(f"cannot merge adapter tensor {key!r} (LoRA A and B only)")
    return out


def merged_lora_config(config: Any, shards: int) -> Any:
    """The peft config of `merged_adapter` of `shards` adapters trained with `config`: rank S*r
    and the same alpha, so its scaling is the shards' divided by S."""
    if getattr(config, "use_rslora", False):
        raise ValueError("rank-stabilised LoRA scales by alpha / sqrt(r): its merge is not a mean")
    return dataclasses.replace(config, r=config.r * shards, lora_alpha=config.lora_alpha)
