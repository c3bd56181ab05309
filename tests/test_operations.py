"""Deletions that survive real operations: every checkpoint verified where it is loaded (served or
resumed from), no symbolic link followed, a backup restore that cannot resurrect a deleted record
(with a witness kept outside the store), a key kept outside, damage that blocks only its own
shard, and `recover` / `repair` healing what the audit reports, back to a passing audit and to
weights bit-identical to a scratch training."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sqlite3
from contextlib import closing
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from sisa import DamagedStoreError, Sisa, StoreKeyError, WitnessError
from sisa.cli import app
from sisa.config import StoreConfig
from sisa.errors import RecordError
from sisa.testing import SPEC, make_rows, small_config, store_snapshot
from sisa.testing.tamper import (
    checkpoint,
    edit_manifest,
    flip_middle,
    ledger_key,
    link_out,
    reregister,
    set_lr,
    sql,
    substitute_weights,
)

from .conftest import copy_store, live_shas

copy = copy_store


def cli(*argv: str) -> Any:
    return CliRunner().invoke(app, list(argv))


def scratch(rows: list[dict[str, Any]], gone: set[str], where: Path) -> dict[int, str]:
    """Live weights' sha256 of a store trained from scratch without `gone`."""
    with Sisa.train(where, [r for r in rows if r["id"] not in gone], small_config(), SPEC) as sisa:
        return live_shas(sisa)


def healed(store: Path, rows: list[dict[str, Any]], gone: set[str], tmp_path: Path,
           **store_config: Any) -> None:
    """The audit passes, nothing is pending, the records of `gone` are deleted, and every live
    shard is bit-identical to a scratch training without them."""
    config = StoreConfig(**store_config)
    with Sisa.open(store, recover=False, read_only=True, store_config=config) as sisa:
        report = sisa.audit()
        assert report.ok, report.violations
        assert sisa.pending() == []
        assert all(r.deleted_at is not None for r in sisa.records(sorted(gone)).values())
        assert live_shas(sisa) == scratch(rows, gone, tmp_path / "scratch")


def problems(store: Path, *flags: str) -> str:
    """The audit's exit status must be 1: what it says (lower case, the store's path out)."""
    result = cli("audit", "--store", str(store), "--json", *flags)
    assert result.exit_code == 1, result.output
    assert "traceback" not in result.output.lower()
    return result.output.replace(str(store), "STORE").lower()


# -- verified loads --------------------------------------------------------------------------------


def test_a_substituted_pre_deletion_checkpoint_is_never_served_nor_built_on(tmp_path, base):
    """An operator copies the weights from before a deletion over the live ones and updates
    their sha256 in the database (no key): the seal fails, so status flags the shard, the
    ensemble leaves it out, a writer builds on nothing of it, and repair rebuilds it."""
    store = copy(base.root, tmp_path)
    victim = base.first[0, 1]
    old = (store / checkpoint(store, 0).path / "weights.safetensors").read_bytes()
    with Sisa.open(store) as sisa:
        sisa.forget([victim])
    substitute_weights(store, 0, old)
    status = json.loads(cli("status", "--store", str(store), "--json").stdout)
    assert 0 not in status["clean_shards"] and "seal" in status["shards"][0]["problem"]
    with Sisa.open(store, recover=False, read_only=True) as sisa:
        assert 0 not in sisa.ensemble().shards and "seal" in sisa.unservable()[0]
    assert "seal" in problems(store)
    other = base.first[1, 2]
    result = cli("forget", "--store", str(store), other, "--no-progress")
    assert result.exit_code == 1 and "shard 0" in result.stderr and "applied" in result.stderr
    assert "sisa repair" in result.stderr
    with Sisa.open(store, recover=False, read_only=True) as sisa:  # the other deletion was applied
        assert sisa.pending() == [] and sisa.records([other])[other].deleted_at is not None
    assert cli("repair", "--store", str(store), "--no-progress").exit_code == 0
    healed(store, base.rows, {victim, other}, tmp_path)


def test_a_damaged_parent_blocks_only_its_own_shard(tmp_path, base):
    """A retrain never resumes from a checkpoint that fails its verification: that shard's
    deletion waits (excluded from serving), another shard's deletion is applied."""
    store = copy(base.root, tmp_path)
    flip_middle(store / checkpoint(store, 1, 0).path / "weights.safetensors")
    blocked, fine = base.first[1, 1], base.first[2, 0]
    with Sisa.open(store, recover=False) as sisa:
        sisa.request_deletion([blocked])
        sisa.request_deletion([fine])
        with pytest.raises(DamagedStoreError, match="shard 1") as info:
            sisa.apply_pending()
        assert list(info.value.blocked) == [1] and len(info.value.applied) == 1
        assert [p.shards for p in sisa.pending()] == [[1]]
        assert 1 not in sisa.servable() and "pending" in sisa.unservable()[1]
    assert cli("repair", "--store", str(store), "--no-progress").exit_code == 0
    healed(store, base.rows, {blocked, fine}, tmp_path)


def test_an_edited_record_blocks_only_its_shard(tmp_path, base):
    """A record whose label was edited by SQL fails its content digest: its shard is not retrained
    on it, and a deletion in another shard is applied all the same (the command names the
    damaged shard and what to do)."""
    store = copy(base.root, tmp_path)
    edited = base.first[1, 0]
    sql(store, "UPDATE records SET target = '2' WHERE id = ? AND target != '2'", [edited])
    sql(store, "UPDATE records SET target = '1' WHERE id = ? AND target = '2'", [edited])
    victim = base.first[2, 1]
    result = cli("forget", "--store", str(store), victim, "--no-progress")
    assert result.exit_code == 1 and "shard 1" in result.stderr and "content digest" in result.stderr
    assert "applied" in result.stderr
    with Sisa.open(store, recover=False, read_only=True) as sisa:
        assert sisa.records([victim])[victim].deleted_at is not None and sisa.pending() == []
    # As the hint says: forget the edited record (its content is not to be trusted), then the
    # store is whole again.
    assert cli("forget", "--store", str(store), edited, "--no-progress").exit_code == 0
    healed(store, base.rows, {victim, edited}, tmp_path)


def test_repair_from_scratch_rebuilds_a_shard_whose_parents_are_gone(tmp_path, base):
    store = copy(base.root, tmp_path)
    for slice_ in (0, 1):
        row = checkpoint(store, 1, slice_)
        sql(store, "DELETE FROM checkpoints WHERE key = ?", [row.key])
        shutil.rmtree(store / row.path)
    assert "parent checkpoint" in problems(store)
    result = cli("repair", "--store", str(store), "--shard", "1", "--from-scratch", "--json",
                 "--no-progress")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["samples"] > 0
    healed(store, base.rows, set(), tmp_path)


# -- no link followed ------------------------------------------------------------------------------

LINKS = {
    "live weights": lambda s: checkpoint(s, 2).path + "/weights.safetensors",
    "checkpoints directory": lambda s: "checkpoints",
    "deletion journal": lambda s: "deletions.journal",
    "a shard's directory": lambda s: "checkpoints/shard-001",
}


@pytest.mark.parametrize("what", list(LINKS))
def test_no_link_in_a_store_is_followed_and_repair_removes_it(tmp_path, base, what):
    store = copy(base.root, tmp_path)
    with Sisa.open(store) as sisa:
        sisa.forget([base.first[0, 0]])  # a journal with a line, a receipt
    relative = LINKS[what](store)
    outside = tmp_path / "outside" / Path(relative).name
    link_out(store, relative, outside)
    before = store_snapshot(outside.parent)
    assert "symbolic link" in problems(store)
    victim = base.first[0, 2]  # a shard the link is not in: a forget never removes it
    result = cli("forget", "--store", str(store), victim, "--no-progress")
    assert result.exit_code == 1 and "symbolic link" in result.stderr, result.output
    assert "traceback" not in result.output.lower()
    assert store_snapshot(outside.parent) == before  # nothing written through the link
    repaired = cli("repair", "--store", str(store), "--no-progress")
    assert repaired.exit_code == 0, repaired.output
    assert not any(p.is_symlink() for p in store.rglob("*"))
    assert store_snapshot(outside.parent) == before  # nor removed through it
    assert cli("forget", "--store", str(store), victim, "--no-progress").exit_code == 0
    healed(store, base.rows, {base.first[0, 0], victim}, tmp_path)


def test_a_linked_live_checkpoint_is_not_served(tmp_path, base):
    store = copy(base.root, tmp_path)
    link_out(store, checkpoint(store, 2).path + "/weights.safetensors", tmp_path / "elsewhere")
    with Sisa.open(store, recover=False, read_only=True) as sisa:
        assert 2 not in sisa.ensemble().shards and "symbolic link" in sisa.unservable()[2]
    status = json.loads(cli("status", "--store", str(store), "--json").stdout)
    assert 2 not in status["clean_shards"] and "symbolic link" in status["shards"][2]["problem"]


# -- backups ---------------------------------------------------------------------------------------


def test_a_restored_backup_cannot_resurrect_a_deletion_kept_by_a_witness(tmp_path):
    rows = make_rows(90)
    witness = tmp_path / "elsewhere" / "store.witness"
    witness.parent.mkdir()
    flags = ["--witness", str(witness)]
    store = tmp_path / "store"
    Sisa.train(store, rows, small_config(), SPEC, store_config=StoreConfig(witness=str(witness))).close()
    backup = copy(store, tmp_path, "backup")
    gone = {"r0003", *[r["id"] for r in rows if r["user"] == "u4"]}
    assert cli("forget", "--store", str(store), "r0003", "--no-progress", *flags).exit_code == 0
    assert cli("forget", "--store", str(store), "--group", "u4", "--no-progress", *flags).exit_code == 0
    shutil.rmtree(store)
    shutil.copytree(backup, store)  # the whole store directory, journal included
    said = problems(store, *flags)
    assert said.count("the database lacks it") == 2
    # The witness also comes from the environment or from the TOML config, as the key file does.
    from_env = CliRunner(env={"SISA_WITNESS": str(witness)}).invoke(
        app, ["audit", "--store", str(store), "--json"])
    assert from_env.exit_code == 1 and from_env.stdout.count("the database lacks it") == 2
    toml = tmp_path / "sisa.toml"
    toml.write_text(f"witness = {json.dumps(str(witness))}\n")
    from_toml = cli("--config", str(toml), "audit", "--store", str(store), "--json")
    assert from_toml.exit_code == 1 and from_toml.stdout.count("the database lacks it") == 2
    status = json.loads(cli("status", "--store", str(store), "--json", *flags).stdout)
    assert status["clean_shards"] == [] and len(status["pending_deletions"]) == 2
    refused = cli("predict", "--store", str(store), "--data", "x.csv", *flags)
    assert refused.exit_code != 0
    without = cli("forget", "--store", str(store), "r0004", "--no-progress")  # no witness given
    assert without.exit_code == 1 and "witness" in without.stderr
    assert cli("recover", "--store", str(store), "--no-progress", *flags).exit_code == 0
    healed(store, rows, gone, tmp_path, witness=str(witness))


def test_a_witness_of_another_store_or_inside_it_is_refused(tmp_path):
    rows = make_rows(60)
    one, two = tmp_path / "one", tmp_path / "two"
    witness = tmp_path / "one.witness"
    Sisa.train(one, rows, small_config(), SPEC, store_config=StoreConfig(witness=str(witness))).close()
    Sisa.train(two, rows, small_config(), SPEC).close()
    with pytest.raises(WitnessError, match="another store"):
        Sisa.open(two, store_config=StoreConfig(witness=str(witness)))
    with pytest.raises(WitnessError, match="inside the store"):
        Sisa.open(two, store_config=StoreConfig(witness=str(two / "w")))
    witness.rename(tmp_path / "moved")
    with pytest.raises(WitnessError, match="does not exist"):
        Sisa.open(one, store_config=StoreConfig(witness=str(witness)))


def test_without_a_witness_the_head_kept_elsewhere_tells_a_restore(tmp_path, base):
    store = copy(base.root, tmp_path)
    backup = copy(store, tmp_path, "backup")
    with Sisa.open(store) as sisa:
        sisa.forget([base.first[0, 0]])
        head = sisa.verify_receipts().head
        sisa.forget([base.first[1, 0]])
        assert sisa.verify_receipts(expect=head).ok  # the chain passes through it
    shutil.rmtree(store)
    shutil.copytree(backup, store)
    result = cli("receipts", "verify", "--store", str(store), "--expect", str(head), "--json")
    assert result.exit_code == 1 and "older backup" in result.stdout


# -- healing ---------------------------------------------------------------------------------------


def test_a_deleted_record_that_reappears_is_deleted_again(tmp_path, base):
    store = copy(base.root, tmp_path)
    victim = base.first[1, 1]
    row = next(r for r in base.rows if r["id"] == victim)
    with closing(sqlite3.connect(store / "store.db")) as conn:
        saved = conn.execute("SELECT * FROM records WHERE id = ?", [victim]).fetchone()
    with Sisa.open(store) as sisa:
        sisa.forget([victim])
    with closing(sqlite3.connect(store / "store.db")) as conn, conn:  # a row restored by hand
        conn.execute(f"INSERT INTO records VALUES ({','.join('?' * len(saved))})", saved)
    said = problems(store)
    assert "live again" in said and victim in said
    assert cli("recover", "--store", str(store), "--no-progress").exit_code == 0
    healed(store, base.rows, {row["id"]}, tmp_path)


@pytest.mark.parametrize("loss", ["removed", "cut to its first line", "last line cut short",
                                  "a line edited"])
def test_a_lost_or_damaged_journal_is_rebuilt(tmp_path, base, loss):
    store = copy(base.root, tmp_path)
    gone = {base.first[0, 0], base.first[1, 0], base.first[2, 0]}
    with Sisa.open(store) as sisa:
        for victim in sorted(gone):
            sisa.forget([victim])
    journal = store / "deletions.journal"
    lines = journal.read_bytes().split(b"\n")
    if loss == "removed":
        journal.unlink()
    elif loss == "cut to its first line":
        journal.write_bytes(lines[0] + b"\n")
    elif loss == "last line cut short":
        journal.write_bytes(b"\n".join(lines[:2]) + b"\n" + lines[2][:20])
    else:
        journal.write_bytes(b"\n".join([lines[0], lines[1].replace(b'"requested_at":"', b'"requested_at":"1'),
                                        *lines[2:]]))
    assert "journal" in problems(store)
    assert cli("recover", "--store", str(store), "--no-progress").exit_code == 0
    healed(store, base.rows, gone, tmp_path)


def test_an_applied_receipt_reset_to_pending_keeps_its_place_in_the_chain(tmp_path, base):
    store = copy(base.root, tmp_path)
    gone = {base.first[0, 1], base.first[2, 1]}
    with Sisa.open(store) as sisa:
        for victim in sorted(gone):
            sisa.forget([victim])
    sql(store, "UPDATE deletions SET status = 'pending', applied_at = NULL WHERE seq = 2")
    assert "pending" in problems(store)
    assert cli("recover", "--store", str(store), "--no-progress").exit_code == 0
    assert cli("receipts", "verify", "--store", str(store)).exit_code == 0
    healed(store, base.rows, gone, tmp_path)


# -- the key outside the store ---------------------------------------------------------------------


def test_a_store_whose_key_is_outside_cannot_be_resealed_by_a_database_writer(tmp_path):
    rows = make_rows(60)
    key_file = tmp_path / "keys" / "store.key"
    key_file.parent.mkdir()
    store = tmp_path / "store"
    flags = ["--key-file", str(key_file)]
    assert cli("train", "--store", str(store), "--data", str(_csv(tmp_path, rows)), *_train_flags(),
               *flags).exit_code == 0
    assert oct(key_file.stat().st_mode & 0o777) == "0o600"
    key = bytes.fromhex(key_file.read_text().strip())
    assert not any(key.hex().encode() in p.read_bytes() or key in p.read_bytes()
                   for p in store.rglob("*") if p.is_file())  # the key is in no file of the store
    assert cli("forget", "--store", str(store), "r0002", "--no-progress", *flags).exit_code == 0
    without = cli("status", "--store", str(store))
    assert without.exit_code == 1 and "key file" in without.stderr
    wrong = tmp_path / "keys" / "other.key"
    wrong.write_text(os.urandom(32).hex())
    wrong.chmod(0o600)
    assert "not the key" in cli("audit", "--store", str(store), "--key-file", str(wrong)).stderr
    loose = tmp_path / "keys" / "loose.key"
    loose.write_text(key.hex())
    loose.chmod(0o644)
    assert "others may read it" in cli("status", "--store", str(store), "--key-file", str(loose)).stderr
    # A database writer edits a manifest, registers its sha256 and re-seals the registration with
    # the only key it has: store.db holds none, so one of its own.
    with pytest.raises(IndexError):
        ledger_key(store)
    edit_manifest(store, set_lr)
    row = checkpoint(store, 0)
    manifest = hashlib.sha256((store / row.path / "manifest.json").read_bytes()).hexdigest()
    reregister(store, row, {**row.files, "manifest.json": manifest}, row.sha256, key=os.urandom(32))
    assert "seal" in problems(store, *flags)


def test_a_store_may_move_its_key_out(tmp_path, base):
    store = copy(base.root, tmp_path)
    key_file = tmp_path / "moved.key"
    assert cli("key", "move-out", "--store", str(store), "--key-file", str(key_file)).exit_code == 0
    key = bytes.fromhex(key_file.read_text().strip())
    assert key not in (store / "store.db").read_bytes()
    with pytest.raises(StoreKeyError, match="outside"):
        Sisa.open(store, recover=False, read_only=True).audit()
    with Sisa.open(store, store_config=StoreConfig(key_file=str(key_file))) as sisa:
        assert sisa.audit().ok and sisa.forget([base.first[0, 2]]).request_id
    # Whoever writes a key into store.db again is told apart by the key file.
    sql(store, "INSERT INTO meta (key, value) VALUES ('ledger_key', ?)", [json.dumps(os.urandom(32).hex())])
    assert "another key" in cli("status", "--store", str(store), "--key-file", str(key_file)).stderr


# -- small holes -----------------------------------------------------------------------------------


def test_ids_with_control_characters_are_refused_at_intake(tmp_path):
    rows = make_rows(30)
    rows[4]["id"] = "rec-\x00zz"
    rows[7]["user"] = "u\x1b[31m"
    with pytest.raises(RecordError) as info:
        Sisa.train(tmp_path / "s", rows, small_config(shards=2, slices=2), SPEC)
    text = str(info.value)
    assert "control characters" in text and "positions: 4" in text and "positions: 7" in text
    assert "\x00" not in text and "\x1b" not in text


def test_the_audit_warns_on_a_store_others_may_write(tmp_path, base):
    store = copy(base.root, tmp_path)
    store.chmod(0o777)
    with Sisa.open(store, recover=False, read_only=True) as sisa:
        report = sisa.audit()
    assert report.ok and any("may be written by others" in w and str(store) in w for w in report.warnings)


def _csv(tmp_path: Path, rows: list[dict[str, Any]]) -> Path:
    from sisa.testing import write_csv

    return write_csv(tmp_path / "train.csv", rows)


def _train_flags() -> list[str]:
    from sisa.testing import TRAIN_FLAGS

    return TRAIN_FLAGS
