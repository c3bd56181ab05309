"""Shared fixtures and checks: a small synthetic numeric data set, tiny text data and a tiny random
BERT, a fast config, all on CPU; `assert_exact`, the one exactness check every test uses. The data
makers and store helpers are the fault kit's (`sisa.testing`), which the benchmarks share."""

from __future__ import annotations

import random
import shutil
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NamedTuple

import pytest
import torch
from safetensors.torch import load_file

from shard_store import ShardStore
from sisa import DataSpec, Sisa, SisaConfig
from sisa.testing import (  # noqa: F401 - re-exported for the tests
    FEATURES,
    SPEC,
    TEXT_SPEC,
    TRAIN_FLAGS,
    derived_from,
    make_rows,
    make_text_rows,
    small_config,
    store_snapshot,
    tiny_bert,
    write_csv,
)


@pytest.fixture
def rows() -> list[dict[str, Any]]:
    return make_rows()


@pytest.fixture
def config() -> SisaConfig:
    return small_config()


@pytest.fixture
def spec() -> DataSpec:
    return SPEC


def live_weights(sisa: Sisa) -> dict[int, dict[str, torch.Tensor]]:
    return {s: load_file(str(sisa.root / row.path / "weights.safetensors"))
            for s, row in sisa.live_checkpoints().items()}


def live_shas(sisa: Sisa) -> dict[int, str]:
    return {s: row.sha256 for s, row in sisa.live_checkpoints().items()}


def assert_exact(sisa: Sisa, rows: list[dict[str, Any]], config: SisaConfig, spec: DataSpec,
                 scratch_dir: Path) -> None:
    """Every live shard model of `sisa` is bit-identical to training from scratch on `rows`:
    equal tensors (`torch.equal`, name by name) and byte-identical weights files."""
    scratch = Sisa.train(scratch_dir, rows, config, spec)
    mine, theirs = live_weights(sisa), live_weights(scratch)
    assert mine.keys() == theirs.keys()
    for shard in mine:
        assert mine[shard].keys() == theirs[shard].keys()
        for name in mine[shard]:
            assert torch.equal(mine[shard][name], theirs[shard][name]), (shard, name)
    assert live_shas(sisa) == live_shas(scratch)
    scratch.close()


class Trained(NamedTuple):
    """A small trained store (90 records, S=3, R=3) that tests copy before they change it."""

    root: Path
    rows: list[dict[str, Any]]
    shas: dict[int, str]  # the live weights' sha256: a scratch training on `rows`
    first: dict[tuple[int, int], str]  # (shard, slice) -> the first record there


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Trained:
    root = tmp_path_factory.mktemp("base")
    rows = make_rows(90)
    with Sisa.train(root / "store", rows, small_config(), SPEC) as sisa:
        first: dict[tuple[int, int], str] = {}
        for r in sisa.live_records():
            first.setdefault((r.shard, r.slice), r.id)
        return Trained(root / "store", rows, live_shas(sisa), first)


def copy_store(source: Path, tmp_path: Path, name: str = "store") -> Path:
    """A copy of a store (its links kept as links)."""
    shutil.copytree(source, tmp_path / name, symlinks=True)
    return tmp_path / name


@contextmanager
def writer_held(store_dir: Path) -> Iterator[None]:
    """Another handle on the store holds its writer lock (in a thread, as a process at work on a
    retrain would) until the block ends."""
    other = ShardStore.open(store_dir)
    held, release = threading.Event(), threading.Event()

    def hold() -> None:
        with other.writer():
            held.set()
            release.wait(timeout=120)

    holder = threading.Thread(target=hold)
    holder.start()
    assert held.wait(timeout=60)
    try:
        yield
    finally:
        release.set()
        holder.join()
        other.close()


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> str:
    """A BERT with random weights from a tiny config, with a WordPiece tokenizer: no download."""
    return tiny_bert(tmp_path_factory.mktemp("tiny-bert"))


@pytest.fixture
def text_rows() -> list[dict[str, Any]]:
    return make_text_rows()


@pytest.fixture(scope="session")
def tiny_lm(tmp_path_factory) -> str:
    """A two-layer Llama with random weights and a character-level tokenizer (digits are single
    tokens, as in SmolLM2's): no download."""
    import string

    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    root = tmp_path_factory.mktemp("tiny-llama")
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<unk>"]
    vocab = {t: i for i, t in enumerate(specials + list(string.printable[:95]))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                            unk_token="<unk>").save_pretrained(root)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=256, tie_word_embeddings=True, eos_token_id=2,
                         pad_token_id=0)
    LlamaForCausalLM(config).save_pretrained(root)
    return str(root)


def make_chat_rows(n: int = 48, users: int = 8) -> list[dict[str, Any]]:
    """Short chat turns: a prompt, a reply, and the user who wrote it."""
    rng = random.Random(5)
    words = ["hi", "ok", "sure", "tea", "cat", "sun", "go", "yes", "no", "fun"]
    rows = []
    for i in range(n):
        reply = " ".join(rng.choice(words) for _ in range(rng.randint(2, 5)))
        prompt = " ".join(rng.choice(words) for _ in range(rng.randint(1, 3)))
        rows.append({"id": f"m{i:03d}", "text": reply, "prompt": prompt if i % 4 else "",
                     "user": f"u{i % users}"})
    return rows


CHAT_SPEC = DataSpec(id_column="id", label_column=None, text_column="text", group_column="user",
                     prompt_column="prompt")
