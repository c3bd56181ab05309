"""Every table of the store, as ordered migrations; `PRAGMA user_version` counts those applied.

Append a migration to change the schema; never edit one that has shipped. Schema 4 is the first
released one: versions 1 to 3 were pre-release and are not read (see CHANGELOG.md).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import sqlite3
from collections.abc import Callable

from shard_store.rows import seal_text

FIRST_VERSION = 4  # the version the baseline script below creates

BASELINE = """
CREATE TABLE meta (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL                  -- JSON
);
CREATE TABLE records (
    id TEXT PRIMARY KEY,
    group_id TEXT,
    digest TEXT NOT NULL,                -- content digest of (input, target, group, prior)
    shard INTEGER NOT NULL,
    slice INTEGER NOT NULL,
    order_key TEXT NOT NULL,             -- position inside the slice
    target TEXT,                         -- e.g. the class label; NULL once deleted
    text TEXT,                           -- a text input; NULL once deleted
    features BLOB,                       -- a numeric input, little-endian float64; NULL once deleted
    prior REAL,                          -- how likely the record is to be deleted (placement)
    input_digest TEXT,                   -- digest of the input alone (key of a cached embedding)
    added_at TEXT NOT NULL,
    deleted_at TEXT,
    deletion_request TEXT
);
CREATE INDEX records_placement ON records (shard, slice, order_key);
CREATE INDEX records_group ON records (group_id);
CREATE INDEX records_input_digest ON records (input_digest);
CREATE TABLE checkpoints (
    key TEXT PRIMARY KEY,                -- digest of (config, shard, slice, records seen)
    shard INTEGER NOT NULL,
    slice INTEGER NOT NULL,
    parent TEXT,                         -- key of the checkpoint of the slice before
    path TEXT NOT NULL,                  -- directory, relative to the store root
    sha256 TEXT NOT NULL,                -- of the weights file: the checkpoint's identity
    files TEXT NOT NULL,                 -- JSON {file name: sha256} of every file in the directory
    record_count INTEGER NOT NULL,
    created_at TEXT NOT NULL
);
CREATE INDEX checkpoints_shard ON checkpoints (shard, slice);
-- One row per shard. `version` counts changes to the shard's records (triggers below, and
-- inserts); the live checkpoint is current when live_version = version.
CREATE TABLE shards (
    shard INTEGER PRIMARY KEY,
    version INTEGER NOT NULL DEFAULT 0,
    live_key TEXT REFERENCES checkpoints(key),
    live_version INTEGER,
    updated_at TEXT
);
CREATE TABLE deletions (
    request_id TEXT PRIMARY KEY,
    record_ids TEXT NOT NULL,            -- JSON list
    shards TEXT NOT NULL,                -- JSON list of affected shards
    before TEXT NOT NULL,                -- JSON {shard: sha256 of its live weights when acknowledged}
    status TEXT NOT NULL CHECK (status IN ('pending', 'applied')),
    requested_at TEXT NOT NULL,
    applied_at TEXT,
    receipt TEXT                         -- JSON, once applied
);
CREATE INDEX deletions_status ON deletions (status);
CREATE TABLE embeddings (
    model TEXT NOT NULL,                 -- fingerprint of the encoder (weights and settings)
    input_digest TEXT NOT NULL,          -- digest of the text
    dim INTEGER NOT NULL,
    vector BLOB NOT NULL,                -- little-endian float32, dim values
    PRIMARY KEY (model, input_digest)
);
-- Any change to a record, however it is made, makes its shard's kept data and live checkpoint
-- stale. Inserts (a trigger per row would triple their cost) bump once per batch, in the store.
CREATE TRIGGER records_updated AFTER UPDATE ON records BEGIN
    UPDATE shards SET version = version + 1 WHERE shard IN (OLD.shard, NEW.shard);
END;
CREATE TRIGGER records_deleted AFTER DELETE ON records BEGIN
    UPDATE shards SET version = version + 1 WHERE shard = OLD.shard;
END;
"""

# Schema 5: the ledger becomes a keyed hash chain and tombstones keep only keyed digests.
# - meta `ledger_key`: 32 random bytes (hex), the key of every keyed digest (see `keyed` below);
# - checkpoints.seal: keyed digest of the registration (its files' sha256 included), so the
#   manifest's hash in the database cannot be swapped without the key;
# - deletions.seq / receipt_digest: an applied deletion's place in the receipt chain, and the
#   keyed digest of its receipt (which names the digest of the one before).
# Existing tombstones (plain ids and content digests) are rewritten keyed in Python, after this.
SCHEMA_5 = """
INSERT INTO meta (key, value) VALUES ('ledger_key', json_quote(lower(hex(randomblob(32)))));
ALTER TABLE checkpoints ADD COLUMN seal TEXT;
ALTER TABLE deletions ADD COLUMN seq INTEGER;
ALTER TABLE deletions ADD COLUMN receipt_digest TEXT;
CREATE UNIQUE INDEX deletions_seq ON deletions (seq);
"""

# Each entry takes the schema from version FIRST_VERSION + i - 1 to FIRST_VERSION + i: SQL, or a
# function of the connection (run inside the migration's transaction).
Migration = str | Callable[[sqlite3.Connection], None]


def _schema_5(conn: sqlite3.Connection) -> None:
    for statement in statements(SCHEMA_5):
        conn.execute(statement)
    key = ledger_key(conn)
    # A schema-4 store kept deleted records' ids, groups and content digests in clear: key them.
    current = [s for (s,) in conn.execute(
        "SELECT shard FROM shards WHERE live_key IS NOT NULL AND live_version = version")]
    rows = conn.execute("SELECT id, group_id, digest, input_digest FROM records "
                        "WHERE deleted_at IS NOT NULL").fetchall()
    for record_id, group, digest, input_d in rows:
        conn.execute(
            "UPDATE records SET id = ?, group_id = ?, digest = ?, input_digest = ?, prior = NULL, "
            "order_key = '' WHERE id = ?",
            [keyed(key, "id", record_id), keyed(key, "group", group) if group is not None else None,
             keyed(key, "content", digest),
             keyed(key, "input", input_d) if input_d is not None else None, record_id])
    # Checkpoints registered before the seal existed are sealed as they are registered now.
    cols = ["key", "shard", "slice", "parent", "path", "sha256", "files", "record_count"]
    for values in conn.execute(f"SELECT {', '.join(cols)} FROM checkpoints").fetchall():
        row = dict(zip(cols, values, strict=True))
        conn.execute("UPDATE checkpoints SET seal = ? WHERE key = ?",
                     [keyed(key, "seal", seal_text(row)), row["key"]])
    # Rewriting a tombstone changes no live record: shards current before stay current.
    conn.executemany("UPDATE shards SET live_version = version WHERE shard = ?", [(s,) for s in current])
    for request_id, ids, receipt in conn.execute(
            "SELECT request_id, record_ids, receipt FROM deletions").fetchall():
        digests = [keyed(key, "id", i) for i in json.loads(ids)]
        # Receipts of schema 4 named the ids in clear and were not chained: they keep their
        # figures, with keyed ids, outside the chain (`sisa receipts verify` counts them).
        if receipt is not None:
            old = json.loads(receipt)
            old.pop("record_ids", None)
            receipt = json.dumps({**old, "record_digests": digests}, sort_keys=True)
        conn.execute("UPDATE deletions SET record_ids = ?, receipt = ? WHERE request_id = ?",
                     [json.dumps(digests), receipt, request_id])


# Schema 6: the tombstones indexed by shard, so that per-shard counts read two indexes, never the
# table (a million records: 2.2 s -> 0.05 s).
_SCHEMA_6 = "CREATE INDEX IF NOT EXISTS records_tombstones ON records (shard) WHERE deleted_at IS NOT NULL;"

# Schema 7: the store's identity (a witness kept outside the store names it). Where the ledger key
# lives (`key_location`, `key_check`) is set in meta by the store when a key is kept outside.
_SCHEMA_7 = ("INSERT OR IGNORE INTO meta (key, value) VALUES ('store_id', "
             "json_quote(lower(hex(randomblob(16)))));")

MIGRATIONS: list[Migration] = [_schema_5, _SCHEMA_6, _SCHEMA_7]


def ledger_key(conn: sqlite3.Connection) -> bytes:
    row = conn.execute("SELECT value FROM meta WHERE key = 'ledger_key'").fetchone()
    if row is None:
        raise sqlite3.DatabaseError("the store has no ledger key")
    try:
        return bytes.fromhex(json.loads(row[0]))
    except (ValueError, TypeError) as exc:
        raise sqlite3.DatabaseError(f"the store's ledger key is damaged: {exc}") from exc


def key_check(key: bytes) -> str:
    """What a store keeps to tell its external key from another: a digest of it, from which the
    key cannot be found."""
    return hashlib.sha256(b"sisa-key-check\0" + key).hexdigest()


def keyed(key: bytes, domain: str, value: str) -> str:
    """The keyed digest (HMAC-SHA256) of a value in a domain (id, group, content, input, receipt,
    seal): it proves a value to whoever has the key and confirms no guess to anyone else."""
    return hmac.new(key, f"{domain}\0{value}".encode(), hashlib.sha256).hexdigest()

SCHEMA_VERSION = FIRST_VERSION + len(MIGRATIONS)


def current_version(conn: sqlite3.Connection) -> int:
    return int(conn.execute("PRAGMA user_version").fetchone()[0])


def statements(script: str) -> list[str]:
    """The complete SQL statements of a script (a trigger body's ";" does not end one)."""
    out, buffer = [], ""
    for piece in script.split(";"):
        buffer += piece + ";"
        if sqlite3.complete_statement(buffer):
            if buffer.strip(" \n;"):
                out.append(buffer.strip())
            buffer = ""
    return out


def _apply(conn: sqlite3.Connection, script: Migration, start: int) -> None:
    """Take the schema from version `start` to `start + 1` in one transaction, unless another
    connection did it first (the version is read again once the transaction holds the lock)."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        if current_version(conn) == start:
            if callable(script):
                script(conn)
            else:
                for statement in statements(script):
                    conn.execute(statement)
            conn.execute(f"PRAGMA user_version = {FIRST_VERSION if start == 0 else start + 1}")
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise


def migrate(conn: sqlite3.Connection, until: int = SCHEMA_VERSION) -> int:
    """Create the schema in an empty database, or apply the migrations it has not seen (up to
    version `until`); returns the resulting version. A pre-release version (1 to
    FIRST_VERSION - 1) is left alone: the caller refuses it."""
    if current_version(conn) == 0:
        _apply(conn, BASELINE, 0)
    version = current_version(conn)
    while FIRST_VERSION <= version < min(until, SCHEMA_VERSION):
        _apply(conn, MIGRATIONS[version - FIRST_VERSION], version)
        version = current_version(conn)
    return version
