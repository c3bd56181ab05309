"""Shared fixtures and checks: a small synthetic numeric data set, tiny text data and a tiny random
BERT, a fast config, all on CPU; `assert_exact`, the one exactness check every test uses."""

from __future__ import annotations

import hashlib
import json
import random
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from sisa import DataSpec, MLPConfig, PartitionConfig, Sisa, SisaConfig

FEATURES = ("f0", "f1", "f2", "f3")
SPEC = DataSpec(id_column="id", label_column="label", feature_columns=FEATURES,
                group_column="user")


def make_rows(n: int = 150, seed: int = 7, prefix: str = "r") -> list[dict[str, Any]]:
    """Three linearly separable-ish classes; every record has a user id (10 records per user)."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        label = i % 3
        row: dict[str, Any] = {"id": f"{prefix}{i:04d}", "label": label, "user": f"u{i // 10}"}
        for j, name in enumerate(FEATURES):
            row[name] = rng.gauss(1.5 * label if j == label else 0.0, 1.0)
        rows.append(row)
    return rows


@pytest.fixture
def rows() -> list[dict[str, Any]]:
    return make_rows()


def small_config(**partition: Any) -> SisaConfig:
    return SisaConfig(
        partition=PartitionConfig(**{"shards": 3, "slices": 3, "seed": 11, **partition}),
        training=MLPConfig(epochs_per_slice=2, batch_size=8, hidden_sizes=(8,)),
    )


@pytest.fixture
def config() -> SisaConfig:
    return small_config()


@pytest.fixture
def spec() -> DataSpec:
    return SPEC


def write_csv(path: Path, rows: list[dict[str, Any]]) -> Path:
    import csv

    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def live_weights(sisa: Sisa) -> dict[int, dict[str, torch.Tensor]]:
    return {s: load_file(str(sisa.store.root / row.path / "weights.safetensors"))
            for s, row in sisa.store.live().items()}


def live_shas(sisa: Sisa) -> dict[int, str]:
    return {s: row.sha256 for s, row in sisa.store.live().items()}


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


@contextmanager
def writer_held(store_dir: Path) -> Iterator[None]:
    """Another handle on the store holds its writer lock (in a thread, as a process at work on a
    retrain would) until the block ends."""
    other = Sisa.open(store_dir, recover=False)
    held, release = threading.Event(), threading.Event()

    def hold() -> None:
        with other.store.writer():
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


TEXT_SPEC = DataSpec(id_column="id", label_column="label", text_column="text", group_column="user")
_WORDS = ["good", "great", "fun", "bad", "dull", "awful", "movie", "plot", "the", "a", "very", "not"]


def make_text_rows(n: int = 60, seed: int = 3, prefix: str = "t") -> list[dict[str, Any]]:
    """Short texts whose label follows their words (positive vs negative), for tiny models."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        label = i % 2
        mood = _WORDS[:3] if label else _WORDS[3:6]
        words = [rng.choice(mood), rng.choice(_WORDS[6:]), rng.choice(mood)]
        words += [rng.choice(_WORDS) for _ in range(rng.randint(0, 6))]  # varied lengths: padding
        rows.append({"id": f"{prefix}{i:03d}", "label": "pos" if label else "neg",
                     "text": " ".join(words), "user": f"u{i // 6}"})
    return rows


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> str:
    """A BERT with random weights from a tiny config, with a WordPiece tokenizer: no download."""
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizerFast

    root = tmp_path_factory.mktemp("tiny-bert")
    letters = "abcdefghijklmnopqrstuvwxyz"
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *_WORDS, *letters,
             *[f"##{c}" for c in letters]]
    (root / "vocab.txt").write_text("\n".join(vocab) + "\n")
    BertTokenizerFast(vocab_file=str(root / "vocab.txt")).save_pretrained(root)
    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(vocab), hidden_size=16, num_hidden_layers=2,
                        num_attention_heads=2, intermediate_size=32, max_position_embeddings=64)
    BertForSequenceClassification(config).save_pretrained(root)
    return str(root)


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


def derived_from(store: Path, ids: set[str]) -> list[str]:
    """Checkpoint directories on disk (registered or not) whose record set, followed through the
    parent chain of manifests on disk, holds one of `ids`; a directory whose chain cannot be
    followed counts too (nothing on disk proves it clean)."""
    manifests = {}
    for path in (store / "checkpoints").rglob("manifest.json"):
        m = json.loads(path.read_text())
        manifests[m["key"]] = (path.parent, m["parent"], set(m["records"]))
    bad = [str(p) for p in (store / "checkpoints").glob("*/*") if not (p / "manifest.json").is_file()]
    bad += [str(p) for p in store.rglob(".tmp-*")]  # a temporary anywhere in the store
    for directory, parent, records in manifests.values():
        seen = set(records)
        while parent is not None and parent in manifests:
            _, parent, more = manifests[parent]
            seen |= more
        if parent is not None or seen & ids:
            bad.append(str(directory))
    return sorted(bad)


def store_snapshot(root: Path) -> dict[str, str]:
    """sha256 of every file under `root` (and each directory, by name). store.db-shm is left out:
    it is SQLite's shared-memory index of the WAL, which any connection (a reader too) may rewrite
    when it opens the database; it holds no data. So is an empty store.db-wal: SQLite creates it
    when a connection opens the database and removes it when the last one closes; with no frames
    it holds nothing. store.db and a non-empty store.db-wal are compared byte for byte."""
    if not root.exists():
        return {}

    def housekeeping(p: Path) -> bool:
        return p.name == "store.db-shm" or (p.name == "store.db-wal" and p.stat().st_size == 0)

    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(root.rglob("*")) if not housekeeping(p)}
