"""Provable forgetting: nothing of a forgotten record stays readable in the store's files, the
store is private to its owner, readers never write, damage is one clear error, and every tampering
the audit relies on is caught (manifests, their registration, record content, the receipt chain)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import sqlite3
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from typer.testing import CliRunner

from shard_store import ShardStore, keyed
from sisa import HeadConfig, PartitionConfig, RecordCorruptError, Sisa, SisaConfig
from sisa.cli import app
from sisa.records import records_from_rows

from .conftest import SPEC, TEXT_SPEC, make_rows, make_text_rows, small_config, store_snapshot, write_csv

SECRET = "zqxjvwk"  # letters no other record has: its bytes anywhere in a file would be the record


def file_bytes(root: Path) -> dict[str, bytes]:
    """Every file under the store, by relative path. Left out: store.db-shm (SQLite's shared-memory
    index, rewritten by any reader) and an empty store.db-wal (no WAL content, same as none)."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and p.name != "store.db-shm"
            and not (p.name == "store.db-wal" and p.stat().st_size == 0)}


@contextmanager
def database(path: Path) -> Iterator[sqlite3.Connection]:
    """A plain SQLite connection, committed and closed at the end (an unclosed one, collected
    later, would remove the WAL file in the middle of a later snapshot)."""
    conn = sqlite3.connect(path)
    try:
        with conn:
            yield conn
    finally:
        conn.close()


def run_cli(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "sisa.cli", *argv], capture_output=True, text=True,
                          timeout=300, cwd=Path(__file__).resolve().parents[1])


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A small numeric store with two applied deletions (so there are receipts to tamper with)."""
    root = tmp_path_factory.mktemp("forgetting") / "store"
    rows = make_rows(90)
    with Sisa.train(root, rows, small_config(), SPEC) as sisa:
        sisa.forget([rows[4]["id"]])
        sisa.forget_group("u7")
    return root


@pytest.fixture
def store(tmp_path, trained) -> Path:
    shutil.copytree(trained, tmp_path / "store")
    return tmp_path / "store"


def test_nothing_of_a_forgotten_record_stays_in_any_file(tmp_path, tiny_model):
    rows = make_text_rows(40)
    victim = {"id": "victim-7f3a", "label": "pos", "text": f"good movie {SECRET} very fun",
              "user": "user-victim-c41d"}
    rows.append(victim)
    config = SisaConfig(partition=PartitionConfig(shards=2, slices=2, seed=5),
                        training=HeadConfig(model=tiny_model, epochs_per_slice=1, batch_size=8,
                                            hidden_sizes=(), max_length=32))
    sisa = Sisa.train(tmp_path / "store", rows, config, TEXT_SPEC)
    record = next(r for r in records_from_rows(rows, TEXT_SPEC) if r.id == victim["id"])
    encoder = sisa.encoder
    assert encoder is not None
    store = ShardStore.open(sisa.root)  # the test reads the store's own tables
    vector = store.get_embeddings(encoder.fingerprint, [record.input_digest])
    assert vector, "the victim's embedding is cached before the deletion"
    before = b"".join(file_bytes(sisa.root).values())
    assert SECRET.encode() in before and victim["id"].encode() in before  # the test can fail

    order_key = sisa.records([victim["id"]])[victim["id"]].order_key
    receipt = sisa.forget_group(victim["user"])
    assert receipt.record_ids == [victim["id"]]
    after = file_bytes(sisa.root)
    leftovers = {
        "text": SECRET.encode(), "id": victim["id"].encode(), "group": victim["user"].encode(),
        "content digest": record.digest.encode(), "input digest": record.input_digest.encode(),
        "embedding": next(iter(vector.values())),
        "order key": order_key.encode(),  # recomputable from a guessed id and the seed
    }
    assert store.get_embeddings(encoder.fingerprint, [record.input_digest]) == {}
    live_vectors = {r[0] for r in store.conn.execute("SELECT vector FROM embeddings")}
    if leftovers["embedding"] in live_vectors:  # a tiny random encoder maps texts alike
        del leftovers["embedding"]
    for what, needle in leftovers.items():
        found = [name for name, data in after.items() if needle in data]
        assert not found, f"the forgotten record's {what} is still in {found}"
    # What stays: the tombstone's keyed digest, which names the deletion in its receipt.
    assert receipt.record_digests == [keyed(store.key, "id", victim["id"])] == [sisa.id_digest(victim["id"])]
    assert sisa.verify_receipts().ok and sisa.audit().ok
    store.close()
    sisa.close()


def test_store_files_are_private_to_their_owner(store):
    for path in [store, *store.rglob("*")]:
        mode = path.stat().st_mode & 0o777
        assert mode & 0o077 == 0, f"{path} is readable by others ({oct(mode)})"


def _as_other_user(argv: list[str]) -> list[str]:
    """Run as `nobody` when we are root (root may write anything, so a read-only store means
    another user); as ourselves otherwise (the store is then made read-only for us)."""
    return ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", *argv]


def test_readers_work_on_a_store_they_cannot_write(tmp_path, trained):
    # Under the system temp dir, which every user may traverse (pytest's tmp_path is private).
    outer = Path(tempfile.mkdtemp(prefix="sisa-ro-"))
    request_cleanup = outer  # removed below, whatever happens
    try:
        _readers_work(outer, tmp_path, trained)
    finally:
        shutil.rmtree(request_cleanup, ignore_errors=True)


def _readers_work(outer: Path, tmp_path: Path, trained: Path) -> None:
    shared = outer / "shared"
    shutil.copytree(trained, shared)
    for name in ("store.db-wal", "store.db-shm", "writer.lock"):  # a cleanly closed store
        (shared / name).unlink(missing_ok=True)
    test_csv = write_csv(outer / "test.csv", make_rows(12, seed=3, prefix="q"))
    for path in [outer, test_csv, shared, *shared.rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o444)  # readable by all, writable by none
    is_root = os.geteuid() == 0
    if is_root and shutil.which("setpriv") is None:
        pytest.skip("running as root without setpriv: cannot act as a user who may not write")
    home = outer / "home"  # the other user's own home (caches of `datasets`)
    home.mkdir()
    home.chmod(0o777)
    before = store_snapshot(shared)
    python = [sys.executable, "-m", "sisa.cli"]
    for argv in (["status"], ["audit"], ["receipts", "verify"], ["predict", "--data", str(test_csv)],
                 ["evaluate", "--data", str(test_csv)]):
        command = [*python, argv[0], "--store", str(shared), *argv[1:], "--json"]
        if argv[0] == "receipts":
            command = [*python, "receipts", "verify", "--store", str(shared), "--json"]
        proc = subprocess.run(_as_other_user(command) if is_root else command, capture_output=True,
                              text=True, timeout=300, cwd=Path(__file__).resolve().parents[1],
                              env={**os.environ, "HOME": str(home), "HF_HOME": str(home / "hf")})
        assert proc.returncode == 0, f"{argv}: {proc.stderr[-1500:]}"
        json.loads(proc.stdout)
    assert store_snapshot(shared) == before
    assert sorted(p.name for p in shared.iterdir()) == ["checkpoints", "deletions.journal",
                                                        "store.db"]  # nothing new


def test_an_empty_store_db_is_named_and_left_empty(tmp_path):
    (tmp_path / "store").mkdir()
    (tmp_path / "store" / "store.db").write_bytes(b"")
    for command in ("status", "audit", "recover"):
        result = CliRunner().invoke(app, [command, "--store", str(tmp_path / "store")])
        assert result.exit_code == 1 and "incomplete" in result.stderr, result.output
        assert "Traceback" not in result.output
    assert (tmp_path / "store" / "store.db").stat().st_size == 0


def _flip(path: Path, offset: int, count: int = 64) -> None:
    data = bytearray(path.read_bytes())
    for i in range(offset, min(offset + count, len(data))):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def _page_offset(db: Path, table: str) -> int:
    with database(db) as conn:
        page_size = conn.execute("PRAGMA page_size").fetchone()[0]
        root = conn.execute("SELECT rootpage FROM sqlite_master WHERE name = ?", [table]).fetchone()[0]
    return (root - 1) * page_size


@pytest.mark.parametrize("where", ["header", "records page"])
def test_a_damaged_database_is_one_line_error_and_left_as_it_was(store, where):
    db = store / "store.db"
    _flip(db, 20 if where == "header" else _page_offset(db, "records"), 48)
    before = store_snapshot(store)
    for argv in (["status"], ["audit"], ["forget", "r0010"], ["receipts", "verify"]):
        command = argv[:1] + (["verify"] if argv[0] == "receipts" else []) + \
            ["--store", str(store)] + [a for a in argv[1:] if a != "verify"]
        proc = run_cli(*command)
        lines = [line for line in proc.stderr.splitlines() if line.strip()]
        if argv == ["status"] and where == "records page" and proc.returncode == 0:
            continue  # status counts from the indexes (schema 6): the table's pages are the audit's
        assert proc.returncode == 1, (argv, proc.stdout[-500:], proc.stderr[-1500:])
        assert "Traceback" not in proc.stderr and lines[0].startswith("error:"), proc.stderr
        assert "damaged" in lines[0] or "not a readable" in lines[0] or "malformed" in lines[0]
        assert len(lines) <= 2  # the error, and the hint
    assert store_snapshot(store) == before


def _manifest(store: Path) -> Path:
    with Sisa.open(store, recover=False, read_only=True) as sisa:
        row = sisa.live_checkpoints()[0]
    return store / row.path / "manifest.json"


def _edit_manifest(path: Path, edit) -> None:
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data, sort_keys=True, separators=(",", ":")))


def _set_lr(data: dict) -> None:
    for group in data["state"]["optimizer"]["param_groups"]:
        group["lr"] = group["lr"] * 10


def _empty_records(data: dict) -> None:
    data["records"] = []


@pytest.mark.parametrize("edit", [_set_lr, _empty_records], ids=["learning rate", "records emptied"])
@pytest.mark.parametrize("reregistered", [False, True], ids=["file only", "file and its registration"])
def test_valid_json_edits_of_a_manifest_are_caught(store, edit, reregistered):
    path = _manifest(store)
    _edit_manifest(path, edit)
    if reregistered:  # the tamperer updates the database too, without the ledger key
        sha = hashlib.sha256(path.read_bytes()).hexdigest()
        with database(store / "store.db") as conn:
            relative = str(path.parent.relative_to(store))
            files = json.loads(conn.execute("SELECT files FROM checkpoints WHERE path = ?",
                                            [relative]).fetchone()[0])
            files["manifest.json"] = sha
            conn.execute("UPDATE checkpoints SET files = ? WHERE path = ?",
                         [json.dumps(files, sort_keys=True), relative])
    with Sisa.open(store, recover=False, read_only=True) as sisa:
        report = sisa.audit()
    assert not report.ok
    problems = " | ".join(v.problem for v in report.violations)
    assert ("seal" in problems) if reregistered else ("corrupt" in problems), problems
    # And the next deletion does not resume from it: it names the damage instead.
    result = CliRunner().invoke(app, ["forget", "--store", str(store), "r0000", "r0001", "r0002",
                                      "--no-progress"])
    if result.exit_code == 0:  # no victim's shard resumed from the edited checkpoint
        with Sisa.open(store, recover=False, read_only=True) as sisa:
            assert not sisa.audit().ok  # the edited checkpoint is still reported
    else:
        assert "Traceback" not in result.output and result.stderr.startswith("error:")


def test_a_flipped_byte_in_a_records_content_is_caught_and_never_trained_on(store):
    with database(store / "store.db") as conn:
        record_id, shard, blob = conn.execute(
            "SELECT id, shard, features FROM records WHERE deleted_at IS NULL ORDER BY id").fetchone()
        flipped = bytearray(blob)
        flipped[3] ^= 0x01
        conn.execute("UPDATE records SET features = ? WHERE id = ?", [bytes(flipped), record_id])
    with Sisa.open(store, recover=False) as sisa:
        report = sisa.audit()
        assert not report.ok and any(record_id in v.problem for v in report.violations)
        before = {s: r.sha256 for s, r in sisa.live_checkpoints().items()}
        with pytest.raises(RecordCorruptError, match=record_id):
            sisa.repair([shard], from_scratch=True)
        assert {s: r.sha256 for s, r in sisa.live_checkpoints().items() if s != shard} == \
            {s: v for s, v in before.items() if s != shard}


def test_a_stray_file_in_the_store_is_reported(store):
    (store / "backup-of-records.csv").write_text("id,text\n")
    with Sisa.open(store, recover=False, read_only=True) as sisa:
        report = sisa.audit()
    assert not report.ok
    assert any("backup-of-records.csv" in (v.path or "") for v in report.violations)


def _receipt_edit(conn: sqlite3.Connection) -> None:
    row = conn.execute("SELECT request_id, receipt FROM deletions WHERE seq = 1").fetchone()
    receipt = json.loads(row[1])
    receipt["samples_retrained"] += 1
    conn.execute("UPDATE deletions SET receipt = ? WHERE request_id = ?", [json.dumps(receipt), row[0]])


def _receipt_removed(conn: sqlite3.Connection) -> None:
    conn.execute("DELETE FROM deletions WHERE seq = 1")


def _receipts_swapped(conn: sqlite3.Connection) -> None:
    conn.execute("UPDATE deletions SET seq = -seq")
    conn.execute("UPDATE deletions SET seq = 3 + seq WHERE seq < 0")


@pytest.mark.parametrize("tamper", [_receipt_edit, _receipt_removed, _receipts_swapped],
                         ids=["edited", "removed", "reordered"])
def test_the_receipt_chain_catches_tampering(store, tamper):
    ok = CliRunner().invoke(app, ["receipts", "verify", "--store", str(store), "--json"])
    assert ok.exit_code == 0 and json.loads(ok.stdout)["receipts"] == 2
    with database(store / "store.db") as conn:
        tamper(conn)
    result = CliRunner().invoke(app, ["receipts", "verify", "--store", str(store), "--json"])
    assert result.exit_code == 1, result.output
    report = json.loads(result.stdout)
    assert not report["ok"] and report["problems"]
    with Sisa.open(store, recover=False, read_only=True) as sisa:
        assert not sisa.audit().ok


def test_receipts_show_prints_one_keyed_receipt(store):
    result = CliRunner().invoke(app, ["receipts", "show", "--store", str(store), "2", "--json"])
    assert result.exit_code == 0, result.output
    receipt = json.loads(result.stdout)
    assert receipt["sequence"] == 2 and len(receipt["previous"]) == 64
    assert "record_ids" not in receipt and all(len(d) == 64 for d in receipt["record_digests"])
    assert set(receipt) >= {"checkpoints_changed", "checkpoints_unchanged", "config_digest",
                            "requested_at", "applied_at", "digest"}
    # Deleted ids appear in the receipt as keyed digests, never in clear.
    assert not any(r["user"] == "u7" and r["id"] in result.stdout for r in make_rows(90))
    missing = CliRunner().invoke(app, ["receipts", "show", "--store", str(store), "nope"])
    assert missing.exit_code == 1 and "no receipt 'nope'" in missing.stderr


def test_a_schema_4_store_is_migrated_with_keyed_tombstones(tmp_path):
    rows = make_rows(60)
    store = tmp_path / "store"
    with Sisa.train(store, rows, small_config(), SPEC) as sisa:
        victim = rows[5]["id"]
        sisa.forget([victim])
        key = ShardStore.open(store).key
    # Make it what schema 4 wrote: a tombstone in clear, no seal, no chain, no ledger key.
    with database(store / "store.db") as conn:
        conn.execute("UPDATE records SET id = ?, group_id = ? WHERE id = ?",
                     [victim, rows[5]["user"], keyed(key, "id", victim)])
        conn.execute("UPDATE deletions SET record_ids = ?, receipt = NULL", [json.dumps([victim])])
        conn.execute("DROP INDEX deletions_seq")
        for table, column in (("checkpoints", "seal"), ("deletions", "seq"),
                              ("deletions", "receipt_digest")):
            conn.execute(f"ALTER TABLE {table} DROP COLUMN {column}")
        conn.execute("DELETE FROM meta WHERE key IN ('ledger_key', 'journal_started')")
        conn.execute("PRAGMA user_version = 4")
    (store / "deletions.journal").unlink()  # schema 4 had none
    read_only = CliRunner().invoke(app, ["status", "--store", str(store)])
    assert read_only.exit_code == 1 and "schema version 4" in read_only.stderr
    with Sisa.open(store) as sisa:  # a writer migrates
        assert sisa.records([victim])[victim].deleted_at is not None
        assert ShardStore.open(store).conn.execute("SELECT COUNT(*) FROM records WHERE id = ?",
                                                   [victim]).fetchone()[0] == 0
        assert sisa.audit().ok, sisa.audit().violations
        assert sisa.forget([rows[6]["id"]]).sequence == 1  # the chain starts after the migration
        assert sisa.verify_receipts().ok
        assert len(ShardStore.open(store).journal()) == 2 and sisa.audit().ok  # from the ledger


def test_a_journal_line_cut_short_neither_halts_the_store_nor_swallows_the_next(store):
    journal = store / "deletions.journal"
    with journal.open("ab") as f:
        f.write(b'{"mac":"ab')  # a crash in the middle of an acknowledgement's journal write
    with Sisa.open(store, recover=False, read_only=True) as sisa:
        assert any("cut short" in v.problem for v in sisa.audit().violations)
    with Sisa.open(store) as sisa:
        sisa.forget(["r0020"])
        journal = ShardStore.open(store).journal()
        assert [e["request_id"] for e in journal][-1] == sisa.deletions()[-1].request_id
        assert sisa.audit().ok, sisa.audit().violations


def test_a_damaged_ledger_value_is_one_line(store):
    with database(store / "store.db") as conn:
        conn.execute("UPDATE deletions SET receipt = '{not json' WHERE seq = 1")
    for argv in (["receipts", "verify"], ["audit"]):
        result = CliRunner().invoke(app, [*argv, "--store", str(store)])
        assert result.exit_code == 1, (argv, result.output)
        assert "Traceback" not in result.output and "damaged" in result.stderr


def test_a_negative_zero_prior_is_not_mistaken_for_damage(tmp_path):
    spec = dataclasses.replace(SPEC, prior_column="prior")
    rows = [{**r, "prior": -0.0 if i % 2 else 0.25} for i, r in enumerate(make_rows(60))]
    with Sisa.train(tmp_path / "store", rows, small_config(), spec) as sisa:
        sisa.forget([rows[2]["id"], rows[40]["id"]])  # shards reloaded from the store, re-digested
        assert sisa.audit().ok


def test_a_store_directory_made_by_the_user_becomes_private(tmp_path):
    (tmp_path / "store").mkdir(mode=0o755)
    Sisa.train(tmp_path / "store", make_rows(30), small_config(shards=2, slices=2), SPEC).close()
    assert (tmp_path / "store").stat().st_mode & 0o077 == 0
