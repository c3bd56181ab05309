"""Damage a store as a failing disk, a careless operator or an attacker would, and the matrix of
such cases (`DAMAGES`) that the tests and the fault harness both run: the audit must name each one.

Every helper works on a store directory's files and on its SQLite database directly (never
through sisa), on a copy made for the purpose.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import shutil
import sqlite3
from collections.abc import Callable
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

DB = "store.db"


def sql(store: Path, query: str, params: list[Any] | tuple[Any, ...] = ()) -> list[Any]:
    """Run one statement on the store's database (committed) and return its rows."""
    with closing(sqlite3.connect(store / DB)) as conn, conn:
        return conn.execute(query, params).fetchall()


@dataclass(frozen=True)
class Registered:
    """A checkpoint's row as the database holds it."""

    key: str
    path: str
    files: dict[str, str]
    files_text: str  # the `files` column as stored
    shard: int
    slice: int
    parent: str | None
    sha256: str
    record_count: int


def checkpoint(store: Path, shard: int, slice_: int | None = None) -> Registered:
    """A registered checkpoint (the live one of `shard` when `slice_` is None)."""
    columns = "c.key, c.path, c.files, c.shard, c.slice, c.parent, c.sha256, c.record_count"
    if slice_ is None:
        rows = sql(store, f"SELECT {columns} FROM checkpoints c JOIN shards s ON s.live_key = c.key "
                          "WHERE s.shard = ?", [shard])
    else:
        rows = sql(store, f"SELECT {columns} FROM checkpoints c WHERE c.shard = ? AND c.slice = ?",
                   [shard, slice_])
    key, path, files, shard_, slice__, parent, sha, count = rows[0]
    return Registered(key, path, json.loads(files), files, shard_, slice__, parent, sha, count)


def live_file(store: Path, name: str, shard: int = 0) -> Path:
    return store / checkpoint(store, shard).path / name


def flip(path: Path, offset: int, mask: int = 0x01) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= mask
    path.write_bytes(bytes(data))


def flip_middle(path: Path) -> None:
    flip(path, path.stat().st_size // 2)


def truncate(path: Path, size: int) -> None:
    path.write_bytes(path.read_bytes()[:size])


def cut_half(path: Path) -> None:
    truncate(path, path.stat().st_size // 2)


def bit_rot(store: Path, column: str) -> str:
    """Flip a byte of a live record's `features` blob or `text` in the database file (as a
    failing disk would: no trigger fires, no page check notices); returns the record's id."""
    data = (store / DB).read_bytes()
    for rid, value in sql(store, f"SELECT id, {column} FROM records WHERE deleted_at IS NULL AND "
                                 f"{column} IS NOT NULL ORDER BY id"):
        raw = value if isinstance(value, bytes) else value.encode()
        if len(raw) >= 8 and data.count(raw) == 1:  # a value found once is this record's
            flip(store / DB, data.find(raw) + len(raw) // 2, 0x01 if column == "features" else 0x02)
            return str(rid)
    raise RuntimeError(f"no record's {column} appears exactly once in the database file")


def sql_flip(store: Path) -> str:
    """Flip a byte of a live record's features by an SQL UPDATE (its trigger bumps the shard's
    version, as any edit through SQLite does); returns the record's id."""
    rid, value = sql(store, "SELECT id, features FROM records WHERE deleted_at IS NULL ORDER BY id "
                            "LIMIT 1 OFFSET 5")[0]
    sql(store, "UPDATE records SET features = ? WHERE id = ?", [bytes([value[0] ^ 1]) + value[1:], rid])
    return str(rid)


def page_offset(store: Path, name: str) -> int:
    """The byte offset of a table's (or index's) root b-tree page in store.db."""
    size = sql(store, "PRAGMA page_size")[0][0]
    return (sql(store, "SELECT rootpage FROM sqlite_master WHERE name = ?", [name])[0][0] - 1) * size


def zero_page(store: Path, name: str) -> None:
    at, data = page_offset(store, name), bytearray((store / DB).read_bytes())
    data[at:at + 4096] = bytes(4096)
    (store / DB).write_bytes(bytes(data))


def registered_digit(store: Path) -> None:
    """A hex digit of the weights sha256 in shard 0's live registration, changed in the file (in
    its `files` column: the digest also appears in receipts)."""
    row = checkpoint(store, 0)
    text = row.files_text.encode()
    data = bytearray((store / DB).read_bytes())
    if data.count(text) != 1:
        raise RuntimeError("the checkpoint's files column is not found once in the database file")
    at = data.find(text) + text.find(row.sha256.encode()) + 10
    data[at] = ord("0") if data[at] != ord("0") else ord("1")
    (store / DB).write_bytes(bytes(data))


def ledger_key(store: Path) -> bytes:
    """The store's ledger key, as whoever can read store.db can read it."""
    return bytes.fromhex(json.loads(sql(store, "SELECT value FROM meta WHERE key = 'ledger_key'")[0][0]))


def seal(key: bytes, row: Registered, files: dict[str, str], sha256: str) -> str:
    """A registration's seal, computed as the store computes it (a keyed digest)."""
    text = json.dumps([row.key, row.shard, row.slice, row.parent, row.path, sha256, files,
                       row.record_count], sort_keys=True, separators=(",", ":"))
    return hmac.new(key, f"seal\0{text}".encode(), hashlib.sha256).hexdigest()


def reregister(store: Path, row: Registered, files: dict[str, str], sha256: str,
               key: bytes | None = None) -> None:
    """Point a registration at other files; with `key`, re-seal it with that key."""
    sql(store, "UPDATE checkpoints SET files = ?, sha256 = ? WHERE key = ?",
        [json.dumps(files, sort_keys=True), sha256, row.key])
    if key is not None:
        sql(store, "UPDATE checkpoints SET seal = ? WHERE key = ?", [seal(key, row, files, sha256), row.key])


def edit_manifest(store: Path, edit: Callable[[dict[str, Any]], None], register: bool = False,
                  reseal: bool = False) -> None:
    """A valid JSON edit of shard 0's live manifest; `register`: its new sha256 written into the
    database too; `reseal`: the seal recomputed with the ledger key read from store.db."""
    row = checkpoint(store, 0)
    path = store / row.path / "manifest.json"
    manifest = json.loads(path.read_text())
    edit(manifest)
    path.write_bytes(json.dumps(manifest, sort_keys=True, separators=(",", ":")).encode())
    if register:
        files = {**row.files, "manifest.json": hashlib.sha256(path.read_bytes()).hexdigest()}
        reregister(store, row, files, row.sha256, ledger_key(store) if reseal else None)


def swap_weights(store: Path) -> None:
    """Shard 0's live weights replaced by shard 1's, with the registration updated to match."""
    mine, other = checkpoint(store, 0), checkpoint(store, 1)
    data = (store / other.path / "weights.safetensors").read_bytes()
    (store / mine.path / "weights.safetensors").write_bytes(data)
    digest = hashlib.sha256(data).hexdigest()
    reregister(store, mine, {**mine.files, "weights.safetensors": digest}, digest)


def set_lr(m: dict[str, Any]) -> None:
    m["state"]["optimizer"]["param_groups"][0]["lr"] = 0.5


def empty_records(m: dict[str, Any]) -> None:
    m["records"] = []


def edit_receipt(store: Path) -> None:
    receipt = json.loads(sql(store, "SELECT receipt FROM deletions WHERE seq = 1")[0][0])
    receipt["samples_retrained"] += 1
    sql(store, "UPDATE deletions SET receipt = ? WHERE seq = 1", [json.dumps(receipt, sort_keys=True)])


def swap_seq(store: Path) -> None:
    """Receipts 1 and 2 trade sequence numbers (in two steps: `seq` is unique)."""
    sql(store, "UPDATE deletions SET seq = -seq WHERE seq IN (1, 2)")
    sql(store, "UPDATE deletions SET seq = 3 + seq WHERE seq IN (-1, -2)")


def plant(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("r0006,0,u0,1.0,2.0,3.0,4.0\n")  # a copy of a record, say


def wal_frame(store: Path) -> int:
    """The size of one WAL frame: a 24-byte header and a page (the WAL header's bytes 8..12)."""
    return 24 + int.from_bytes((store / f"{DB}-wal").read_bytes()[8:12], "big")


# -- the matrix ------------------------------------------------------------------------------------

FILE_WORDS = ("corrupt", "missing", "sha256")
DB_WORDS = ("damaged", "malformed", "not a readable")
WAL_WORDS = ("pending", "damaged", "wal", "lost", "lacks")


@dataclass(frozen=True)
class Damage:
    """One way a store gets damaged, and the words one of which the audit must say of it."""

    name: str
    kind: str  # checkpoint files, adapter, records, database, WAL, tampering, receipts, strays
    damage: Callable[[Path], Any]  # damages a copy of the store; returns what a follow-up needs
    words: tuple[str, ...]
    # The store it damages: "receipted" (the small mlp store, two deletions applied), "lora"
    # (a tiny LoRA store) or "wal" (the receipted store with one more deletion acknowledged
    # whose transaction is only in store.db-wal).
    store: str = "receipted"
    gap: str = ""  # why nothing detects it yet (a known gap), or "" for a case that must be


def _wal_cut(s: Path) -> None:
    truncate(s / f"{DB}-wal", (s / f"{DB}-wal").stat().st_size - wal_frame(s))


DAMAGES: list[Damage] = [
    Damage("weights: byte flipped (live checkpoint)", "checkpoint files",
           lambda s: flip_middle(live_file(s, "weights.safetensors")), FILE_WORDS),
    Damage("weights: truncated to half (live checkpoint)", "checkpoint files",
           lambda s: cut_half(live_file(s, "weights.safetensors")), FILE_WORDS),
    Damage("weights: deleted (slice 0 checkpoint)", "checkpoint files",
           lambda s: (s / checkpoint(s, 1, 0).path / "weights.safetensors").unlink(), FILE_WORDS),
    Damage("manifest: deleted (live checkpoint)", "checkpoint files",
           lambda s: live_file(s, "manifest.json").unlink(), FILE_WORDS),
    Damage("manifest: byte flipped (slice 1 checkpoint)", "checkpoint files",
           lambda s: flip(s / checkpoint(s, 2, 1).path / "manifest.json", 40), FILE_WORDS),
    Damage("checkpoint directory deleted (slice 1)", "checkpoint files",
           lambda s: shutil.rmtree(s / checkpoint(s, 0, 1).path), FILE_WORDS),
    Damage("adapter weights: byte flipped (lora, live checkpoint)", "adapter",
           lambda s: flip_middle(live_file(s, "adapter/adapter_model.safetensors")), FILE_WORDS,
           store="lora"),
    Damage("adapter config: deleted (lora, live checkpoint)", "adapter",
           lambda s: live_file(s, "adapter/adapter_config.json").unlink(), FILE_WORDS, store="lora"),
    Damage("record features: byte flipped by an SQL UPDATE", "records", sql_flip, ("content digest",)),
    Damage("record features: bit rot in the database file", "records",
           lambda s: bit_rot(s, "features"), ("content digest",)),
    Damage("record text: bit rot in the database file (lora)", "records",
           lambda s: bit_rot(s, "text"), ("content digest",), store="lora"),
    Damage("database page: records root page header flipped", "database",
           lambda s: flip(s / DB, page_offset(s, "records"), 0xFF), DB_WORDS),
    Damage("database page: an index page zeroed", "database",
           lambda s: zero_page(s, "records_placement"), DB_WORDS),
    Damage("database file: cut to half", "database", lambda s: cut_half(s / DB), DB_WORDS),
    Damage("database file: last page cut off", "database",
           lambda s: truncate(s / DB, (s / DB).stat().st_size - 4096), DB_WORDS),
    Damage("database page: a registered sha256 digit changed", "database", registered_digit,
           ("seal", "sha256", "corrupt")),
    Damage("WAL: last frame cut, after an acknowledged deletion", "WAL", _wal_cut, WAL_WORDS,
           store="wal"),
    Damage("WAL: byte flipped in the last frame, after an acknowledged deletion", "WAL",
           lambda s: flip(s / f"{DB}-wal", (s / f"{DB}-wal").stat().st_size - 100), WAL_WORDS,
           store="wal"),
    Damage("WAL: deleted, after an acknowledged deletion", "WAL",
           lambda s: (s / f"{DB}-wal").unlink(), WAL_WORDS, store="wal"),
    Damage("manifest: optimizer lr edited (valid JSON)", "tampering",
           lambda s: edit_manifest(s, set_lr), FILE_WORDS),
    Damage("manifest: records list emptied (valid JSON)", "tampering",
           lambda s: edit_manifest(s, empty_records), FILE_WORDS),
    Damage("manifest: lr edited, its sha256 updated in the database", "tampering",
           lambda s: edit_manifest(s, set_lr, register=True), ("seal",)),
    Damage("manifest: records emptied, its sha256 updated in the database", "tampering",
           lambda s: edit_manifest(s, empty_records, register=True), ("seal",)),
    Damage("weights: swapped for another shard's, sha256 updated in the database", "tampering",
           swap_weights, ("seal",)),
    Damage("manifest: lr edited, database updated and re-sealed with the key in store.db",
           "tampering", lambda s: edit_manifest(s, set_lr, register=True, reseal=True), ("seal",),
           gap="whoever can write store.db can read the ledger key in its meta table and re-seal "
               "an edited registration (the key lives beside what it protects)"),
    Damage("receipt: JSON edited (valid JSON)", "receipts", edit_receipt, ("receipt",)),
    Damage("receipt: first row deleted", "receipts",
           lambda s: sql(s, "DELETE FROM deletions WHERE seq = 1"), ("receipt",)),
    Damage("receipt: last row deleted", "receipts",
           lambda s: sql(s, "DELETE FROM deletions WHERE seq = (SELECT MAX(seq) FROM deletions)"),
           ("receipt", "ledger", "tombstone")),
    Damage("receipt: sequence numbers swapped", "receipts", swap_seq, ("receipt",)),
    Damage("stray file in the store directory", "strays", lambda s: plant(s / "backup.csv"),
           ("not part of the store",)),
    Damage("stray file under checkpoints/", "strays", lambda s: plant(s / "checkpoints" / "notes.csv"),
           ("not registered",)),
    Damage("stray file inside a registered checkpoint directory", "strays",
           lambda s: plant(s / checkpoint(s, 2).path / "extra.csv"), ("unrecorded", "not registered")),
    Damage("stray temporary directory under checkpoints/shard-000", "strays",
           lambda s: plant(s / "checkpoints" / "shard-000" / ".tmp-0123" / "weights.safetensors"),
           ("not registered",)),
]


def damage(name: str) -> Damage:
    """The case of `DAMAGES` with this name."""
    return next(d for d in DAMAGES if d.name == name)
