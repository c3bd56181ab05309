"""shard_store and the checkpoint format: migrations, atomic checkpoint files, sha256 verification,
incomplete and pre-release stores, audit of corruption, a connection per thread."""

from __future__ import annotations

import hashlib
import hmac
import json
import sqlite3
import threading

import pytest

from shard_store import (
    CheckpointFileError,
    ShardStore,
    StoreExists,
    StoreIncomplete,
    StoreNotFound,
    StoreVersionError,
)
from shard_store import files as store_files
from shard_store.schema import SCHEMA_VERSION, keyed
from sisa import CheckpointError, NoServableShardError, Sisa, StoreError
from sisa.checkpoint import FORMAT, Manifest

from .conftest import SPEC


def new_store(path) -> ShardStore:
    return ShardStore.create(path, {"config": {}}, [], shards=2)


def test_new_store_is_migrated_and_in_wal_mode(tmp_path):
    store = new_store(tmp_path / "s")
    assert store.conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    assert store.conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert {"records", "checkpoints", "shards", "deletions", "meta", "embeddings"} <= \
        set(store.db.table_names())
    assert sorted(store.shards()) == [0, 1]
    with pytest.raises(StoreExists, match="already exists"):
        new_store(tmp_path / "s")
    (tmp_path / "locked").mkdir()  # a kill between taking the lock and writing the database
    (tmp_path / "locked" / "writer.lock").touch()
    assert sorted(new_store(tmp_path / "locked").shards()) == [0, 1]
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "notes.txt").write_text("mine")
    with pytest.raises(StoreExists, match="not empty"):
        new_store(tmp_path / "foreign")
    assert sorted(p.name for p in (tmp_path / "foreign").iterdir()) == ["notes.txt"]


def test_open_rejects_missing_newer_pre_release_and_garbage_stores(tmp_path):
    with pytest.raises(StoreNotFound, match="no store at"):
        ShardStore.open(tmp_path / "nothing")
    new_store(tmp_path / "new").conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    with pytest.raises(StoreVersionError, match="newer than this code reads"):
        ShardStore.open(tmp_path / "new")
    (tmp_path / "old").mkdir()
    with sqlite3.connect(tmp_path / "old" / "store.db") as conn:  # what a pre-release version left
        conn.execute("CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT)")
        conn.execute("PRAGMA user_version = 3")
    with pytest.raises(StoreVersionError, match="pre-release version"):
        ShardStore.open(tmp_path / "old")
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "store.db").write_bytes(b"not a database at all" * 100)
    with pytest.raises(StoreError, match="not a readable SQLite store"):
        Sisa.open(tmp_path / "junk")


def test_an_interrupted_creation_is_named_and_replaced(tmp_path, rows, config):
    root = tmp_path / "store"
    root.mkdir()
    with sqlite3.connect(root / "store.db") as conn:  # a kill after the schema, before the records
        from shard_store.schema import BASELINE, FIRST_VERSION, statements

        for statement in statements(BASELINE):
            conn.execute(statement)
        conn.execute(f"PRAGMA user_version = {FIRST_VERSION}")
    with pytest.raises(StoreIncomplete, match="incomplete"):
        ShardStore.open(root)
    with pytest.raises(StoreError, match="incomplete"):
        Sisa.open(root)
    sisa = Sisa.train(root, rows, config, SPEC)  # replaces it
    assert sisa.status().live_records == len(rows) and sisa.audit().ok


def test_checkpoint_files_round_trip_atomically(tmp_path):
    blobs = {"weights.safetensors": b"w" * 10, "manifest.json": b"{}", "adapter/config.json": b"{}"}
    digests = store_files.write_dir(tmp_path, "checkpoints/shard-000/slice-000-k", blobs)
    assert store_files.read_files(tmp_path, "checkpoints/shard-000/slice-000-k", digests,
                                  list(blobs)) == blobs
    assert not list((tmp_path / "checkpoints").glob(".tmp-*"))  # nothing half-written is left
    again = store_files.write_dir(tmp_path, "checkpoints/shard-000/slice-000-k", blobs)
    assert again == digests  # idempotent: the same content is kept
    with pytest.raises(CheckpointFileError, match="leaves its directory"):
        store_files.write_dir(tmp_path, "x", {"../escape": b""})


def test_corrupt_missing_and_extra_files_are_named(tmp_path):
    directory = tmp_path / "c"
    digests = store_files.write_dir(tmp_path, "c", {"weights.safetensors": b"abcd", "manifest.json": b"{}"})
    (directory / "weights.safetensors").write_bytes(b"abce")
    with pytest.raises(CheckpointFileError, match=r"weights\.safetensors.*is corrupt"):
        store_files.read_files(tmp_path, "c", digests, ["weights.safetensors"])
    (directory / "weights.safetensors").unlink()
    with pytest.raises(CheckpointFileError, match="is missing"):
        store_files.verify_dir(tmp_path, "c", digests)
    store_files.write_dir(tmp_path, "c", {"weights.safetensors": b"abcd", "manifest.json": b"{}"})
    (directory / "planted.bin").write_bytes(b"x")
    with pytest.raises(CheckpointFileError, match="unrecorded files"):
        store_files.verify_dir(tmp_path, "c", digests)


def test_malformed_manifests_are_named():
    with pytest.raises(CheckpointError, match="malformed"):
        Manifest.from_bytes(b"{not json", "m")
    with pytest.raises(CheckpointError, match="format 2"):
        Manifest.from_bytes(json.dumps({"format": 2}).encode(), "m")
    with pytest.raises(CheckpointError, match="missing fields"):
        Manifest.from_bytes(json.dumps({"format": FORMAT, "shard": 0}).encode(), "m")


def test_audit_and_serving_detect_a_corrupted_live_checkpoint(tmp_path, rows, config):
    sisa = Sisa.train(tmp_path / "store", rows, config, SPEC)
    assert sisa.audit().ok
    row = sisa.live_checkpoints()[1]
    weights = sisa.root / row.path / "weights.safetensors"
    weights.write_bytes(weights.read_bytes()[:-8] + b"12345678")
    result = sisa.audit()
    assert not result.ok
    assert any(v.shard == 1 and "corrupt" in v.problem and str(weights) in v.problem
               for v in result.violations)
    # Verified as it is loaded: the damaged shard sits out (as a pending one does), saying why,
    # and the others serve; asked for alone, nothing can serve.
    assert sisa.ensemble().shards == [0, 2]
    assert 1 not in sisa.servable() and "corrupt" in sisa.unservable()[1]
    with pytest.raises(NoServableShardError, match="failed its verification"):
        sisa.ensemble({1: row.sha256})


def test_audit_catches_an_edited_manifest_and_a_planted_file(tmp_path, rows, config):
    sisa = Sisa.train(tmp_path / "store", rows, config, SPEC)
    row = sisa.live_checkpoints()[0]
    path = sisa.root / row.path / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest["records"] = []  # hide the records this slice trained on
    path.write_text(json.dumps(manifest))
    (sisa.root / "checkpoints" / "shard-001" / "slice-009-leftover").mkdir()
    problems = [v.problem for v in sisa.audit().violations]
    assert any("manifest.json" in p and "corrupt" in p for p in problems)
    assert any("not registered" in p for p in problems)


def test_audit_flags_a_checkpoint_holding_a_deleted_record(tmp_path, rows, config):
    sisa = Sisa.train(tmp_path / "store", rows, config, SPEC)
    victim = rows[0]["id"]
    # Simulate a bug or tampering: the record is tombstoned, but no retrain happened.
    with ShardStore.open(sisa.root).transaction() as conn:
        conn.execute("UPDATE records SET deleted_at = 'x', id = ? WHERE id = ?",
                     [sisa.id_digest(victim), victim])
    result = sisa.audit()
    assert not result.ok
    assert any("deleted record" in v.problem for v in result.violations)
    assert any("does not match" in v.problem for v in result.violations)


def test_bad_input_leaves_no_store_behind(tmp_path, rows, config):
    rows[3]["id"] = rows[4]["id"]
    with pytest.raises(Exception, match="duplicate ids"):
        Sisa.train(tmp_path / "store", rows, config, SPEC)
    assert not (tmp_path / "store" / "store.db").exists()


def test_sqlite_is_the_only_metadata_and_json_manifests(tmp_path, rows, config):
    sisa = Sisa.train(tmp_path / "store", rows, config, SPEC)
    for c in sisa.checkpoints():
        files = sorted(p.name for p in (sisa.root / c.path).iterdir())
        assert files == ["manifest.json", "weights.safetensors"]
        assert sorted(c.files) == files
        manifest = json.loads((sisa.root / c.path / "manifest.json").read_text())
        assert manifest["key"] == c.key and manifest["shard"] == c.shard
        assert manifest["format"] == FORMAT and {"optimizer"} <= set(manifest["state"])
    con = sqlite3.connect(sisa.root / "store.db")
    assert con.execute("SELECT COUNT(*) FROM records").fetchone()[0] == len(rows)


def test_each_thread_gets_its_own_connection(tmp_path, rows, config):
    Sisa.train(tmp_path / "store", rows, config, SPEC).close()
    store = ShardStore.open(tmp_path / "store")
    seen: dict[str, object] = {}

    def read() -> None:
        seen["records"] = sum(c["live"] for c in store.record_counts().values())
        seen["conn"] = store.conn

    worker = threading.Thread(target=read)
    worker.start()
    worker.join()
    assert seen["records"] == len(rows)
    assert seen["conn"] is not store.conn


def test_no_embedding_of_a_deleted_input_is_cached_or_missed_by_the_audit(tmp_path, rows, config):
    sisa = Sisa.train(tmp_path / "store", rows, config, SPEC)
    victim = rows[0]["id"]
    digest = sisa.records([victim])[victim].input_digest
    sisa.forget([victim])
    store = ShardStore.open(sisa.root)
    # A writer that encoded the input before the deletion was acknowledged stores it afterwards:
    store.put_embeddings("enc", 2, {digest: b"\0" * 8, "not-a-record": b"\0" * 8})
    assert store.get_embeddings("enc", [digest, "not-a-record"]).keys() == {"not-a-record"}
    assert store.deleted_embeddings() == 0 and sisa.audit().ok
    with store.transaction() as conn:  # planted by hand
        conn.execute("INSERT INTO embeddings VALUES ('enc', ?, 2, ?)", [digest, b"\0" * 8])
    assert any("embedding" in v.problem for v in sisa.audit().violations)


def test_a_keyed_digest_is_the_hmac_of_its_domain_and_value() -> None:
    """`keyed` digests are HMAC-SHA256 of "domain\\0value", the same whatever came before."""
    for key in (b"k" * 32, b"another key"):
        for domain, value in (("id", "r1"), ("id", "r2"), ("seal", "é\0x"), ("group", "")):
            want = hmac.new(key, f"{domain}\0{value}".encode(), hashlib.sha256).hexdigest()
            assert keyed(key, domain, value) == want
