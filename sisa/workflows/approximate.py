"""Approximate unlearning baselines, for comparison with SISA's exact deletion: gradient ascent on
the forget set, gradient difference (ascent on forget, descent on retain) and NPO (Zhang et al.,
"Negative Preference Optimization", 2024; beta = 0.1), applied to the adapter of a monolithic
causal-LM store (one shard, one slice). They change a copy in memory; the store is untouched.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch

from sisa.api import Sisa
from sisa.errors import ConfigError
from sisa.training.causal_lm import CausalLMModel

Method = Literal["gradient_ascent", "gradient_difference", "npo"]
METHODS: tuple[Method, ...] = ("gradient_ascent", "gradient_difference", "npo")


@dataclass(frozen=True)
class Unlearned:
    method: str
    steps: int
    learning_rate: float
    seconds: float  # the unlearning steps alone
    adapter: dict[str, torch.Tensor]


def _inputs(sisa: Sisa, ids: Sequence[str]) -> Any:
    found = sisa.texts(ids)
    live = [found[i] for i in ids if i in found]
    prompts = [p for _, p in live] if sisa.data_spec.prompt_column else None
    return sisa.model_inputs([t for t, _ in live], prompts)


def monolith_model(sisa: Sisa) -> CausalLMModel:
    """The trained adapter of a one-shard causal-LM store, restored with its optimizer state."""
    if sisa.config.partition.shards != 1 or sisa.config.training.backend != "causal_lm":
        raise ConfigError("the approximate baselines run on a monolithic causal_lm store "
                          "(--shards 1 --backend causal_lm)")
    model = sisa.shard_model(0)
    if not isinstance(model, CausalLMModel):
        raise ConfigError("the approximate baselines need a causal_lm store's model")
    return model


def unlearn(sisa: Sisa, forget_ids: Sequence[str], retain_ids: Sequence[str], method: Method,
            steps: int, learning_rate: float, beta: float = 0.1, batch_size: int = 8,
            seed: int = 0) -> Unlearned:
    """Run `steps` optimizer steps of `method` on a copy of the monolith's adapter."""
    if method not in METHODS:
        raise ConfigError(f"method must be one of {list(METHODS)}, got {method!r}")
    model = monolith_model(sisa)
    forget = _inputs(sisa, forget_ids)
    retain = _inputs(sisa, retain_ids) if method == "gradient_difference" else None
    if not len(forget):
        raise ConfigError("nothing to unlearn: none of the forget records is live")
    params = [p for p in model.model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=learning_rate)
    generator = torch.Generator().manual_seed(seed)
    model.model.train()
    reference = None
    if method == "npo":
        with torch.no_grad():
            reference = torch.cat([model.sequence_logprobs(forget, list(b))[0]
                                   for b in torch.arange(len(forget)).split(batch_size)])
    started = time.perf_counter()
    for _ in range(steps):
        batch = torch.randperm(len(forget), generator=generator)[:batch_size]
        logp, counts = model.sequence_logprobs(forget, batch.tolist())
        if method == "npo":
            assert reference is not None
            ratio = logp - reference[batch]
            loss = -(2.0 / beta) * torch.nn.functional.logsigmoid(-beta * ratio).mean()
        else:
            loss = logp.sum() / counts.sum().clamp(min=1)  # ascent on the forget set's NLL
        if retain is not None and len(retain):
            rb = torch.randperm(len(retain), generator=generator)[:batch_size]
            r_logp, r_counts = model.sequence_logprobs(retain, rb.tolist())
            loss = loss - r_logp.sum() / r_counts.sum().clamp(min=1)  # descent on retain
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    seconds = time.perf_counter() - started
    return Unlearned(method, steps, learning_rate, seconds,
                     {k: v.detach().clone() for k, v in model.adapter().items()})


def scorer_for(sisa: Sisa, adapter: dict[str, torch.Tensor]) -> Any:
    """A one-adapter scorer (its one shard is the ensemble) for an unlearned adapter."""
    return sisa.language_model({0: adapter})
