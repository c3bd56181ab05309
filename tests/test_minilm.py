"""Integration with the packaged all-MiniLM-L6-v2 on a few hundred Rotten Tomatoes snippets."""

from __future__ import annotations

from sisa.api import Sisa, resolve_source
from sisa.config import ExecutionConfig, PartitionConfig, SisaConfig, TrainingConfig
from sisa.demo import _subsample


def _data(train_limit: int, test_limit: int):
    train, spec = resolve_source("builtin:rotten_tomatoes", None)
    test, _ = resolve_source("builtin:rotten_tomatoes:test", None)
    return _subsample(train, "id", train_limit), _subsample(test, "id", test_limit), spec


def test_head_on_minilm_learns_and_forgets_exactly(tmp_path):
    train, test, spec = _data(300, 100)
    config = SisaConfig(
        partition=PartitionConfig(shards=2, slices=2, seed=0),
        training=TrainingConfig(backend="head", epochs_per_slice=10, learning_rate=3e-3,
                                hidden_sizes=(), max_length=64),
        execution=ExecutionConfig(progress=False),
    )
    sisa, _ = Sisa.train(tmp_path / "store", train, config, spec)
    assert sisa.evaluate(test)["ensemble"]["accuracy"] > 0.6  # chance is 0.5
    victims = [train[7]["id"], train[123]["id"]]
    sisa.forget(victims)
    # The scratch store encodes every text itself: per-text encoding must give the same floats.
    scratch, _ = Sisa.train(tmp_path / "scratch", [r for r in train if r["id"] not in victims],
                            config, spec)
    assert {s: r.sha256 for s, r in sisa.store.live().items()} == \
        {s: r.sha256 for s, r in scratch.store.live().items()}


def test_lora_on_minilm_forgets_exactly(tmp_path):
    train, test, spec = _data(96, 64)
    config = SisaConfig(
        partition=PartitionConfig(shards=2, slices=2, seed=0),
        training=TrainingConfig(backend="lora", epochs_per_slice=1, batch_size=16,
                                learning_rate=2e-3, max_length=48),
        execution=ExecutionConfig(progress=False),
    )
    sisa, _ = Sisa.train(tmp_path / "store", train, config, spec)
    victim = train[10]["id"]
    sisa.forget([victim])
    scratch, _ = Sisa.train(tmp_path / "scratch", [r for r in train if r["id"] != victim], config,
                            spec)
    assert {s: r.sha256 for s, r in sisa.store.live().items()} == \
        {s: r.sha256 for s, r in scratch.store.live().items()}
    assert sisa.evaluate(test)["examples"] == 64
