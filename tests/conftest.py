"""Shared fixtures: a small synthetic numeric data set and a fast config, all on CPU."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import pytest

from sisa.config import DataSpec, PartitionConfig, SisaConfig, TrainingConfig

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


@pytest.fixture
def config() -> SisaConfig:
    return SisaConfig(
        partition=PartitionConfig(shards=3, slices=3, seed=11),
        training=TrainingConfig(epochs_per_slice=2, batch_size=8, hidden_sizes=(8,)),
    )


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
