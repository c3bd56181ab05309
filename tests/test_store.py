"""shard_store: migrations, atomic checkpoints, sha256 verification, audit of corruption."""

from __future__ import annotations

import json
import sqlite3

import pytest

from shard_store.checkpoints import CheckpointPayload, read_checkpoint, write_checkpoint
from shard_store.schema import SCHEMA_VERSION
from shard_store.store import ShardStore
from sisa.api import Sisa
from sisa.errors import CheckpointError, StoreError

from .conftest import SPEC


def payload(key: str = "k" * 32) -> CheckpointPayload:
    import torch
    from safetensors.torch import save

    return CheckpointPayload(0, 1, key, save({"w": torch.arange(4.0)}),
                             {"shard": 0, "slice": 1, "key": key})


def test_new_store_is_migrated_and_in_wal_mode(tmp_path):
    store = ShardStore.create(tmp_path / "s")
    assert store.db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    assert store.db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert {"records", "checkpoints", "live", "deletions", "meta"} <= set(store.db.table_names())
    with pytest.raises(StoreError, match="already exists"):
        ShardStore.create(tmp_path / "s")


def test_open_rejects_missing_newer_and_garbage_stores(tmp_path):
    with pytest.raises(StoreError, match="no store at"):
        ShardStore.open(tmp_path / "nothing")
    store = ShardStore.create(tmp_path / "new")
    store.db.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    store.close()
    with pytest.raises(StoreError, match="newer than this sisa"):
        ShardStore.open(tmp_path / "new")
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "store.db").write_bytes(b"not a database at all" * 100)
    with pytest.raises(StoreError, match="not a readable SQLite store"):
        ShardStore.open(tmp_path / "junk")


def test_checkpoint_round_trip_and_atomic_layout(tmp_path):
    p = payload()
    relative, sha = write_checkpoint(tmp_path, p)
    back = read_checkpoint(tmp_path / relative, sha)
    assert back.weights == p.weights and back.manifest == p.manifest
    assert not list(tmp_path.glob(".tmp-*"))  # nothing half-written is left behind
    assert write_checkpoint(tmp_path, p) == (relative, sha)  # idempotent by key


def test_corrupt_weights_are_detected_and_named(tmp_path):
    relative, sha = write_checkpoint(tmp_path, payload())
    weights = tmp_path / relative / "weights.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"weights\.safetensors.*is corrupt"):
        read_checkpoint(tmp_path / relative, sha)


def test_malformed_manifest_and_missing_file(tmp_path):
    relative, sha = write_checkpoint(tmp_path, payload())
    (tmp_path / relative / "manifest.json").write_text("{not json")
    with pytest.raises(CheckpointError, match=r"manifest.*malformed"):
        read_checkpoint(tmp_path / relative, sha)
    (tmp_path / relative / "weights.safetensors").unlink()
    with pytest.raises(CheckpointError, match="is missing"):
        read_checkpoint(tmp_path / relative, sha)


def test_audit_and_serving_detect_a_corrupted_live_checkpoint(tmp_path, rows, config):
    sisa, _ = Sisa.train(tmp_path / "store", rows, config, SPEC)
    assert sisa.audit()["ok"]
    row = sisa.store.live()[1]
    weights = sisa.store.root / row.path / "weights.safetensors"
    weights.write_bytes(weights.read_bytes()[:-8] + b"12345678")
    result = sisa.audit()
    assert not result["ok"]
    assert any(v["shard"] == 1 and "corrupt" in v["problem"] and str(weights) in v["problem"]
               for v in result["violations"])
    with pytest.raises(CheckpointError, match="corrupt"):
        sisa.ensemble()


def test_audit_flags_a_checkpoint_holding_a_deleted_record(tmp_path, rows, config):
    sisa, _ = Sisa.train(tmp_path / "store", rows, config, SPEC)
    victim = rows[0]["id"]
    # Simulate a bug or tampering: the record is tombstoned, but no retrain happened.
    with sisa.store.db.atomic():
        sisa.store.db.execute("UPDATE records SET deleted_at = 'x' WHERE id = ?", [victim])
    result = sisa.audit()
    assert not result["ok"]
    assert any("deleted record" in v["problem"] for v in result["violations"])
    assert any("does not match" in v["problem"] for v in result["violations"])


def test_bad_input_leaves_no_store_behind(tmp_path, rows, config):
    rows[3]["id"] = rows[4]["id"]
    with pytest.raises(Exception, match="duplicate ids"):
        Sisa.train(tmp_path / "store", rows, config, SPEC)
    assert not (tmp_path / "store" / "store.db").exists()


def test_sqlite_is_the_only_metadata_and_json_manifests(tmp_path, rows, config):
    sisa, _ = Sisa.train(tmp_path / "store", rows, config, SPEC)
    for c in sisa.store.checkpoints():
        files = sorted(p.name for p in (sisa.store.root / c.path).iterdir())
        assert files == ["manifest.json", "weights.safetensors"]
        manifest = json.loads((sisa.store.root / c.path / "manifest.json").read_text())
        assert manifest["key"] == c.key and manifest["shard"] == c.shard
        assert {"optimizer"} <= set(manifest["state"])
    con = sqlite3.connect(sisa.store.root / "store.db")
    assert con.execute("SELECT COUNT(*) FROM records").fetchone()[0] == len(rows)
