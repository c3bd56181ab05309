"""Every table of the store, as ordered migrations; `PRAGMA user_version` counts those applied.

Append a migration to change the schema; never edit one that has shipped.
"""

from __future__ import annotations

import sqlite3

from sqlite_utils import Database

MIGRATIONS: list[str] = [
    # 1: the initial schema.
    """
    CREATE TABLE meta (
        key TEXT PRIMARY KEY,
        value TEXT NOT NULL                  -- JSON
    );
    CREATE TABLE records (
        id TEXT PRIMARY KEY,
        group_id TEXT,
        digest TEXT NOT NULL,                -- content digest of (input, label, group)
        shard INTEGER NOT NULL,
        slice INTEGER NOT NULL,
        order_key TEXT NOT NULL,             -- position inside the slice
        payload TEXT,                        -- JSON input and label, NULL once deleted
        added_at TEXT NOT NULL,
        deleted_at TEXT,
        deletion_request TEXT
    );
    CREATE INDEX records_placement ON records (shard, slice, order_key);
    CREATE INDEX records_group ON records (group_id);
    CREATE TABLE checkpoints (
        key TEXT PRIMARY KEY,                -- digest of (config, shard, slice, records seen)
        shard INTEGER NOT NULL,
        slice INTEGER NOT NULL,
        path TEXT NOT NULL,                  -- directory, relative to the store root
        sha256 TEXT NOT NULL,                -- of the safetensors weights file
        record_count INTEGER NOT NULL,
        created_at TEXT NOT NULL
    );
    CREATE INDEX checkpoints_shard ON checkpoints (shard, slice);
    CREATE TABLE live (
        shard INTEGER PRIMARY KEY,
        key TEXT NOT NULL REFERENCES checkpoints(key),
        updated_at TEXT NOT NULL
    );
    CREATE TABLE deletions (
        request_id TEXT PRIMARY KEY,
        record_ids TEXT NOT NULL,            -- JSON list
        shards TEXT NOT NULL,                -- JSON list of affected shards
        status TEXT NOT NULL CHECK (status IN ('pending', 'applied')),
        requested_at TEXT NOT NULL,
        applied_at TEXT,
        receipt TEXT                         -- JSON, once applied
    );
    CREATE INDEX deletions_status ON deletions (status);
    """,
    # 2: frozen-encoder embeddings, cached per (model fingerprint, input digest).
    """
    ALTER TABLE records ADD COLUMN input_digest TEXT;
    CREATE INDEX records_input_digest ON records (input_digest);
    CREATE TABLE embeddings (
        model TEXT NOT NULL,                 -- fingerprint of the encoder (weights and settings)
        input_digest TEXT NOT NULL,          -- digest of the text
        dim INTEGER NOT NULL,
        vector BLOB NOT NULL,                -- little-endian float32, dim values
        PRIMARY KEY (model, input_digest)
    );
    """,
    # 3: numeric inputs as binary (parsing JSON floats dominated retraining small models), and a
    # counter of record changes that lets a process keep shard data in memory between requests.
    # Updates and deletes bump it by trigger, however they are made; inserts (a trigger per row
    # tripled their cost) bump it once per batch, in ShardStore.insert_records.
    """
    ALTER TABLE records ADD COLUMN features BLOB;   -- little-endian float64, NULL once deleted
    INSERT OR IGNORE INTO meta (key, value) VALUES ('records_version', '0');
    CREATE TRIGGER records_updated AFTER UPDATE ON records BEGIN
        UPDATE meta SET value = CAST(value AS INTEGER) + 1 WHERE key = 'records_version';
    END;
    CREATE TRIGGER records_deleted AFTER DELETE ON records BEGIN
        UPDATE meta SET value = CAST(value AS INTEGER) + 1 WHERE key = 'records_version';
    END;
    """,
]

SCHEMA_VERSION = len(MIGRATIONS)


def current_version(db: Database) -> int:
    return int(db.execute("PRAGMA user_version").fetchone()[0])


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


def migrate(db: Database) -> int:
    """Apply the migrations this database has not seen; returns the resulting version."""
    version = current_version(db)
    for number, script in enumerate(MIGRATIONS[version:], start=version + 1):
        with db.atomic():
            for statement in statements(script):
                db.execute(statement)
            db.execute(f"PRAGMA user_version = {number}")
    return current_version(db)
