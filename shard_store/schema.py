"""Every table of the store, as ordered migrations; `PRAGMA user_version` counts those applied.

Append a migration to change the schema; never edit one that has shipped.
"""

from __future__ import annotations

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
]

SCHEMA_VERSION = len(MIGRATIONS)


def current_version(db: Database) -> int:
    return int(db.execute("PRAGMA user_version").fetchone()[0])


def migrate(db: Database) -> int:
    """Apply the migrations this database has not seen; returns the resulting version.

    Statements are split on ";", so comments in a migration must not contain one.
    """
    version = current_version(db)
    for number, script in enumerate(MIGRATIONS[version:], start=version + 1):
        with db.atomic():
            for statement in script.split(";"):
                if statement.strip():
                    db.execute(statement)
            db.execute(f"PRAGMA user_version = {number}")
    return current_version(db)
