"""Generation from a causal-LM ensemble: the decoding loop over the shards' combined next-token
distribution, with the prompt formatted as training formatted it (`sisa.tasks.format_prompt`).

All servable shards run in one batched forward pass per token (peft mixed-adapter rows, one block
per shard) with a KV cache; their next-token log-probabilities combine as a mixture (`mean`) or a
normalised product (`product`). `merged` runs one row instead, the adapter merged from the
shards' (the mean of their updates, `sisa.adapters.merged_adapter`): one pass per token, whatever
the shard count. Greedy at temperature 0, else sampled with a generator seeded per
prompt, so an answer never depends on what else was asked.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from sisa.config import Combine
from sisa.errors import ConfigError
from sisa.tasks import combine_logprobs, format_prompt


@torch.no_grad()
def decode(scorer: Any, prompt: Sequence[int], max_new_tokens: int, combine: Combine = "mean",
           temperature: float = 0.0, seed: int = 0, stop: Sequence[int] = (),
           should_stop: Callable[[list[int]], bool] | None = None) -> list[int]:
    """Token ids generated after `prompt` from the ensemble of `scorer` (an `LMScorer`): greedy
    with temperature 0, else sampled with a generator seeded from `seed`. Stops at a token in
    `stop` (not returned) or once `should_stop(tokens so far)`."""
    from transformers import DynamicCache

    blocks = [scorer.merged_name()] if combine == "merged" else list(scorer.names)
    if not len(prompt):
        raise ConfigError("generation needs a prompt of at least one token")
    generator = torch.Generator().manual_seed(seed)
    cache = DynamicCache()
    ids = torch.as_tensor(list(prompt), dtype=torch.long)[None].repeat(len(blocks), 1)
    new: list[int] = []
    for _ in range(max_new_tokens):
        logits = scorer.forward(ids, cache=cache, blocks=blocks).logits[:, -1].float().cpu()
        logp = torch.log_softmax(logits, -1)
        mixed = logp[0] if combine == "merged" else combine_logprobs(logp, combine)
        if temperature <= 0:
            token = int(mixed.argmax())
        else:
            probs = torch.softmax(mixed / temperature, -1)
            token = int(torch.multinomial(probs, 1, generator=generator))
        if token in stop:
            break
        new.append(token)
        if should_stop is not None and should_stop(new):
            break
        ids = torch.full((len(blocks), 1), token, dtype=torch.long)
    return new


def generate_texts(scorer: Any, prompts: Sequence[str], prompted: bool, max_new_tokens: int,
                   combine: Combine, temperature: float, seed: int,
                   stop: Sequence[str]) -> list[tuple[str, int]]:
    """Each prompt's continuation (text, tokens generated). `prompted`: the store learned what
    follows a formatted prompt, so the prompt is formatted the same way; prompt i samples with
    seed + i; generation stops at the end-of-text token or any `stop` string (cut off)."""
    tok = scorer.tokenizer
    out = []
    for i, prompt in enumerate(prompts):
        text = format_prompt(prompt) if prompted else prompt
        ids = tok(text, add_special_tokens=False)["input_ids"]

        def stopped(new: list[int]) -> bool:
            return bool(stop) and any(s in tok.decode(new) for s in stop)

        new = decode(scorer, ids, max_new_tokens, combine, temperature, seed + i,
                     stop=[tok.eos_token_id], should_stop=stopped)
        answer = tok.decode(new, skip_special_tokens=True)
        for s in stop:
            answer = answer.split(s, 1)[0]
        out.append((answer, len(new)))
    return out
