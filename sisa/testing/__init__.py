"""The fault kit that tests and benchmarks share (as `numpy.testing` or hypothesis are shared):
small data sets and the config that trains them in seconds, snapshots of a store's files, the
check that no file derives from a deleted record, the CLI killed at a named step
(`sisa.testing.killer`), the tampering matrix (`sisa.testing.tamper`), and clients predicting
while deletions stream into a service (`sisa.testing.serving`).

Nothing in the library imports it; it uses the public API and, where it damages a store on
purpose, the store's files and SQLite directly, as an operator or an attacker would.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import random
import socket
from pathlib import Path
from typing import Any

from sisa.config import DataSpec, ExecutionConfig, MLPConfig, PartitionConfig, SisaConfig

FEATURES = ("f0", "f1", "f2", "f3")
SPEC = DataSpec(id_column="id", label_column="label", feature_columns=FEATURES, group_column="user")
TEXT_SPEC = DataSpec(id_column="id", label_column="label", text_column="text", group_column="user")
# The CLI flags that train `small_config()` on `make_rows()` written as CSV.
TRAIN_FLAGS = ["--id-column", "id", "--label-column", "label", "--feature-columns", ",".join(FEATURES),
               "--group-column", "user", "--shards", "3", "--slices", "3", "--epochs", "2",
               "--batch-size", "8", "--hidden-sizes", "8", "--seed", "11", "--no-progress"]
_WORDS = ["good", "great", "fun", "bad", "dull", "awful", "movie", "plot", "the", "a", "very", "not"]


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


def small_config(**partition: Any) -> SisaConfig:
    """An MLP config that trains `make_rows()` in about a second (S=3, R=3)."""
    return SisaConfig(
        partition=PartitionConfig(**{"shards": 3, "slices": 3, "seed": 11, **partition}),
        training=MLPConfig(epochs_per_slice=2, batch_size=8, hidden_sizes=(8,)),
        execution=ExecutionConfig(progress=False),
    )


def write_csv(path: Path, rows: list[dict[str, Any]]) -> Path:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def tiny_bert(directory: Path) -> str:
    """A BERT with random weights from a tiny config and a WordPiece tokenizer of the words of
    `make_text_rows` (no download), saved in `directory`; returns its path."""
    import torch
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizerFast  # type: ignore[attr-defined]

    letters = "abcdefghijklmnopqrstuvwxyz"
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *_WORDS, *letters,
             *[f"##{c}" for c in letters]]
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "vocab.txt").write_text("\n".join(vocab) + "\n")
    BertTokenizerFast(vocab_file=str(directory / "vocab.txt")).save_pretrained(directory)
    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(vocab), hidden_size=16, num_hidden_layers=2,
                        num_attention_heads=2, intermediate_size=32, max_position_embeddings=64)
    BertForSequenceClassification(config).save_pretrained(directory)
    return str(directory)


def free_port() -> int:
    """A TCP port free on loopback now (for a service started by a test or a benchmark)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def store_snapshot(root: Path) -> dict[str, str]:
    """sha256 of every file under `root` (and each directory, by name), to tell whether a command
    changed a store. store.db-shm is left out: SQLite's shared-memory index of the WAL, which any
    connection (a reader too) may rewrite; it holds no data. So is an empty store.db-wal: SQLite
    creates it when a connection opens the database and removes it when the last one closes.
    store.db and a non-empty store.db-wal are compared byte for byte."""
    if not root.exists():
        return {}

    def housekeeping(p: Path) -> bool:
        return p.name == "store.db-shm" or (p.name == "store.db-wal" and p.stat().st_size == 0)

    def state(p: Path) -> str:
        if p.is_symlink():  # never followed: what it points to, not what is there
            return f"symlink -> {os.readlink(p)}"
        return hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"

    return {str(p.relative_to(root)): state(p) for p in sorted(root.rglob("*"))
            if p.is_symlink() or not housekeeping(p)}


def derived_from(store: Path, ids: set[str]) -> list[str]:
    """Checkpoint directories on disk (registered or not) whose records, followed through the
    parents' manifests on disk, hold one of `ids`; one whose chain cannot be followed, one with
    no manifest or an unreadable one, and any temporary count too (nothing on disk proves them
    clean)."""
    top = store / "checkpoints"
    bad = [str(p) for p in store.rglob(".tmp-*")]
    if not top.is_dir():
        return sorted(bad)
    manifests: dict[str, tuple[Path, str | None, set[str]]] = {}
    for path in top.rglob("manifest.json"):
        try:
            m = json.loads(path.read_text())
            manifests[m["key"]] = (path.parent, m["parent"], set(m["records"]))
        except (ValueError, KeyError, TypeError):
            bad.append(str(path.parent))
    bad += [str(p) for p in top.glob("*/*") if not (p / "manifest.json").is_file()]
    for directory, parent, records in manifests.values():
        seen = set(records)
        while parent is not None and parent in manifests:
            _, parent, more = manifests[parent]
            seen |= more
        if parent is not None or seen & ids:
            bad.append(str(directory))
    return sorted(set(bad))


__all__ = ["FEATURES", "SPEC", "TEXT_SPEC", "TRAIN_FLAGS", "derived_from", "make_rows",
           "make_text_rows", "small_config", "store_snapshot", "tiny_bert", "write_csv"]
