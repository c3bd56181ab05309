"""The fault harness's corruption and tampering matrix: each case damages a fresh copy of a store,
then `sisa audit` and the command that meets the damage run in this process (typer's runner).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import random
import shutil
import sqlite3
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks.fault_kit import STORE, Fixture, killed_at, tree_digest, write_csv
from sisa import DataSpec, ExecutionConfig, LoraConfig, PartitionConfig, Sisa, SisaConfig

TEXT_SPEC = DataSpec(id_column="id", label_column="label", text_column="text", group_column="user")


def text_rows(n: int = 24) -> list[dict[str, Any]]:
    rng = random.Random(3)
    good, bad, other = ["good", "great", "fun"], ["bad", "dull", "awful"], ["movie", "plot", "the"]
    return [{"id": f"t{i:03d}", "label": "pos" if i % 2 else "neg", "user": f"u{i // 6}",
             "text": " ".join([rng.choice(good if i % 2 else bad), rng.choice(other),
                               rng.choice(good if i % 2 else bad)])} for i in range(n)]


@dataclass
class Case:
    name: str
    kind: str  # checkpoint files, adapter, records, database, WAL, tampering, receipts, strays
    damage: Callable[[Path], Any]  # damages a fresh copy of the store (returns what `use` needs)
    use: Callable[[Path, Any], list[str]]  # the command that meets the damage
    words: tuple[str, ...]  # one of them must be in the audit's report or the command's error
    store: str = "receipted"  # which fixture store it damages: receipted, lora, wal


def _db(store: Path, sql: str, params: tuple[Any, ...] | list[Any] = ()) -> list[Any]:
    with sqlite3.connect(store / "store.db") as conn:
        rows = conn.execute(sql, params).fetchall()
    conn.close()
    return rows


def _checkpoint(store: Path, shard: int, slice_: int | None = None) -> dict[str, Any]:
    """A registered checkpoint's row (the live one of `shard` when `slice_` is None)."""
    sql = ("SELECT c.key, c.path, c.files, c.shard, c.slice, c.parent, c.sha256, c.record_count "
           "FROM checkpoints c ")
    if slice_ is None:
        row = _db(store, sql + "JOIN shards s ON s.live_key = c.key WHERE s.shard = ?", [shard])[0]
    else:
        row = _db(store, sql + "WHERE c.shard = ? AND c.slice = ?", [shard, slice_])[0]
    names = ["key", "path", "files", "shard", "slice", "parent", "sha256", "record_count"]
    return dict(zip(names, row, strict=True))


def _flip(path: Path, offset: int, mask: int = 0x01) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= mask
    path.write_bytes(bytes(data))


def _truncate(path: Path, size: int) -> None:
    path.write_bytes(path.read_bytes()[:size])


def _edit_manifest(store: Path, edit: Callable[[dict[str, Any]], None], register: bool = False,
                   reseal: bool = False) -> None:
    """A valid JSON edit of shard 0's live manifest; with `register`, the new sha256 also goes
    into the database's registration; with `reseal`, the seal too, keyed with the ledger key
    read from the store's own meta table."""
    row = _checkpoint(store, 0)
    path = store / row["path"] / "manifest.json"
    manifest = json.loads(path.read_text())
    edit(manifest)
    data = json.dumps(manifest, sort_keys=True, separators=(",", ":")).encode()
    path.write_bytes(data)
    if register:
        files = {**json.loads(row["files"]), "manifest.json": hashlib.sha256(data).hexdigest()}
        _reregister(store, row, files, row["sha256"], reseal)


def _reregister(store: Path, row: dict[str, Any], files: dict[str, str], sha256: str,
                reseal: bool) -> None:
    _db(store, "UPDATE checkpoints SET files = ?, sha256 = ? WHERE key = ?",
        [json.dumps(files, sort_keys=True), sha256, row["key"]])
    if reseal:
        key = bytes.fromhex(json.loads(_db(store, "SELECT value FROM meta WHERE key = 'ledger_key'")[0][0]))
        text = json.dumps([row["key"], row["shard"], row["slice"], row["parent"], row["path"], sha256,
                           files, row["record_count"]], sort_keys=True, separators=(",", ":"))
        seal = hmac.new(key, f"seal\0{text}".encode(), hashlib.sha256).hexdigest()
        _db(store, "UPDATE checkpoints SET seal = ? WHERE key = ?", [seal, row["key"]])


def _swap_weights(store: Path) -> None:
    """Shard 0's live weights replaced by shard 1's, registration updated to match."""
    mine, other = _checkpoint(store, 0), _checkpoint(store, 1)
    data = (store / other["path"] / "weights.safetensors").read_bytes()
    (store / mine["path"] / "weights.safetensors").write_bytes(data)
    digest = hashlib.sha256(data).hexdigest()
    _reregister(store, mine, {**json.loads(mine["files"]), "weights.safetensors": digest}, digest, False)


def _set_lr(m: dict[str, Any]) -> None:
    m["state"]["optimizer"]["param_groups"][0]["lr"] = 0.5


def _empty_records(m: dict[str, Any]) -> None:
    m["records"] = []


def _page_offset(store: Path, table: str) -> int:
    """The byte offset of a table's (or index's) root b-tree page in store.db."""
    size = _db(store, "PRAGMA page_size")[0][0]
    root = _db(store, "SELECT rootpage FROM sqlite_master WHERE name = ?", [table])[0][0]
    return (root - 1) * size


def _bit_rot(store: Path, column: str) -> str:
    """Flip one byte of a live record's stored `features` blob or `text`, in the database file
    (as a failing disk would: no trigger fires, no page check notices); returns the record's id."""
    data = (store / "store.db").read_bytes()
    for rid, value in _db(store, f"SELECT id, {column} FROM records WHERE deleted_at IS NULL "
                                 f"AND {column} IS NOT NULL ORDER BY id"):
        raw = value if isinstance(value, bytes) else value.encode()
        if len(raw) >= 8 and data.count(raw) == 1:  # a value found once is this record's
            _flip(store / "store.db", data.find(raw) + len(raw) // 2,
                  0x01 if column == "features" else 0x02)
            return str(rid)
    raise RuntimeError(f"no record's {column} is found exactly once in the database file")


def _sql_flip(store: Path) -> str:
    """Flip one byte of a live record's `features` by an SQL UPDATE (its trigger bumps the shard's
    version, as any edit through SQLite does); returns the record's id."""
    rid, value = _db(store, "SELECT id, features FROM records WHERE deleted_at IS NULL "
                            "ORDER BY id LIMIT 1 OFFSET 5")[0]
    flipped = bytearray(value)
    flipped[3] ^= 0x01
    _db(store, "UPDATE records SET features = ? WHERE id = ?", [bytes(flipped), rid])
    return str(rid)


def _flip_registered_digest(store: Path) -> None:
    """One hex digit of the weights sha256 that shard 0's live checkpoint registers, changed in
    the database file (in its `files` column: the digest also appears in receipts)."""
    row = _checkpoint(store, 0)
    files = json.loads(row["files"])
    text = row["files"].encode()  # as stored
    data = bytearray((store / "store.db").read_bytes())
    if data.count(text) != 1:
        raise RuntimeError("the checkpoint's files column is not found once in the database file")
    at = data.find(text) + text.find(files["weights.safetensors"].encode()) + 10
    data[at] = ord("0") if data[at] != ord("0") else ord("1")
    (store / "store.db").write_bytes(bytes(data))


def _wal_frame(store: Path) -> int:
    """The size of one WAL frame: a 24-byte header and a page (the WAL header's bytes 8..12)."""
    return 24 + int.from_bytes((store / "store.db-wal").read_bytes()[8:12], "big")


def _plant(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("r0006,0,u0,1.0,2.0,3.0,4.0\n")  # a copy of a record, say


def cases(fx: Fixture) -> list[Case]:
    """The matrix. `use` names the command that meets the damage in ordinary work."""
    predict = lambda s, _: ["predict", "--store", str(s), "--data", str(fx.train_csv), "--json"]  # noqa: E731
    lora_predict = lambda s, _: ["predict", "--store", str(s), "--data", str(fx.work / "text.csv"),  # noqa: E731
                              "--json"]
    status = lambda s, _: ["status", "--store", str(s), "--json"]  # noqa: E731
    verify = lambda s, _: ["receipts", "verify", "--store", str(s), "--json"]  # noqa: E731
    recover = lambda s, _: ["recover", "--store", str(s), "--no-progress"]  # noqa: E731

    def forget_in(shard: int, slice_: int) -> Callable[[Path, Any], list[str]]:
        """Forget a live record of (shard, slice): its retrain resumes from the slice before."""
        def argv(s: Path, _: Any) -> list[str]:
            rid = _db(s, "SELECT id FROM records WHERE deleted_at IS NULL AND shard = ? AND slice = ? "
                         "ORDER BY id DESC LIMIT 1", [shard, slice_])[0][0]
            return ["forget", "--store", str(s), rid, "--no-progress"]
        return argv

    def same_shard_as_rotten(s: Path, rotten: str) -> list[str]:
        """Forget another record of the damaged record's shard (its retrain reads the shard)."""
        shard = _db(s, "SELECT shard FROM records WHERE id = ?", [rotten])[0][0]
        rid = _db(s, "SELECT id FROM records WHERE deleted_at IS NULL AND shard = ? AND id != ? "
                     "ORDER BY id DESC LIMIT 1", [shard, rotten])[0][0]
        return ["forget", "--store", str(s), rid, "--no-progress"]

    def live_file(name: str, shard: int = 0) -> Callable[[Path], Path]:
        return lambda s: s / _checkpoint(s, shard)["path"] / name

    weights, manifest = live_file("weights.safetensors"), live_file("manifest.json")
    adapter = live_file("adapter/adapter_model.safetensors")
    file_words = ("corrupt", "missing", "sha256")
    db_words = ("damaged", "malformed", "not a readable")
    wal_words = ("pending", "damaged", "wal", "lost")
    return [
        Case("weights: byte flipped (live checkpoint)", "checkpoint files",
             lambda s: _flip(weights(s), weights(s).stat().st_size // 2), predict, file_words),
        Case("weights: truncated to half (live checkpoint)", "checkpoint files",
             lambda s: _truncate(weights(s), weights(s).stat().st_size // 2), predict, file_words),
        Case("weights: deleted (slice 0 checkpoint)", "checkpoint files",
             lambda s: (s / _checkpoint(s, 1, 0)["path"] / "weights.safetensors").unlink(),
             forget_in(1, 1), file_words),
        Case("manifest: deleted (live checkpoint)", "checkpoint files",
             lambda s: manifest(s).unlink(), predict, file_words),
        Case("manifest: byte flipped (slice 1 checkpoint)", "checkpoint files",
             lambda s: _flip(s / _checkpoint(s, 2, 1)["path"] / "manifest.json", 40),
             forget_in(2, 2), file_words),
        Case("checkpoint directory deleted (slice 1)", "checkpoint files",
             lambda s: shutil.rmtree(s / _checkpoint(s, 0, 1)["path"]), forget_in(0, 2), file_words),
        Case("adapter weights: byte flipped (lora, live checkpoint)", "adapter",
             lambda s: _flip(adapter(s), adapter(s).stat().st_size // 2), lora_predict, file_words,
             store="lora"),
        Case("adapter config: deleted (lora, live checkpoint)", "adapter",
             lambda s: live_file("adapter/adapter_config.json")(s).unlink(), lora_predict,
             file_words, store="lora"),
        Case("record features: byte flipped by an SQL UPDATE", "records", _sql_flip,
             same_shard_as_rotten, ("content digest",)),
        Case("record features: bit rot in the database file", "records",
             lambda s: _bit_rot(s, "features"), same_shard_as_rotten, ("content digest",)),
        Case("record text: bit rot in the database file (lora)", "records",
             lambda s: _bit_rot(s, "text"), same_shard_as_rotten, ("content digest",), store="lora"),
        Case("database page: records root page header flipped", "database",
             lambda s: _flip(s / "store.db", _page_offset(s, "records"), 0xFF), status, db_words),
        Case("database page: an index page zeroed", "database",
             lambda s: _zero_page(s, "records_placement"), status, db_words),
        Case("database file: last page cut off", "database",
             lambda s: _truncate(s / "store.db", (s / "store.db").stat().st_size - 4096), status,
             db_words),
        Case("database page: a registered sha256 digit changed", "database",
             _flip_registered_digest, predict, ("seal", "sha256", "corrupt")),
        Case("WAL: last frame cut, after an acknowledged deletion", "WAL",
             lambda s: _truncate(s / "store.db-wal", (s / "store.db-wal").stat().st_size - _wal_frame(s)),
             status, wal_words, store="wal"),
        Case("WAL: byte flipped in the last frame, after an acknowledged deletion", "WAL",
             lambda s: _flip(s / "store.db-wal", (s / "store.db-wal").stat().st_size - 100),
             status, wal_words, store="wal"),
        Case("WAL: deleted, after an acknowledged deletion", "WAL",
             lambda s: (s / "store.db-wal").unlink(), status, wal_words, store="wal"),
        Case("manifest: optimizer lr edited (valid JSON)", "tampering",
             lambda s: _edit_manifest(s, _set_lr), predict, file_words),
        Case("manifest: records list emptied (valid JSON)", "tampering",
             lambda s: _edit_manifest(s, _empty_records), predict, file_words),
        Case("manifest: lr edited, its sha256 updated in the database", "tampering",
             lambda s: _edit_manifest(s, _set_lr, register=True), predict, ("seal",)),
        Case("manifest: records emptied, its sha256 updated in the database", "tampering",
             lambda s: _edit_manifest(s, _empty_records, register=True), predict, ("seal",)),
        Case("weights: swapped for another shard's, sha256 updated in the database", "tampering",
             _swap_weights, predict, ("seal",)),
        Case("manifest: lr edited, database updated and re-sealed with the key in store.db",
             "tampering", lambda s: _edit_manifest(s, _set_lr, register=True, reseal=True), predict,
             ("seal",)),
        Case("receipt: JSON edited (valid JSON)", "receipts",
             lambda s: _edit_receipt(s), verify, ("receipt",)),
        Case("receipt: first row deleted", "receipts",
             lambda s: _db(s, "DELETE FROM deletions WHERE seq = 1"), verify, ("receipt",)),
        Case("receipt: last row deleted", "receipts",
             lambda s: _db(s, "DELETE FROM deletions WHERE seq = (SELECT MAX(seq) FROM deletions)"),
             verify, ("receipt", "ledger", "tombstone")),
        Case("receipt: sequence numbers swapped", "receipts",
             _swap_seq, verify,
             ("receipt",)),
        Case("stray file in the store directory", "strays",
             lambda s: _plant(s / "backup.csv"), recover, ("not part of the store",)),
        Case("stray file under checkpoints/", "strays",
             lambda s: _plant(s / "checkpoints" / "notes.csv"), recover, ("not registered",)),
        Case("stray file inside a registered checkpoint directory", "strays",
             lambda s: _plant(s / _checkpoint(s, 2)["path"] / "extra.csv"), predict,
             ("unrecorded", "not registered")),
        Case("stray temporary directory under checkpoints/shard-000", "strays",
             lambda s: _plant(s / "checkpoints" / "shard-000" / ".tmp-0123" / "weights.safetensors"),
             recover, ("not registered",)),
    ]


def _zero_page(store: Path, name: str) -> None:
    at = _page_offset(store, name)
    data = bytearray((store / "store.db").read_bytes())
    data[at:at + 4096] = bytes(4096)
    (store / "store.db").write_bytes(bytes(data))


def _swap_seq(store: Path) -> None:
    """Receipts 1 and 2 trade sequence numbers (in two steps: `seq` is unique)."""
    _db(store, "UPDATE deletions SET seq = -seq WHERE seq IN (1, 2)")
    _db(store, "UPDATE deletions SET seq = 3 + seq WHERE seq IN (-1, -2)")


def _edit_receipt(store: Path) -> None:
    receipt = json.loads(_db(store, "SELECT receipt FROM deletions WHERE seq = 1")[0][0])
    receipt["samples_retrained"] += 1
    _db(store, "UPDATE deletions SET receipt = ? WHERE seq = 1", [json.dumps(receipt, sort_keys=True)])


def _invoke(argv: list[str]) -> dict[str, Any]:
    """Run the CLI in this process (typer's runner): exit status, output, any traceback."""
    from typer.testing import CliRunner

    from sisa.cli import app

    result = CliRunner().invoke(app, argv)
    crashed = result.exception is not None and not isinstance(result.exception, SystemExit)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    return {"exit": result.exit_code, "stdout": result.stdout, "stderr": result.stderr,
            "error": next((line for line in lines if line.startswith("error:")), ""),
            "error_lines": sum(1 for line in lines if line.startswith("error:")),
            "traceback": crashed or "Traceback" in result.output}


def build_stores(fx: Fixture, with_lora: bool) -> dict[str, Path]:
    """The matrix's stores: `receipted` (two deletions applied), `wal` (a forget killed right
    after its acknowledgement committed, before the WAL was checkpointed: the acknowledgement is
    only in store.db-wal), `lora` (a tiny LoRA store, if asked)."""
    receipted = fx.work / "receipted"
    shutil.copytree(fx.base, receipted)
    with Sisa.open(receipted) as sisa:
        sisa.forget(["r0001"])
        sisa.forget_group("u3")
    wal = fx.work / "wal"
    shutil.copytree(receipted, wal)
    run = killed_at(f"{STORE}.truncate_wal:before:1", "forget", "--store", str(wal), "r0010",
                    "--no-progress")
    if run.outcome != "killed" or not (wal / "store.db-wal").stat().st_size:
        raise RuntimeError(f"could not leave an acknowledgement in the WAL: {run.stderr[-2000:]}")
    stores = {"receipted": receipted, "wal": wal}
    if with_lora:
        stores["lora"] = _lora_store(fx)
    return stores


def _lora_store(fx: Fixture) -> Path:
    """A tiny random BERT (no download) and a LoRA store on 24 short texts, S=2, R=2."""
    import torch
    import transformers

    transformers.utils.logging.disable_progress_bar()

    model = fx.work / "tiny-bert"
    model.mkdir()
    letters = "abcdefghijklmnopqrstuvwxyz"
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "good", "great", "fun", "bad", "dull",
             "awful", "movie", "plot", "the", *letters, *[f"##{c}" for c in letters]]
    (model / "vocab.txt").write_text("\n".join(vocab) + "\n")
    tokenizer = transformers.BertTokenizerFast  # type: ignore[attr-defined]
    tokenizer(vocab_file=str(model / "vocab.txt")).save_pretrained(model)
    torch.manual_seed(0)
    transformers.BertForSequenceClassification(transformers.BertConfig(
        vocab_size=len(vocab), hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=32, max_position_embeddings=64)).save_pretrained(model)
    rows = text_rows()
    write_csv(fx.work / "text.csv", rows)
    config = SisaConfig(partition=PartitionConfig(shards=2, slices=2, seed=5),
                        training=LoraConfig(model=str(model), epochs_per_slice=1, batch_size=8,
                                            learning_rate=1e-2, max_length=32, lora_r=2),
                        execution=ExecutionConfig(progress=False))
    store = fx.work / "lora"
    Sisa.train(store, rows, config, TEXT_SPEC).close()
    return store


def run_case(case: Case, source: Path, work: Path) -> dict[str, Any]:
    """Damage a fresh copy of `source` as the case says; then `sisa audit` and the command that
    meets the damage: did either name it, and did they leave the store as it was?"""
    try:
        return _run_case(case, source, work / "case")
    except Exception as exc:  # a harness surprise: the case counts as not detected
        return {"case": case.name, "kind": case.kind, "detected": False, "by_audit": False,
                "audit_exit": None, "command": "-", "command_exit": None, "traceback": False,
                "unchanged_by_audit": False, "unchanged_by_command": False,
                "error": f"harness error: {exc!r}"[:1000]}


def _run_case(case: Case, source: Path, store: Path) -> dict[str, Any]:
    shutil.rmtree(store, ignore_errors=True)
    shutil.copytree(source, store)
    context = case.damage(store)
    damaged = tree_digest(store)
    audit = _invoke(["audit", "--store", str(store), "--json"])
    after_audit = tree_digest(store)
    argv = case.use(store, context)
    use = _invoke(argv)
    after_use = tree_digest(store)
    try:
        report = json.loads(audit["stdout"]) if audit["stdout"].strip() else {}
    except ValueError:
        report = {}
    problems = [v["problem"] for v in report.get("violations", [])]
    said = " ".join([*problems, audit["error"]]).replace(str(store), "STORE").lower()
    by_audit = audit["exit"] == 1 and any(w.lower() in said for w in case.words)
    use_said = " ".join([use["error"], use["stdout"] if argv[:2] == ["receipts", "verify"] else ""])
    use_said = use_said.replace(str(store), "STORE")
    by_use = use["exit"] != 0 and use["error_lines"] <= 1 and not use["traceback"] and any(
        w.lower() in use_said.lower() for w in case.words)
    out: dict[str, Any] = {
        "case": case.name, "kind": case.kind, "detected": by_audit or by_use,
        "by_audit": by_audit, "audit_exit": audit["exit"],
        "audit_says": (problems[:2] or [audit["error"]])[:2],
        "command": " ".join(["sisa", *argv[:1], *([argv[1]] if argv[0] == "receipts" else [])]),
        "command_exit": use["exit"], "command_error": use["error"][:300], "by_command": by_use,
        "traceback": audit["traceback"] or use["traceback"],
        "unchanged_by_audit": damaged == after_audit, "unchanged_by_command": after_audit == after_use,
        "changed": sorted(k for k in set(damaged) | set(after_use)
                          if damaged.get(k) != after_use.get(k))[:5],
    }
    if case.store == "wal":  # lost = still live once a writer has opened the store
        recovered = _invoke(["recover", "--store", str(store), "--no-progress"])
        with Sisa.open(store, recover=False, read_only=True) as sisa:
            out["acknowledged_deletion_lost"] = (
                recovered["exit"] != 0
                or sisa.store.find_records(["r0010"])["r0010"].deleted_at is None)
    shutil.rmtree(store, ignore_errors=True)
    return out
