"""The causal-LM backend on a tiny random two-layer Llama: exact deletion (with and without top-k
adaptation), the ensemble's mixture and product, mixed-adapter batches, generation, exposure, and
the CLI end to end (the approximate baselines: test_approximate.py)."""

from __future__ import annotations

import copy
import dataclasses
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from shard_store import ShardStore
from sisa import PartitionConfig, Sisa, SisaConfig
from sisa import evidence as ev
from sisa.cli import app
from sisa.config import CausalLMConfig
from sisa.errors import ConfigError, InputKindError, RecordError
from sisa.models import fix_tokenizer
from sisa.records import input_digest
from sisa.serving import LMScorer
from sisa.tasks import PROMPT_SEPARATOR, combine_logprobs
from sisa.testing import store_snapshot
from sisa.training.causal_lm import LMInputs, load_tokenizer, make_example
from sisa.workflows.proof import (
    CanarySet,
    candidate_tokens,
    insert_canaries,
    make_canaries,
    oracle_check,
    prove,
    verdict_rows,
)

from .conftest import CHAT_SPEC, assert_exact, make_chat_rows


def lm_config(model: str, top_k: int = 0, shards: int = 2, slices: int = 2, **training: Any) -> SisaConfig:
    return SisaConfig(
        partition=PartitionConfig(shards=shards, slices=slices, seed=3),
        training=CausalLMConfig(model=model, epochs_per_slice=2, batch_size=4, learning_rate=1e-2,
                                top_k_layers=top_k, max_length=48, **training),
    )


@pytest.fixture
def rows() -> list[dict[str, Any]]:
    return make_chat_rows()


@pytest.mark.parametrize("top_k", [0, 1])
def test_forget_and_add_are_exact(tmp_path: Path, tiny_lm: str, rows: list[dict[str, Any]],
                                  top_k: int) -> None:
    config = lm_config(tiny_lm, top_k)
    sisa = Sisa.train(tmp_path / "s", rows[:40], config, CHAT_SPEC)
    receipt = sisa.forget_group("u1")
    assert receipt.record_ids and len(receipt.checkpoints_changed) == 1
    sisa.forget(["m002"])
    sisa.add(rows[40:])  # u1's later records are new: they stay
    kept = [r for r in rows[:40] if r["user"] != "u1" and r["id"] != "m002"] + rows[40:]
    assert_exact(sisa, kept, config, CHAT_SPEC, tmp_path / "scratch")
    assert sisa.audit().ok


def test_top_k_caches_the_frozen_layers_and_purges_them(tmp_path: Path, tiny_lm: str,
                                                        rows: list[dict[str, Any]]) -> None:
    sisa = Sisa.train(tmp_path / "s", rows, lm_config(tiny_lm, top_k=1), CHAT_SPEC)
    encoder: Any = sisa.encoder
    store = ShardStore.open(sisa.root)  # the store's activation cache, read directly
    assert store.embedding_count() == len(rows)
    ran = encoder.encoded
    user_records = len(sisa.group_ids("u2"))
    sisa.forget_group("u2")
    assert encoder.encoded == ran  # retraining read the cache, ran no lower layer again
    assert store.embedding_count() == len(rows) - user_records
    assert sisa.group_ids("u2") == []  # live records only
    assert store.deleted_embeddings() == 0


def test_a_prompt_enters_the_input_digest() -> None:
    assert input_digest("hi there", prompt="hello") != input_digest("hi there")
    assert input_digest("hi there", prompt="hello") != input_digest("hi there", prompt="hey")


def test_top_k_training_path_equals_the_served_full_model(tmp_path: Path, tiny_lm: str,
                                                          rows: list[dict[str, Any]]) -> None:
    """Training runs only the adapted top layer on cached activations; serving runs the whole
    model with the adapter on that layer: the same log-probabilities."""
    sisa = Sisa.train(tmp_path / "s", rows, lm_config(tiny_lm, top_k=1), CHAT_SPEC)
    shard = min(sisa.servable())
    model: Any = sisa.shard_model(shard)
    model.model.eval()
    texts, prompts = [r["text"] for r in rows[:6]], [r["prompt"] or None for r in rows[:6]]
    cached = sisa.model_inputs(texts, prompts)
    with torch.no_grad():
        trained = model.sequence_logprobs(cached, list(range(6)))[0].numpy()
    scored = sisa.language_model().scores(LMInputs(cached.examples))
    served = [s.logp[s.view(f"shard-{shard}")].sum() for s in scored]
    np.testing.assert_allclose(trained, served, rtol=1e-4, atol=1e-4)


def test_scoring_runs_the_frozen_layers_once_for_all_shards(tmp_path: Path, tiny_lm: str,
                                                            rows: list[dict[str, Any]]) -> None:
    """With adapters on the top layer only, scoring runs the layer below once per text, not once
    per shard: the same scores as the whole model run for every shard, and the model untouched."""
    sisa = Sisa.train(tmp_path / "s", rows, lm_config(tiny_lm, top_k=1, shards=3), CHAT_SPEC)
    scorer = sisa.language_model()
    assert scorer.split == 1 and len(scorer.names) == 3
    inputs = LMInputs([make_example(scorer.tokenizer, r["text"], r["prompt"] or None, 48)
                       for r in rows[:6]])
    rows_seen: list[int] = []
    bottom = scorer.model.get_base_model().model.layers[0]
    hook = bottom.register_forward_hook(lambda _m, args, _out: rows_seen.append(args[0].shape[0]))
    split = scorer.scores(inputs, "product")
    whole = copy.copy(scorer)
    whole.split = 0  # every row through the whole model
    full = whole.scores(inputs, "product")
    hook.remove()
    assert sum(rows_seen[:2]) == 6 and sum(rows_seen[2:]) == 3 * 6  # 2 batches of 4 and 2
    for a, b in zip(split, full, strict=True):
        for x, y in ((a.logp, b.logp), (a.mu, b.mu), (a.sigma, b.sigma)):
            np.testing.assert_allclose(x, y, atol=1e-5)
    assert len(scorer.model.get_base_model().model.layers) == 2  # the views changed nothing


def _scorers(sisa: Sisa) -> tuple[LMScorer, dict[int, LMScorer]]:
    """Every servable shard's adapter on one base, and each alone on a base of its own."""
    adapters = {s: sisa.shard_model(s).adapter() for s in sisa.servable()}  # type: ignore[attr-defined]
    both = sisa.language_model(adapters)
    alone = {s: sisa.language_model({s: a}) for s, a in adapters.items()}
    return both, alone


def test_mixed_adapter_batches_equal_one_adapter_at_a_time_and_combine_by_the_formulas(
        tmp_path: Path, tiny_lm: str, rows: list[dict[str, Any]]) -> None:
    sisa = Sisa.train(tmp_path / "s", rows, lm_config(tiny_lm), CHAT_SPEC)
    both, alone = _scorers(sisa)
    inputs = LMInputs([make_example(both.tokenizer, r["text"], r["prompt"] or None, 48) for r in rows[:5]])
    for combine in ("mean", "product"):
        mixed = both.scores(inputs, combine)
        for shard, scorer in alone.items():
            single = scorer.scores(inputs, combine)
            for m, s in zip(mixed, single, strict=True):
                np.testing.assert_allclose(m.logp[m.view(f"shard-{shard}")], s.logp[0], atol=1e-5)
    # The ensemble's token log-probabilities, from full distributions computed shard by shard.
    batch_ids = torch.as_tensor(inputs.examples[0].tokens)[None]
    per_shard = []
    for scorer in alone.values():
        with torch.no_grad():
            logits = scorer.model(input_ids=batch_ids, adapter_names=scorer.names).logits[0, :-1]
        per_shard.append(torch.log_softmax(logits.double(), -1).numpy())
    stacked = np.stack(per_shard)  # (shards, T-1, V)
    nxt = inputs.examples[0].tokens[1:]
    mean = np.log(np.exp(stacked).mean(axis=0))
    avg = stacked.mean(axis=0)
    product = avg - np.log(np.exp(avg).sum(axis=-1, keepdims=True))
    start = inputs.examples[0].start
    for combine, expected in (("mean", mean), ("product", product)):
        got = both.scores(inputs, combine)[0]
        want = expected[np.arange(len(nxt)), nxt][max(start, 1) - 1:]
        np.testing.assert_allclose(got.logp[got.view("ensemble")], want, atol=1e-4)


def test_combine_logprobs_formulas() -> None:
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(3, 7))
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    mixed = combine_logprobs(logp, "mean").numpy()
    np.testing.assert_allclose(np.exp(mixed), np.exp(logp).mean(0), atol=1e-12)
    product = combine_logprobs(logp, "product").numpy()
    geo = np.exp(logp.mean(0))
    np.testing.assert_allclose(np.exp(product), geo / geo.sum(), atol=1e-12)


def test_generation_is_deterministic_for_a_seed_and_greedy_by_default(
        tmp_path: Path, tiny_lm: str, rows: list[dict[str, Any]]) -> None:
    sisa = Sisa.train(tmp_path / "s", rows, lm_config(tiny_lm), CHAT_SPEC)
    first = sisa.generate(["hi ok"], max_new_tokens=12, temperature=1.0, seed=5)
    again = sisa.generate(["hi ok"], max_new_tokens=12, temperature=1.0, seed=5)
    other = sisa.generate(["hi ok"], max_new_tokens=12, temperature=1.0, seed=6)
    assert first == again and first[0].text != other[0].text
    greedy = sisa.generate(["hi ok"], max_new_tokens=12)[0]
    # Greedy: each generated token is the ensemble's most likely next token.
    scorer = sisa.language_model()
    # A store trained with prompts continues "prompt" + the separator, as it learned.
    ids = scorer.tokenizer("hi ok" + PROMPT_SEPARATOR, add_special_tokens=False)["input_ids"]
    new = scorer.tokenizer(greedy.text, add_special_tokens=False)["input_ids"]
    if new:  # (an untrained model may end the text at once)
        _, is_greedy = scorer.continuation_logprobs(ids, np.asarray([new]))
        assert is_greedy[scorer.views.index("ensemble"), 0]
    assert greedy.shards == sorted(sisa.servable())


def test_a_shard_with_a_pending_deletion_never_generates(tmp_path: Path, tiny_lm: str,
                                                         rows: list[dict[str, Any]]) -> None:
    sisa = Sisa.train(tmp_path / "s", rows, lm_config(tiny_lm), CHAT_SPEC)
    request = sisa.request_deletion(group="u3")
    served = sisa.generate(["hi"], max_new_tokens=3)[0].shards
    assert served and not set(served) & set(request.shards)
    assert sisa.score(rows[:3]).shards == served


def test_the_trie_scores_every_candidate_as_scoring_each_text_does(
        tmp_path: Path, tiny_lm: str, rows: list[dict[str, Any]]) -> None:
    sisa = Sisa.train(tmp_path / "s", rows, lm_config(tiny_lm), CHAT_SPEC)
    scorer = sisa.language_model()
    canaries = make_canaries(["a", "b"], inserted=1, never=1, digits=2)
    prefix, cands, secrets = candidate_tokens(scorer.tokenizer, canaries)
    assert cands.shape == (100, 2)
    for combine in ("mean", "product"):
        logp, _ = scorer.continuation_logprobs(prefix, cands, combine)
        # Brute force: each candidate's whole text, its last two tokens' log-probabilities.
        examples = [make_example(scorer.tokenizer, canaries.template.format(secret=s), None, 48)
                    for s in secrets[:12]]
        brute = scorer.scores(LMInputs(examples), combine)
        for i, b in enumerate(brute):
            np.testing.assert_allclose(logp[:, i], b.logp[:, -3:-1].sum(axis=1), atol=1e-4)


def test_exposure_on_a_known_ranking() -> None:
    logp = -np.arange(1000, dtype=float)  # candidate i is the (i + 1)-th most likely
    top = ev.exposure(logp, 0, np.arange(1, 1000))
    assert top.rank == 1 and top.exact == pytest.approx(math.log2(1000))
    assert top.estimate == pytest.approx(math.log2(1000))
    mid = ev.exposure(logp, 499, ev.reference_indices(1000, 499, 999, seed=0))
    assert mid.rank == 500 and mid.exact == pytest.approx(1.0)
    assert mid.estimate == pytest.approx(-math.log2(500 / 1000))
    assert ev.exposure(logp, 999, np.arange(999)).exact == 0.0


def test_membership_scores_and_auc() -> None:
    logp = np.log(np.array([0.5, 0.1, 0.9, 0.2, 0.05]))
    assert ev.min_k(logp, 0.4) == pytest.approx(np.mean(np.log([0.05, 0.1])))
    assert ev.loss_score(logp) == pytest.approx(-logp.mean())
    assert ev.auc([3, 4, 5], [0, 1, 2]) == 1.0 and ev.auc([1, 2], [1, 2]) == 0.5
    z = ev.min_k_plus_plus(logp, np.zeros(5), np.ones(5), 0.4)
    assert z == pytest.approx(ev.min_k(logp, 0.4))


def held_out(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Texts no user of the store wrote, by users it never saw: true non-members."""
    return [{**r, "id": f"held-{i}", "user": f"stranger-{i}", "text": " ".join(reversed(r["text"].split()))}
            for i, r in enumerate(rows)]


def test_prove_refuses_a_holdout_that_is_not_held_out(tmp_path: Path, tiny_lm: str,
                                                      rows: list[dict[str, Any]]) -> None:
    sisa = Sisa.train(tmp_path / "s", rows, lm_config(tiny_lm), CHAT_SPEC)
    canaries = make_canaries(["u1"], inserted=1, never=1, digits=2)
    with pytest.raises(ConfigError, match="holds 2 record\\(s\\) the store has or had"):
        prove(sisa, canaries, rows[:2], ["u1"], references=10)
    same_users = [{**r, "user": rows[0]["user"]} for r in held_out(rows[:3])]
    with pytest.raises(ConfigError, match="shares 1 user\\(s\\) with the store's training data"):
        prove(sisa, canaries, same_users, ["u1"], references=10)
    assert not sisa.pending() and sisa.group_ids("u1")  # refused before anything was deleted


def test_canaries_are_inserted_proven_and_forgotten(tmp_path: Path, tiny_lm: str,
                                                    rows: list[dict[str, Any]]) -> None:
    sisa = Sisa.train(tmp_path / "s", rows, lm_config(tiny_lm, top_k=1), CHAT_SPEC)
    canaries, report = insert_canaries(sisa, inserted=2, never=2, digits=2, repeats=3)
    assert report.retrained and len(canaries.canaries) == 4
    path = tmp_path / "canaries.json"
    canaries.save(path)
    assert CanarySet.load(path) == canaries
    user = canaries.canaries[0].group
    kept = store_snapshot(sisa.root)
    proof = prove(sisa, canaries, held_out(rows[:8]), [user], holdout_limit=8, retain_limit=8,
                  references=50, oracle=True)
    assert proof.after is not None and proof.forgotten_groups == [user] and not proof.in_place
    # By default the deletion happened on a copy: the store is as it was, and no copy is left.
    assert store_snapshot(sisa.root) == kept and not sisa.pending()
    assert all(r.deleted_at is None for r in sisa.records(sisa.group_ids(user)).values())
    # The copy after the deletion is the retrained oracle, shard by shard.
    assert proof.oracle is not None and proof.oracle.identical
    assert proof.oracle.records == len(list(sisa.live_records())) - len(sisa.group_ids(user))
    assert any("identical" in finding for _, finding in verdict_rows(proof))
    # A random two-layer model memorises nothing: the report says so rather than claiming proof.
    assert not proof.memorised and proof.notes
    assert set(proof.before.membership_auc) >= {"ensemble"}
    assert all(0.0 <= v <= 1.0 for v in proof.before.membership_auc["ensemble"].values())
    again = prove(sisa, canaries, held_out(rows[:8]), [user], holdout_limit=8, retain_limit=8,
                  references=50, in_place=True)
    assert again.in_place and again.after is not None
    # In place, it is a real deletion: the same evidence after, and a receipt in the ledger.
    assert ([c.exposure_shard for c in again.after.canaries]
            == [c.exposure_shard for c in proof.after.canaries])
    assert all(r.deleted_at for r in sisa.records(sisa.group_ids(user)).values())
    assert sisa.deletions()[-1].receipt and sisa.audit().ok


def test_the_oracle_check_can_fail(tmp_path: Path, tiny_lm: str, rows: list[dict[str, Any]]) -> None:
    sisa = Sisa.train(tmp_path / "s", rows[:24], lm_config(tiny_lm), CHAT_SPEC)
    assert oracle_check(sisa, tmp_path / "same").identical
    # An oracle trained otherwise (one more epoch) is told apart, shard by shard.
    training = dataclasses.replace(sisa.config.training, epochs_per_slice=3)  # type: ignore[arg-type]
    sisa.config = sisa.config.replace(training=training)
    found = oracle_check(sisa, tmp_path / "other")
    assert not found.identical
    assert all(v["store"] != v["oracle"] for v in found.shards.values())


def test_a_canary_template_is_checked_before_anything_retrains(
        tmp_path: Path, tiny_lm: str, rows: list[dict[str, Any]]) -> None:
    sisa = Sisa.train(tmp_path / "s", rows, lm_config(tiny_lm), CHAT_SPEC)
    kept = store_snapshot(sisa.root)
    with pytest.raises(ConfigError, match="must end with"):
        insert_canaries(sisa, 1, 1, 2, 2, template="{secret} is mine")
    assert store_snapshot(sisa.root) == kept
    chosen, _ = insert_canaries(sisa, 1, 1, 2, 2, template="the locker code: {secret}")
    assert chosen.template == "the locker code: {secret}"
    added = sisa.texts(chosen.record_ids(chosen.canaries[0]))
    assert added and all(t.startswith("the locker code: ") for t, _ in added.values())


def test_prove_refuses_a_canary_set_that_is_not_the_stores(
        tmp_path: Path, tiny_lm: str, rows: list[dict[str, Any]]) -> None:
    sisa = Sisa.train(tmp_path / "s", rows, lm_config(tiny_lm, shards=1, slices=1), CHAT_SPEC)
    chosen, _ = insert_canaries(sisa, 1, 1, 2, 2, template="the locker code: {secret}")
    path = tmp_path / "canaries.json"
    dataclasses.replace(chosen, template="my pin is {secret}").save(path)
    kept = store_snapshot(sisa.root)
    wrong = CanarySet.load(path)
    record = chosen.record_ids(chosen.canaries[0])[0]
    with pytest.raises(RecordError, match=f"canary record '{record}' reads 'the locker code: "):
        prove(sisa, wrong, held_out(rows[:4]), holdout_limit=4, retain_limit=4, references=20)
    # The CLI's --template reads the set with the template the canaries were inserted with.
    holdout = tmp_path / "held-out.jsonl"
    holdout.write_text("".join(json.dumps(r) + "\n" for r in held_out(rows[:4])))
    args = ["prove", "--store", str(sisa.root), "--canaries", str(path), "--holdout",
            str(holdout), "--holdout-limit", "4", "--retain-limit", "4",
            "--references", "20", "--json", "--no-progress"]
    refused = CliRunner().invoke(app, args)
    assert refused.exit_code != 0 and "sisa prove --template" in refused.output
    bad = CliRunner().invoke(app, [*args, "--template", "{secret} is mine"])
    assert bad.exit_code != 0 and "must end with {secret}" in bad.output
    ok = CliRunner().invoke(app, [*args, "--template", "the locker code: {secret}"])
    assert ok.exit_code == 0, ok.output
    assert json.loads(ok.output)["template"] == "the locker code: {secret}"
    assert store_snapshot(sisa.root) == kept


def test_several_canaries_per_user_each_have_a_secret_of_their_own() -> None:
    users = [f"u{i}" for i in range(10)]
    chosen = make_canaries(users, inserted=7, never=3, digits=2, repeats=2, per_user=3)
    inserted = [c for c in chosen.canaries if c.inserted]
    assert len(inserted) == 7
    by_user: dict[str, int] = {}
    for c in inserted:
        by_user[c.group] = by_user.get(c.group, 0) + 1
    assert sorted(by_user.values()) == [1, 3, 3]  # three users; the last holds the remainder
    assert len({c.secret for c in chosen.canaries}) == 10  # every secret distinct
    ids = [i for c in inserted for i in chosen.record_ids(c)]
    assert len(ids) == len(set(ids)) == 14
    # The users chosen are the same ones a canary apiece would choose first.
    one_each = make_canaries(users, inserted=3, never=3, digits=2, per_user=1)
    assert set(by_user) == {c.group for c in one_each.canaries if c.inserted}
    with pytest.raises(ConfigError, match="need 4 users; the data has 3"):
        make_canaries(["a", "b", "c"], inserted=7, never=1, digits=2, per_user=2)
    with pytest.raises(ConfigError, match="per_user must be >= 1"):
        make_canaries(users, inserted=2, never=1, digits=2, per_user=0)
    with pytest.raises(ConfigError, match="need as many distinct secrets; 1 digits have 10"):
        make_canaries(users, inserted=8, never=3, digits=1)


def test_classifier_only_calls_refuse_a_causal_lm(tmp_path: Path, tiny_lm: str,
                                                  rows: list[dict[str, Any]]) -> None:
    sisa = Sisa.train(tmp_path / "s", rows, lm_config(tiny_lm, shards=1, slices=1), CHAT_SPEC)
    assert sisa.classes_ == []
    with pytest.raises(InputKindError, match="causal LM"):
        sisa.predict(["hi"])


def test_fix_tokenizer_sets_pad_and_eos(tiny_lm: str) -> None:
    tok = load_tokenizer(tiny_lm)
    tok.pad_token = None
    fix_tokenizer(tok)
    assert tok.pad_token == tok.eos_token == "<|im_end|>"
    fix_tokenizer(tok, {"pad_token": "<|endoftext|>", "eos_token": "<|im_end|>"})
    assert (tok.pad_token, tok.eos_token) == ("<|endoftext|>", "<|im_end|>")
    assert tok.pad_token_id != tok.eos_token_id


@pytest.mark.slow
def test_packaged_smollm2_loads_with_the_chat_tokens() -> None:
    pytest.importorskip("gguf")
    tok = load_tokenizer("SmolLM2-135M-Instruct")
    assert tok.pad_token == "<|endoftext|>" and tok.eos_token == "<|im_end|>"
    assert tok.tokenize(" 4821") == ["Ġ", "4", "8", "2", "1"]  # digits one by one (canaries)


def test_cli_end_to_end(tmp_path: Path, tiny_lm: str, rows: list[dict[str, Any]]) -> None:
    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    holdout = tmp_path / "held-out.jsonl"
    holdout.write_text("".join(json.dumps(r) + "\n" for r in held_out(rows[:8])))
    store = str(tmp_path / "store")
    runner = CliRunner()

    def run(*args: str) -> Any:
        result = runner.invoke(app, list(args))
        assert result.exit_code == 0, result.output
        return result

    run("train", "--store", store, "--data", str(data), "--backend", "causal_lm", "--model", tiny_lm,
        "--text-column", "text", "--prompt-column", "prompt", "--group-column", "user",
        "--shards", "2", "--slices", "2", "--epochs", "1", "--batch-size", "4", "--top-k-layers", "1",
        "--no-progress")
    gen = json.loads(run("generate", "--store", store, "--prompt", "hi", "--prompt", "ok",
                         "--max-new-tokens", "4", "--json").stdout)
    assert len(gen) == 2 and all(g["tokens"] <= 4 for g in gen)
    scored = json.loads(run("score", "--store", store, "--data", str(data), "--json").stdout)
    assert len(scored["records"]) == len(rows) and scored["perplexity"] > 1
    canaries = tmp_path / "canaries.json"
    run("canaries", "--store", store, "--out", str(canaries), "--inserted", "2", "--never", "2",
        "--digits", "2", "--repeats", "2", "--no-progress")
    user = CanarySet.load(canaries).canaries[0].group
    proof = json.loads(run("prove", "--store", store, "--canaries", str(canaries), "--holdout",
                           str(holdout), "--forget-group", user, "--references", "50",
                           "--holdout-limit", "6", "--retain-limit", "6", "--json",
                           "--no-progress").stdout)
    assert proof["forgotten_groups"] == [user] and proof["after"] is not None
    assert run("audit", "--store", store).exit_code == 0
    refused = runner.invoke(app, ["predict", "--store", store, "--data", str(data)])
    assert refused.exit_code == 1 and "causal LM" in refused.output


def test_bad_input_is_a_clear_error_and_writes_nothing(tmp_path: Path, tiny_lm: str,
                                                       rows: list[dict[str, Any]]) -> None:
    from sisa import ConfigError, HeadConfig, RecordError

    with pytest.raises(ConfigError, match="top_k_layers=2 but the model has 2 layers"):
        Sisa.train(tmp_path / "deep", rows, lm_config(tiny_lm, top_k=2), CHAT_SPEC)
    assert not (tmp_path / "deep").exists()
    head = SisaConfig(training=HeadConfig(model=tiny_lm))
    with pytest.raises(ConfigError, match=r"prompt column .* is for the causal_lm backend"):
        Sisa.train(tmp_path / "head", rows, head, CHAT_SPEC)
    plain = dataclasses.replace(CHAT_SPEC, prompt_column=None)
    sisa = Sisa.train(tmp_path / "s", rows, lm_config(tiny_lm, shards=1, slices=1), plain)
    with pytest.raises(RecordError, match="prompt is empty"):
        sisa.generate([""])
    with pytest.raises(ConfigError, match="stop string must not be empty"):
        sisa.generate(["hi"], stop=[""])
    bad = tmp_path / "canaries.json"
    bad.write_text('{"template": "pin {secret}", "digits": 4, "repeats": 1, "canaries": '
                   '[{"id": "c", "group": "g", "secret": "12", "inserted": true}]}')
    with pytest.raises(RecordError, match="is not a canary set"):
        CanarySet.load(bad)
    canaries = make_canaries(["u1"], inserted=1, never=1, digits=2)
    sisa.forget_group("u1")
    with pytest.raises(RecordError, match="no live records of group"):
        prove(sisa, canaries, held_out(rows[:4]), ["u1"], references=10)


def test_builtin_chitchat_holds_each_users_own_words() -> None:
    from sisa.builtin import load_builtin

    rows, spec = load_builtin("builtin:chitchat")
    assert spec.prompt_column is None and spec.group_column == "sender"
    assert {"id", "text", "sender"} == set(rows[0]) and rows[0]["id"].startswith("chat-")
    test, _ = load_builtin("builtin:chitchat:test")
    assert test and not {r["sender"] for r in rows} & {r["sender"] for r in test}  # split by user
