"""Integration with the packaged all-MiniLM-L6-v2 on a few hundred Rotten Tomatoes snippets."""

from __future__ import annotations

from sisa import ExecutionConfig, HeadConfig, LoraConfig, PartitionConfig, Sisa, SisaConfig
from sisa.builtin import load_builtin, stable_subset

from .conftest import assert_exact


def rotten_tomatoes(train_limit: int, test_limit: int):
    train, spec = load_builtin("builtin:rotten_tomatoes")
    test, _ = load_builtin("builtin:rotten_tomatoes:test")
    return stable_subset(train, "id", train_limit), stable_subset(test, "id", test_limit), spec


def test_head_on_minilm_learns_and_forgets_exactly(tmp_path):
    train, test, spec = rotten_tomatoes(300, 100)
    config = SisaConfig(  # the head backend's own defaults: a logistic head, 10 epochs, lr 3e-3
        partition=PartitionConfig(shards=2, slices=2, seed=0),
        training=HeadConfig(max_length=64),
        execution=ExecutionConfig(progress=False),
    )
    sisa = Sisa.train(tmp_path / "store", train, config, spec)
    assert sisa.evaluate(test).ensemble.accuracy > 0.6  # chance is 0.5
    victims = [train[7]["id"], train[123]["id"]]
    sisa.forget(victims)
    # The scratch store encodes every text itself: per-text encoding must give the same floats.
    assert_exact(sisa, [r for r in train if r["id"] not in victims], config, spec, tmp_path / "scratch")


def test_lora_on_minilm_forgets_exactly(tmp_path):
    train, test, spec = rotten_tomatoes(96, 64)
    config = SisaConfig(
        partition=PartitionConfig(shards=2, slices=2, seed=0),
        training=LoraConfig(epochs_per_slice=1, max_length=48),
        execution=ExecutionConfig(progress=False),
    )
    sisa = Sisa.train(tmp_path / "store", train, config, spec)
    victim = train[10]["id"]
    sisa.forget([victim])
    assert_exact(sisa, [r for r in train if r["id"] != victim], config, spec, tmp_path / "scratch")
    assert sisa.evaluate(test).examples == 64
