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


def substitute_weights(store: Path, shard: int, data: bytes) -> None:
    """Shard `shard`'s live weights replaced by `data` (say, a copy of them kept from before a
    deletion), with the registration's sha256 updated to match, as an operator with access to
    the database (but not the key) would."""
    row = checkpoint(store, shard)
    (store / row.path / "weights.safetensors").write_bytes(data)
    digest = hashlib.sha256(data).hexdigest()
    reregister(store, row, {**row.files, "weights.safetensors": digest}, digest)


def link_out(store: Path, relative: str, outside: Path) -> Path:
    """Replace `store/relative` by a symbolic link to a copy of it at `outside` (what a careless
    `mv` and `ln -s` to another disk leave); returns the link."""
    inside = store / relative
    if inside.is_dir():
        shutil.copytree(inside, outside)
        shutil.rmtree(inside)
    else:
        outside.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(inside, outside)
        inside.unlink()
    inside.symlink_to(outside)
    return inside


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
    # The command that brings the store back to a passing audit ("recover" or "repair"), or ""
    # where the data to do so is gone (`cannot_heal` says why).
    heal: str = "repair"
    cannot_heal: str = ""

    def flags(self, store: Path) -> list[str]:
        """Options every command on the damaged store takes (the witness, the key file)."""
        extra = []
        if (store.parent / WITNESS).exists():
            extra += ["--witness", str(store.parent / WITNESS)]
        if (store.parent / KEY).exists():
            extra += ["--key-file", str(store.parent / KEY)]
        return extra


# Files the damages keep beside the store (never in it): a witness, a key, what links point to.
WITNESS, KEY, OUTSIDE = "store.witness", "store.key", "outside"


def link_away(store: Path, relative: str) -> Path:
    """`store/relative` moved beside the store and replaced by a link to it."""
    return link_out(store, relative, store.parent / OUTSIDE / relative.replace("/", "_"))


def link_dir_in_checkpoint(store: Path) -> None:
    """A directory inside shard 1's live checkpoint, as a link to one outside the store."""
    target = store.parent / OUTSIDE / "planted"
    target.mkdir(parents=True, exist_ok=True)
    (target / "weights.safetensors").write_bytes(b"not the store's")
    (store / checkpoint(store, 1).path / "planted").symlink_to(target)


def reinsert_deleted(store: Path) -> str:
    """A deleted record's row written back (as from an old export of the table): the record is
    deleted first, through the CLI's library, then its saved row inserted again; returns its id."""
    from sisa.api import Sisa

    rid = sql(store, "SELECT id FROM records WHERE deleted_at IS NULL ORDER BY id LIMIT 1 OFFSET 7")[0][0]
    saved = sql(store, "SELECT * FROM records WHERE id = ?", [rid])[0]
    with Sisa.open(store) as sisa:
        sisa.forget([rid])
    sql(store, f"INSERT INTO records VALUES ({','.join('?' * len(saved))})", list(saved))
    return str(rid)


def journal_lines(store: Path, keep: Callable[[list[bytes]], bytes]) -> None:
    path = store / "deletions.journal"
    path.write_bytes(keep(path.read_bytes().split(b"\n")[:-1]))


def edit_journal_line(lines: list[bytes]) -> bytes:
    lines = list(lines)
    lines[0] = lines[0].replace(b'"requested_at":"', b'"requested_at":"1')
    return b"\n".join(lines) + b"\n"


def swap_shard_dirs(store: Path) -> None:
    """checkpoints/shard-000 and shard-001 trade places (a careless `mv`)."""
    top = store / "checkpoints"
    (top / "shard-000").rename(top / "swapping")
    (top / "shard-001").rename(top / "shard-000")
    (top / "swapping").rename(top / "shard-001")


def insert_row(store: Path) -> str:
    """A copy of a live record's row under a new id, inserted by SQL (its content digest is sound:
    it does not cover the id); returns the new id."""
    row = sql(store, "SELECT * FROM records WHERE deleted_at IS NULL ORDER BY id LIMIT 1")[0]
    names = [r[1] for r in sql(store, "PRAGMA table_info(records)")]
    values = dict(zip(names, row, strict=True))
    values["id"] = "inserted-by-hand"
    sql(store, f"INSERT INTO records ({','.join(names)}) VALUES ({','.join('?' * len(names))})",
        [values[n] for n in names])
    return "inserted-by-hand"


def reset_receipt(store: Path) -> None:
    """The last applied deletion set back to pending (its receipt and place in the chain kept)."""
    sql(store, "UPDATE deletions SET status = 'pending', applied_at = NULL WHERE seq = "
               "(SELECT MAX(seq) FROM deletions)")


def restore_backup(store: Path, witness: bool) -> list[str]:
    """A backup of the whole store directory taken, two deletions made (with a witness kept
    beside the store, if asked), then the backup restored over the store; returns the ids
    deleted after the backup."""
    from sisa.api import Sisa
    from sisa.config import StoreConfig

    config = StoreConfig(witness=str(store.parent / WITNESS) if witness else None)
    if witness:
        Sisa.open(store, store_config=config).close()  # starts the witness
    backup = store.parent / "backup"
    shutil.copytree(store, backup)
    ids = [r[0] for r in sql(store, "SELECT id FROM records WHERE deleted_at IS NULL ORDER BY id "
                                    "LIMIT 2 OFFSET 20")]
    with Sisa.open(store, store_config=config) as sisa:
        for rid in ids:
            sisa.forget([rid])
    shutil.rmtree(store)
    shutil.move(str(backup), store)
    return ids


def reseal_with_own_key(store: Path) -> None:
    """In a store whose key is kept outside: a manifest edited, its sha256 registered, and the
    registration re-sealed with a key of the writer's own (store.db holds none to read)."""
    import os

    edit_manifest(store, set_lr)
    row = checkpoint(store, 0)
    files = {**row.files, "manifest.json": hashlib.sha256((store / row.path / "manifest.json")
                                                         .read_bytes()).hexdigest()}
    reregister(store, row, files, row.sha256, key=os.urandom(32))


# Why some damage has no command that heals it: the data to do so is gone from the store.
RECORD_LOST = ("the record's content is lost (only its digest is left): forget it and add it again "
               "from the source data")
RECEIPT_LOST = ("a receipt is evidence given when its deletion was applied: an edited, removed or "
                "reordered one cannot be made again (the deletions stand; the head kept elsewhere, or "
                "the witness, shows what the chain was)")
DB_LOST = ("the database is damaged: restore the store from a backup (with its witness, `recover` "
           "then applies every later deletion again), or train it again from the source data")


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
    Damage("record features: byte flipped by an SQL UPDATE", "records", sql_flip, ("content digest",),
           heal="", cannot_heal=RECORD_LOST),
    Damage("record features: bit rot in the database file", "records",
           lambda s: bit_rot(s, "features"), ("content digest",), heal="", cannot_heal=RECORD_LOST),
    Damage("record text: bit rot in the database file (lora)", "records",
           lambda s: bit_rot(s, "text"), ("content digest",), store="lora", heal="", cannot_heal=RECORD_LOST),
    Damage("database page: records root page header flipped", "database",
           lambda s: flip(s / DB, page_offset(s, "records"), 0xFF), DB_WORDS, heal="", cannot_heal=DB_LOST),
    Damage("database page: an index page zeroed", "database",
           lambda s: zero_page(s, "records_placement"), DB_WORDS, heal="", cannot_heal=DB_LOST),
    Damage("database file: cut to half", "database", lambda s: cut_half(s / DB), DB_WORDS, heal="",
           cannot_heal=DB_LOST),
    Damage("database file: last page cut off", "database",
           lambda s: truncate(s / DB, (s / DB).stat().st_size - 4096), DB_WORDS, heal="",
           cannot_heal=DB_LOST),
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
               "an edited registration (the key lives beside what it protects): keep the key "
               "outside the store (the same edit on such a store is caught)",
           heal="", cannot_heal="nothing tells the forged registration from a sound one"),
    Damage("receipt: JSON edited (valid JSON)", "receipts", edit_receipt, ("receipt",), heal="",
           cannot_heal=RECEIPT_LOST),
    Damage("receipt: first row deleted", "receipts",
           lambda s: sql(s, "DELETE FROM deletions WHERE seq = 1"), ("receipt",), heal="",
           cannot_heal=RECEIPT_LOST),
    Damage("receipt: last row deleted", "receipts",
           lambda s: sql(s, "DELETE FROM deletions WHERE seq = (SELECT MAX(seq) FROM deletions)"),
           ("receipt", "ledger", "tombstone"), heal="recover"),
    Damage("receipt: sequence numbers swapped", "receipts", swap_seq, ("receipt",), heal="",
           cannot_heal=RECEIPT_LOST),
    Damage("stray file in the store directory", "strays", lambda s: plant(s / "backup.csv"),
           ("not part of the store",)),
    Damage("stray file under checkpoints/", "strays", lambda s: plant(s / "checkpoints" / "notes.csv"),
           ("not registered",)),
    Damage("stray file inside a registered checkpoint directory", "strays",
           lambda s: plant(s / checkpoint(s, 2).path / "extra.csv"), ("unrecorded", "not registered")),
    Damage("stray temporary directory under checkpoints/shard-000", "strays",
           lambda s: plant(s / "checkpoints" / "shard-000" / ".tmp-0123" / "weights.safetensors"),
           ("not registered",)),
    Damage("checkpoint directories: two shards' swapped", "checkpoint files", swap_shard_dirs,
           FILE_WORDS),
    Damage("record: a row inserted by SQL (a copy of a live record under a new id)", "records",
           insert_row, ("current records", "stale"), heal="repair"),
    Damage("link: the live weights, to a copy outside the store", "links",
           lambda s: link_away(s, checkpoint(s, 2).path + "/weights.safetensors"), ("symbolic link",)),
    Damage("link: checkpoints/, to a copy outside the store", "links",
           lambda s: link_away(s, "checkpoints"), ("symbolic link",)),
    Damage("link: a shard's directory, to a copy outside the store", "links",
           lambda s: link_away(s, "checkpoints/shard-001"), ("symbolic link",)),
    Damage("link: the deletion journal, to a copy outside the store", "links",
           lambda s: link_away(s, "deletions.journal"), ("symbolic link",)),
    Damage("link: a directory inside a live checkpoint, to one outside", "links",
           link_dir_in_checkpoint, ("symbolic link",)),
    Damage("journal: removed", "journal", lambda s: (s / "deletions.journal").unlink(),
           ("journal",), heal="recover"),
    Damage("journal: cut to its first line", "journal",
           lambda s: journal_lines(s, lambda lines: lines[0] + b"\n"), ("journal",), heal="recover"),
    Damage("journal: its last line cut short", "journal",
           lambda s: journal_lines(s, lambda lines: b"\n".join(lines[:-1]) + b"\n" + lines[-1][:20]),
           ("journal",), heal="recover"),
    Damage("journal: a line edited (valid JSON)", "journal",
           lambda s: journal_lines(s, edit_journal_line), ("journal",), heal="recover"),
    Damage("record: a deleted record's row inserted again", "records", reinsert_deleted,
           ("live again",), heal="recover"),
    Damage("receipt: the last applied deletion reset to pending", "receipts", reset_receipt,
           ("pending",), heal="recover"),
    Damage("backup: the whole store restored after two deletions, with a witness", "restore",
           lambda s: restore_backup(s, witness=True), ("the database lacks it",), heal="recover"),
    Damage("backup: the whole store restored after two deletions, no witness", "restore",
           lambda s: restore_backup(s, witness=False), ("the database lacks it",), heal="",
           gap="a store restored whole, journal included, is an older store: without a witness "
               "(or the receipts' head kept elsewhere, `sisa receipts verify --expect`) nothing "
               "tells it from one that never had the deletions",
           cannot_heal="the deletions made after the backup are known nowhere but outside it"),
    Damage("key outside: a manifest edited, registered and re-sealed with another key", "tampering",
           reseal_with_own_key, ("seal",), store="keyed"),
]


def damage(name: str) -> Damage:
    """The case of `DAMAGES` with this name."""
    return next(d for d in DAMAGES if d.name == name)
