"""One-pass serving of a causal-LM store (`combine="merged"`): the adapter merged from the live
shards' adapters computes the mean of their weight updates, runs one row per token whatever the
shard count, follows the servable shards, and after a deletion equals a scratch store's merge."""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from sisa import PartitionConfig, Sisa, SisaConfig
from sisa.adapters import merged_adapter, merged_deltas
from sisa.cli import app
from sisa.config import CausalLMConfig
from sisa.errors import ConfigError
from sisa.service.app import GenerateIn
from sisa.training.causal_lm import LMInputs, load_base, make_example

from .conftest import CHAT_SPEC, make_chat_rows


def lm_config(model: str, top_k: int = 0, shards: int = 3, **extra: Any) -> SisaConfig:
    return SisaConfig(
        partition=PartitionConfig(shards=shards, slices=2, seed=3),
        training=CausalLMConfig(model=model, epochs_per_slice=2, batch_size=4, learning_rate=1e-2,
                                top_k_layers=top_k, max_length=48),
        **extra)


@pytest.fixture
def rows() -> list[dict[str, Any]]:
    return make_chat_rows()


def _adapters(sisa: Sisa) -> dict[int, dict[str, torch.Tensor]]:
    return {s: sisa.shard_model(s).adapter() for s in sorted(sisa.servable())}  # type: ignore[attr-defined]


def _digest(tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for name in sorted(tensors):
        h.update(name.encode())
        h.update(tensors[name].contiguous().numpy().tobytes())
    return h.hexdigest()


def test_the_merge_is_the_mean_of_the_updates() -> None:
    g = torch.Generator().manual_seed(0)
    key = "base_model.model.model.layers.0.self_attn.q_proj"
    adapters = {s: {f"{key}.lora_A.weight": torch.randn(4, 16, generator=g),
                    f"{key}.lora_B.weight": torch.randn(8, 4, generator=g)} for s in (0, 2, 5)}
    merged = merged_adapter(adapters)
    assert merged[f"{key}.lora_A.weight"].shape == (12, 16)
    assert merged[f"{key}.lora_B.weight"].shape == (8, 12)
    scaling = 2.0
    # Served with rank 3r and the same alpha: scaling / 3 on the concatenated product.
    update = (scaling / 3) * merged[f"{key}.lora_B.weight"].double() @ merged[f"{key}.lora_A.weight"].double()
    expected = merged_deltas(adapters, scaling)["model.layers.0.self_attn.q_proj.weight"]
    torch.testing.assert_close(update, expected)
    assert _digest(merged_adapter(dict(reversed(adapters.items())))) == _digest(merged)
    with pytest.raises(ValueError, match="other modules"):
        merged_adapter({0: adapters[0], 1: {f"{key}.lora_A.weight": torch.ones(4, 16)}})


@pytest.mark.parametrize("top_k", [0, 1])
def test_merged_scores_equal_the_base_with_the_mean_update_folded_in(
        tmp_path: Path, tiny_lm: str, rows: list[dict[str, Any]], top_k: int) -> None:
    sisa = Sisa.train(tmp_path / "s", rows, lm_config(tiny_lm, top_k), CHAT_SPEC)
    scorer = sisa.language_model()
    inputs = LMInputs([make_example(scorer.tokenizer, r["text"], r["prompt"] or None, 48)
                       for r in rows[:4]])
    got = scorer.scores(inputs, "merged")
    training = sisa.config.training
    deltas = merged_deltas(_adapters(sisa), training.lora_alpha / training.lora_r)  # type: ignore[attr-defined]
    dense = load_base(tiny_lm)
    weights = dense.state_dict()
    with torch.no_grad():
        for name, delta in deltas.items():
            weights[name] += delta.to(weights[name].dtype)
    dense.load_state_dict(weights)
    means = scorer.scores(inputs, "mean")
    for example, scores, mean in zip(inputs.examples, got, means, strict=True):
        ids = torch.as_tensor(example.tokens)[None]
        with torch.no_grad():
            logp = torch.log_softmax(dense(input_ids=ids).logits[0, :-1].double(), -1)
        nxt = torch.as_tensor(example.tokens[1:])
        want = logp[torch.arange(len(nxt)), nxt][max(example.start, 1) - 1:].numpy()
        np.testing.assert_allclose(scores.logp[scores.view("ensemble")], want, atol=1e-4)
        # The shards' own views are as with any other combination.
        np.testing.assert_allclose(scores.logp[:len(scorer.names)], mean.logp[:len(scorer.names)])


def test_merged_generation_runs_one_row_and_is_greedy_under_the_merge(
        tmp_path: Path, tiny_lm: str, rows: list[dict[str, Any]]) -> None:
    sisa = Sisa.train(tmp_path / "s", rows, lm_config(tiny_lm), CHAT_SPEC)
    scorer = sisa.language_model()
    seen: list[int] = []
    forward = scorer.forward

    def counting(input_ids: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        seen.append(input_ids.shape[0])
        return forward(input_ids, *args, **kwargs)

    scorer.forward = counting  # type: ignore[method-assign]
    from sisa.serving.generation import decode

    prompt = scorer.tokenizer("hi ok", add_special_tokens=False)["input_ids"]
    made = decode(scorer, prompt, 6, "merged")
    assert seen and set(seen) == {1}  # one row per step, not one per shard
    seen.clear()
    decode(scorer, prompt, 2, "mean")
    assert set(seen) == {len(scorer.names)}
    if made:
        _, greedy = scorer.continuation_logprobs(prompt, np.asarray([made]), "merged")
        assert greedy[scorer.views.index("ensemble"), 0]


def test_the_merge_follows_the_servable_shards_and_is_exact_after_a_deletion(
        tmp_path: Path, tiny_lm: str, rows: list[dict[str, Any]]) -> None:
    config = lm_config(tiny_lm, 1, combine="merged")
    sisa = Sisa.train(tmp_path / "s", rows, config, CHAT_SPEC)
    before = _digest(merged_adapter(_adapters(sisa)))
    request = sisa.request_deletion(group="u3")
    served = sisa.generate(["hi"], max_new_tokens=3)[0].shards  # the store's default: merged
    assert served and not set(served) & set(request.shards)
    assert sisa.score(rows[:3]).combine == "merged"
    sisa.apply_pending()
    after = merged_adapter(_adapters(sisa))
    assert _digest(after) != before
    kept = [r for r in rows if r["user"] != "u3"]
    scratch = Sisa.train(tmp_path / "scratch", kept, config, CHAT_SPEC)
    assert _digest(merged_adapter(_adapters(scratch))) == _digest(after)
    # And what is served from it: the same bits of output.
    inputs = scratch.lm_inputs([r["text"] for r in kept[:3]], [r["prompt"] or None for r in kept[:3]])
    mine = sisa.language_model().scores(inputs, "merged")
    theirs = scratch.language_model().scores(inputs, "merged")
    for a, b in zip(mine, theirs, strict=True):
        assert np.array_equal(a.logp, b.logp)
    scratch.close()


def test_combine_is_checked_everywhere(tmp_path: Path, tiny_lm: str, rows: list[dict[str, Any]]) -> None:
    with pytest.raises(ConfigError, match="combine must be one of mean, product, merged"):
        dataclasses.replace(lm_config(tiny_lm), combine="sum")
    assert SisaConfig.from_dict(lm_config(tiny_lm, combine="merged").to_dict()).combine == "merged"
    # A store written before the setting existed reads as the mixture.
    old = lm_config(tiny_lm).to_dict()
    del old["combine"]
    assert SisaConfig.from_dict(old).combine == "mean"
    assert lm_config(tiny_lm, combine="merged").digest() == lm_config(tiny_lm).digest()
    sisa = Sisa.train(tmp_path / "s", rows[:24], lm_config(tiny_lm, shards=2), CHAT_SPEC)
    with pytest.raises(ConfigError, match="combine must be one of"):
        sisa.generate(["hi"], combine="sum")  # type: ignore[arg-type]
    sisa.close()
    result = CliRunner().invoke(app, ["generate", "--store", str(tmp_path / "s"), "--prompt", "hi",
                                      "--combine", "sum"])
    assert result.exit_code == 2 and "merged" in result.output
    assert GenerateIn(prompts=["hi"], combine="merged").combine == "merged"
    assert GenerateIn(prompts=["hi"]).combine is None
