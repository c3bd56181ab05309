"""Chat-format data for the causal-LM backend: a messages column, formatted by the model's chat
template with the loss on the assistant turns only (TRL's `assistant_only_loss`); its validation,
exact deletion, generation and scoring, and the CLI end to end. On the tiny random Llama, with a
ChatML template added to a copy of its tokenizer."""

from __future__ import annotations

import csv
import dataclasses
import json
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from typer.testing import CliRunner

from shard_store import ShardStore
from sisa import DataSpec, PartitionConfig, Sisa, SisaConfig
from sisa.cli import app
from sisa.config import CausalLMConfig, HeadConfig
from sisa.errors import ConfigError, RecordError
from sisa.records import conversation, input_digest, load_records
from sisa.serving.generation import generate_texts
from sisa.testing import store_snapshot
from sisa.training.causal_lm import (
    LMInputs,
    chat_prompt,
    load_tokenizer,
    make_batch,
    make_chat_example,
    make_example,
)

from .conftest import assert_exact, live_shas

# SmolLM2's ChatML template (its system-prompt default left out).
CHATML = ("{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}"
          "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
SPEC = DataSpec(id_column="id", label_column=None, messages_column="messages", group_column="user")


@pytest.fixture(scope="module")
def chat_lm(tiny_lm: str, tmp_path_factory: pytest.TempPathFactory) -> str:
    """The tiny Llama with a ChatML chat template (and <|im_start|> one token, as in SmolLM2)."""
    root = tmp_path_factory.mktemp("tiny-chat")
    shutil.copytree(tiny_lm, root, dirs_exist_ok=True)
    tok = load_tokenizer(tiny_lm)
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>"]})
    tok.chat_template = CHATML
    tok.save_pretrained(root)
    return str(root)


def lm_config(model: str, top_k: int = 0, shards: int = 2, slices: int = 2) -> SisaConfig:
    return SisaConfig(
        partition=PartitionConfig(shards=shards, slices=slices, seed=3),
        training=CausalLMConfig(model=model, epochs_per_slice=2, batch_size=4, learning_rate=1e-2,
                                top_k_layers=top_k, max_length=96),
    )


def make_conversations(n: int = 32, users: int = 6) -> list[dict[str, Any]]:
    """Short conversations, each one user's: some with a system message, some of two exchanges."""
    rng = random.Random(11)
    words = ["hi", "ok", "sure", "tea", "cat", "sun", "go", "yes", "no", "fun"]

    def say(most: int) -> str:
        return " ".join(rng.choice(words) for _ in range(rng.randint(1, most)))

    rows = []
    for i in range(n):
        messages = [{"role": "user", "content": say(3)}, {"role": "assistant", "content": say(5)}]
        if i % 3 == 0:
            messages.insert(0, {"role": "system", "content": "be brief"})
        if i % 4 == 1:
            messages += [{"role": "user", "content": say(2)}, {"role": "assistant", "content": say(3)}]
        rows.append({"id": f"c{i:03d}", "messages": messages, "user": f"u{i % users}"})
    return rows


@pytest.fixture
def rows() -> list[dict[str, Any]]:
    return make_conversations()


@pytest.fixture(scope="module")
def trained(chat_lm: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A chat store that the tests refusing input check is left as it was."""
    root = tmp_path_factory.mktemp("chat-store") / "s"
    Sisa.train(root, make_conversations(), lm_config(chat_lm, shards=1, slices=1), SPEC).close()
    return root


CONVERSATION = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"},
                {"role": "assistant", "content": "hello there"}, {"role": "user", "content": "tea?"},
                {"role": "assistant", "content": "yes please"}]


def learned_runs(tok: Any, tokens: np.ndarray, learned: np.ndarray) -> list[str]:
    """The learned tokens, each contiguous run decoded."""
    runs: list[list[int]] = []
    for t, (token, on) in enumerate(zip(tokens.tolist(), learned.tolist(), strict=True)):
        if on:
            if t == 0 or not learned[t - 1]:
                runs.append([])
            runs[-1].append(token)
    return [tok.decode(r) for r in runs]


def test_the_loss_covers_the_assistant_turns_and_their_end_token_only(chat_lm: str) -> None:
    tok = load_tokenizer(chat_lm)
    example = make_chat_example(tok, CONVERSATION, 256, chat_lm)
    assert example.learned is not None
    rendered = tok.apply_chat_template(CONVERSATION, tokenize=False)
    # The template's text, whole (the tiny vocabulary has no newline: it is <unk>).
    assert tok.decode(example.tokens.tolist()) == rendered.replace("\n", "<unk>")
    assert learned_runs(tok, example.tokens, example.learned) == ["hello there<|im_end|>",
                                                                  "yes please<|im_end|>"]
    unlearned = tok.decode(example.tokens[~example.learned].tolist())
    assert "be brief" in unlearned and "tea?" in unlearned and "<|im_start|>assistant<unk>" in unlearned
    assert example.start == int(np.flatnonzero(example.learned)[0])
    # The batch's mask: position t's logits predict token t + 1, learned where that token is.
    batch = make_batch(LMInputs([example, make_example(tok, "ok", None, 256)]), [0, 1], tok.pad_token_id)
    n = len(example.tokens)
    assert batch.learned[0, :n - 1].tolist() == example.learned[1:].tolist()
    assert not batch.learned[0, n - 1:].any()
    # A truncated conversation keeps its first tokens, its mask cut alike.
    cut = make_chat_example(tok, CONVERSATION, 40, chat_lm)
    assert cut.tokens.tolist() == example.tokens[:40].tolist()
    assert cut.learned is not None and cut.learned.tolist() == example.learned[:40].tolist()


def test_texts_keep_their_examples_and_conversations_their_digest() -> None:
    text, _ = conversation(CONVERSATION)
    assert text is not None and json.loads(text) == CONVERSATION
    assert conversation(json.dumps(CONVERSATION, indent=2)) == (text, "")  # CSV's JSON, canonical
    changed, _ = conversation([*CONVERSATION[:-1], {"role": "assistant", "content": "no thanks"}])
    assert changed is not None
    assert input_digest(text, messages=True) != input_digest(changed, messages=True)
    assert input_digest(text, messages=True) != input_digest(text)


@pytest.mark.parametrize("top_k", [0, 1])
def test_forget_and_add_are_exact(tmp_path: Path, chat_lm: str, rows: list[dict[str, Any]],
                                  top_k: int) -> None:
    config = lm_config(chat_lm, top_k)
    sisa = Sisa.train(tmp_path / "s", rows[:28], config, SPEC)
    receipt = sisa.forget_group("u1")  # a user's conversations: their own records
    assert receipt.record_ids and len(receipt.checkpoints_changed) == 1
    sisa.forget(["c002"])
    if top_k:  # the frozen layers' outputs of the forgotten conversations are purged
        store = ShardStore.open(sisa.root)
        assert store.embedding_count() == len(list(sisa.live_records()))
        assert store.deleted_embeddings() == 0
        store.close()
    sisa.add(rows[28:])
    kept = [r for r in rows[:28] if r["user"] != "u1" and r["id"] != "c002"] + rows[28:]
    assert_exact(sisa, kept, config, SPEC, tmp_path / "scratch")
    assert sisa.audit().ok


def test_scoring_and_generation_format_with_the_chat_template(tmp_path: Path, chat_lm: str,
                                                              rows: list[dict[str, Any]]) -> None:
    sisa = Sisa.train(tmp_path / "s", rows, lm_config(chat_lm), SPEC)
    scorer: Any = sisa.language_model()
    # The stored text of a conversation is its JSON; lm_inputs takes it or the messages.
    text, prompt = sisa.texts(["c001"])["c001"]
    assert prompt is None and json.loads(text) == rows[1]["messages"]
    stored, given = sisa.lm_inputs([text]).examples[0], sisa.lm_inputs([rows[1]["messages"]]).examples[0]
    assert stored.tokens.tolist() == given.tokens.tolist()
    assert given.learned is not None and stored.learned is not None
    assert stored.learned.tolist() == given.learned.tolist()
    report = sisa.score(rows[:4])
    assert [r.tokens for r in report.records] == [
        int(e.learned.sum()) for e in sisa.lm_inputs([r["messages"] for r in rows[:4]]).examples
        if e.learned is not None]
    # A prompt is a user message, the assistant's turn opened: as training formatted the turns.
    got = sisa.generate(["hi ok"], max_new_tokens=6)[0]
    asked = chat_prompt(scorer.tokenizer, "hi ok", chat_lm)
    assert asked.endswith("<|im_start|>assistant\n")
    assert (got.text, got.tokens) == generate_texts(scorer, [asked], False, 6, "mean", 0.0, 0, [])[0]


@pytest.mark.parametrize(("messages", "problem"), [
    ("hello", "not a JSON list of messages"),
    ({"role": "user"}, "not a list of messages (an object)"),
    ([], "no messages"),
    ([{"content": "hi"}, {"role": "assistant", "content": "yo"}], "message 1 has no 'role'"),
    ([{"role": "user", "content": "hi"}, {"role": "assistant"}], "message 2 has no 'content'"),
    ([{"role": "bot", "content": "hi"}], "message 1 has an unknown role 'bot'"),
    ([{"role": "user", "content": "hi"}], "no assistant message"),
    ([{"role": "user", "content": "hi"}, {"role": "assistant", "content": 5}],
     "message 2's content is not text (a number)"),
    (None, "no messages"),
])
def test_malformed_messages_are_named_and_change_nothing(tmp_path: Path, chat_lm: str, trained: Path,
                                                         messages: Any, problem: str) -> None:
    bad = [*make_conversations(4), {"id": "bad", "messages": messages, "user": "u9"}]
    with pytest.raises(RecordError, match="invalid records") as info:
        Sisa.train(tmp_path / "new", bad, lm_config(chat_lm, shards=1, slices=1), SPEC)
    assert f"record 'bad' (position 4): {problem}" in str(info.value)
    assert "messages column 'messages'" in str(info.value)
    assert not (tmp_path / "new").exists()
    before = store_snapshot(trained)
    addition = [{"id": "fine", "messages": CONVERSATION, "user": "u9"}, bad[-1]]
    with Sisa.open(trained) as sisa, pytest.raises(RecordError, match=f"record 'bad'.*{problem[:12]}"):
        sisa.add(addition)
    assert store_snapshot(trained) == before


def test_a_file_names_the_line_and_csv_holds_the_same_records_as_json(tmp_path: Path) -> None:
    rows = make_conversations(3)
    lines = tmp_path / "chat.jsonl"
    lines.write_text("".join(json.dumps(r) + "\n" for r in rows))
    table = tmp_path / "chat.csv"
    with table.open("w", newline="") as f:
        writer = csv.DictWriter(f, ["id", "messages", "user"])
        writer.writeheader()
        writer.writerows({**r, "messages": json.dumps(r["messages"])} for r in rows)
    assert load_records(lines, SPEC) == load_records(table, SPEC) == load_records(rows, SPEC)
    bad = tmp_path / "bad.jsonl"
    bad.write_text("".join(json.dumps(r) + "\n" for r in rows)
                   + json.dumps({"id": "x", "messages": [{"role": "user", "content": "hi"}], "user": "u"}))
    with pytest.raises(RecordError, match="record 'x' \\(line 4\\): no assistant message"):
        load_records(bad, SPEC)


def test_the_spec_and_the_backend_refuse_what_they_cannot_take(tmp_path: Path, tiny_lm: str,
                                                               rows: list[dict[str, Any]]) -> None:
    with pytest.raises(ConfigError, match="give exactly one of text_column or feature_columns"):
        DataSpec(text_column="text", messages_column="messages")
    with pytest.raises(ConfigError, match="give no prompt_column"):
        DataSpec(messages_column="messages", prompt_column="prompt")
    with pytest.raises(ConfigError, match=r"messages column \('messages'\) is for the causal_lm"):
        Sisa.train(tmp_path / "head", rows, SisaConfig(training=HeadConfig(model=tiny_lm)), SPEC)
    # The tiny Llama's own tokenizer has no chat template.
    with pytest.raises(ConfigError, match=f"model '{tiny_lm}' has no chat template.*--text-column"):
        Sisa.train(tmp_path / "plain", rows, lm_config(tiny_lm), SPEC)
    assert not (tmp_path / "head").exists() and not (tmp_path / "plain").exists()
    # A template that refuses some conversations: they are named before anything is written.
    strict = tmp_path / "strict"
    shutil.copytree(Path(tiny_lm), strict)
    tok = load_tokenizer(tiny_lm)
    tok.chat_template = ("{% for m in messages %}{% if m['role'] == 'system' %}"
                         "{{ raise_exception('no system role') }}{% endif %}"
                         "{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                         "{% if add_generation_prompt %}assistant: {% endif %}")
    tok.save_pretrained(strict)
    with pytest.raises(RecordError, match=r"chat template of model .* refuses record\(s\) 'c000' "
                                          r"\(TemplateError: no system role\)"):
        Sisa.train(tmp_path / "refused", rows, lm_config(str(strict)), SPEC)
    assert not (tmp_path / "refused").exists()


def test_cli_trains_on_a_messages_column(tmp_path: Path, chat_lm: str, rows: list[dict[str, Any]]) -> None:
    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    store = str(tmp_path / "store")
    runner = CliRunner()

    def run(*args: str) -> Any:
        result = runner.invoke(app, list(args))
        assert result.exit_code == 0, result.output
        return result

    assert "--messages-column" in run("train", "--help").output
    run("train", "--store", store, "--data", str(data), "--backend", "causal_lm", "--model", chat_lm,
        "--messages-column", "messages", "--group-column", "user", "--shards", "2", "--slices", "2",
        "--epochs", "1", "--batch-size", "4", "--no-progress")
    status = json.loads(run("status", "--store", store, "--json").stdout)
    assert status["data_spec"]["messages_column"] == "messages" and status["reads"] == ["messages"]
    assert status["data_spec"]["text_column"] is None
    with Sisa.open(store, recover=False, read_only=True) as sisa:  # no model built: the same digest
        assert sisa.config_digest == status["config_digest"]
    assert "predictions read: messages" in run("status", "--store", store).output
    gen = json.loads(run("generate", "--store", store, "--prompt", "hi", "--max-new-tokens", "4",
                         "--json").stdout)
    assert len(gen) == 1 and gen[0]["tokens"] <= 4
    scored = json.loads(run("score", "--store", store, "--data", str(data), "--json").stdout)
    assert len(scored["records"]) == len(rows)
    with Sisa.open(store) as sisa:
        before = live_shas(sisa)
    run("forget", "--store", store, "--group", "u2")
    with Sisa.open(store) as sisa:
        assert sisa.group_ids("u2") == [] and live_shas(sisa) != before


def test_a_chat_store_keys_its_digest_to_the_template(chat_lm: str, tmp_path: Path) -> None:
    from sisa.models import model_fingerprint

    other = tmp_path / "other"
    shutil.copytree(Path(chat_lm), other)
    (other / "chat_template.jinja").write_text(CHATML.replace("\n{% endfor %}", "\n\n{% endfor %}"))
    assert model_fingerprint(chat_lm) == model_fingerprint(str(other))  # a text store: unchanged
    assert model_fingerprint(chat_lm, chat=True) != model_fingerprint(str(other), chat=True)


def test_a_text_store_refuses_conversations(tmp_path: Path, chat_lm: str) -> None:
    from sisa.errors import InputKindError

    texts = [{"id": f"t{i}", "text": f"hi {i}", "user": "u"} for i in range(4)]
    spec = dataclasses.replace(SPEC, messages_column=None, text_column="text")
    sisa = Sisa.train(tmp_path / "s", texts, lm_config(chat_lm, shards=1, slices=1), spec)
    with pytest.raises(InputKindError, match="learns texts, not conversations"):
        sisa.lm_inputs([CONVERSATION])  # type: ignore[list-item]


def test_the_mask_follows_the_template_and_a_rewriting_one_is_named(tiny_lm: str) -> None:
    """SmolLM2's template writes a default system message before a conversation that opens with
    anything else: still a prefix of what follows. One that rewrites an earlier turn is not."""
    from sisa.training.causal_lm import format_chat

    tok = load_tokenizer(tiny_lm)
    tok.chat_template = CHATML.replace(
        "{% for message in messages %}", "{% for message in messages %}{% if loop.first and "
        "message['role'] != 'system' %}<|im_start|>system\nbe kind<|im_end|>\n{% endif %}")
    for messages in (CONVERSATION[1:], CONVERSATION[2:]):  # user first; the assistant first
        text, spans = format_chat(tok, messages, tiny_lm)
        assert text.startswith("<|im_start|>system\nbe kind")
        assert [text[a:b] for a, b in spans] == [f"{m['content']}<|im_end|>" for m in messages
                                                 if m["role"] == "assistant"]
    tok.chat_template = CHATML.replace("{{ message['content'] }}", "{% if loop.last %}"
                                       "{{ message['content'] | upper }}{% else %}"
                                       "{{ message['content'] }}{% endif %}")
    with pytest.raises(RecordError, match="does not write the conversation's first turns as a prefix"):
        format_chat(tok, CONVERSATION, tiny_lm)
