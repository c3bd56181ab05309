"""Shard data kept in memory: equal to what the store holds, and never trusted after a change it
did not see; `repair` rebuilds damaged checkpoints exactly."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from typer.testing import CliRunner

from shard_store import ShardStore
from sisa import ConfigError, Sisa
from sisa.cli import app
from sisa.shard_data import ShardData, load_shard

from .conftest import SPEC


def assert_same_data(a: ShardData, b: ShardData) -> None:
    assert a.version == b.version
    assert a.members == b.members
    assert a.lines == b.lines
    assert np.array_equal(a.targets, b.targets)
    assert isinstance(a.inputs, np.ndarray) and isinstance(b.inputs, np.ndarray)
    assert a.inputs.dtype == b.inputs.dtype and np.array_equal(a.inputs, b.inputs)


def fresh(sisa: Sisa, shard: int) -> ShardData:
    """The shard as `load_shard` reads it from the store (a fresh handle on it)."""
    store = ShardStore.open(sisa.root, read_only=True)
    version = store.shard_versions([shard])[shard]
    return load_shard(store, shard, version, sisa.task, len(SPEC.feature_columns))


def test_data_kept_from_training_and_after_a_deletion_equals_the_store(tmp_path, rows, config):
    sisa = Sisa.train(tmp_path / "store", rows, config, SPEC)
    kept = sisa.shard_data(range(3))
    for shard in range(3):  # built from the records in memory, not read back
        assert_same_data(kept[shard], fresh(sisa, shard))
    victims = [r.id for r in sisa.live_records(1)][:3]
    sisa.forget(victims)
    after = sisa.shard_data([1])[1]  # updated in place, not re-read
    assert not {m.id for m in after.members} & set(victims)
    assert_same_data(after, fresh(sisa, 1))


def test_a_change_made_behind_its_back_is_seen(tmp_path, rows, config):
    sisa = Sisa.train(tmp_path / "store", rows, config, SPEC)
    assert all(s.current for s in sisa.status().shards)
    victim = next(sisa.live_records(0)).id
    kept = sisa.shard_data([0])[0]
    # Another process (or a hand-run SQL statement) tombstones a record: a trigger bumps the
    # shard's version, so shard 0 must retrain, and its data kept in memory is read again.
    other = ShardStore.open(sisa.root)
    with other.transaction() as conn:
        conn.execute("UPDATE records SET deleted_at = 'x' WHERE id = ?", [victim])
    other.close()
    assert [s.shard for s in sisa.status().shards if not s.current] == [0]
    assert sisa.shard_data([0])[0].version == kept.version + 1
    assert victim not in {m.id for m in sisa.schedules([0])[0].members}


def checkpoint_bytes(sisa: Sisa) -> dict[str, bytes]:
    return {c.key: (sisa.root / c.path / "weights.safetensors").read_bytes()
            for c in sisa.checkpoints()}


def test_repair_rebuilds_a_corrupt_checkpoint_bit_identically(tmp_path, rows, config):
    sisa = Sisa.train(tmp_path / "store", rows, config, SPEC)
    before = checkpoint_bytes(sisa)
    damaged = next(c for c in sisa.checkpoints(0) if c.slice == 1)
    path = sisa.root / damaged.path / "weights.safetensors"
    path.write_bytes(path.read_bytes()[:-4] + b"oops")
    assert not sisa.audit().ok

    report = sisa.repair()
    assert [(r.shard, r.start_slice) for r in report.retrained] == [(0, 1)]
    assert sisa.audit().ok
    assert checkpoint_bytes(sisa) == before

    scratch = sisa.repair([2], from_scratch=True)
    counts = sisa.schedules([2])[2].cumulative_counts()
    assert [(r.shard, r.start_slice) for r in scratch.retrained] == [(2, 0)]
    assert scratch.samples == sum(counts) * config.training.epochs_per_slice
    assert checkpoint_bytes(sisa) == before
    with pytest.raises(ConfigError, match=r"no shard\(s\) \[7\]"):
        sisa.repair([7])


def test_audit_flags_a_missing_parent_and_cli_repair_restores_it(tmp_path, rows, config):
    sisa = Sisa.train(tmp_path / "store", rows, config, SPEC)
    before = checkpoint_bytes(sisa)
    parent = next(c for c in sisa.checkpoints(1) if c.slice == 0)
    with ShardStore.open(sisa.root).transaction() as conn:
        conn.execute("DELETE FROM checkpoints WHERE key = ?", [parent.key])
    shutil.rmtree(sisa.root / parent.path)
    result = sisa.audit()
    assert any(v.shard == 1 and "parent checkpoint" in v.problem for v in result.violations)
    sisa.close()

    out = CliRunner().invoke(app, ["repair", "--store", str(tmp_path / "store"), "--shard", "1",
                                   "--json", "--no-progress"])
    assert out.exit_code == 0, out.output
    assert json.loads(out.stdout)["start_slices"] == {"1": 0}
    with Sisa.open(tmp_path / "store") as again:
        assert again.audit().ok
        assert checkpoint_bytes(again) == before
