"""Typed reads and writes over a store's SQLite database (WAL mode), and its checkpoint files.

A store is a directory: `store.db` (records, shards and their live checkpoints, checkpoints, the
deletion ledger, embeddings) and `checkpoints/` (one directory per slice checkpoint). Every change
that spans rows is one `BEGIN IMMEDIATE` transaction. Each thread gets its own connection, so
readers never wait for a writer beyond what WAL does; writers that retrain take `writer()`, an
exclusive lock on the store that also serialises the removal of files.

The invariant the transactions keep: a registered checkpoint never derives from a deleted record.
Files on disk that the database does not register (a crash between a transaction and the removal
of the files it dropped, a half-written temporary) are removed by `sweep`, under the lock.

What a deletion leaves: a tombstone holding keyed digests (HMAC with the store's ledger key) of the
record's id, group and content, never the values; `secure_delete` zeroes the freed bytes and the
WAL is checkpointed and truncated, so nothing of the record stays readable in the files; and a
line in the deletion journal, so that losing the WAL never takes the deletion back. Store files
are created readable by their owner only. A store opened `read_only` never writes.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import sqlite3
import stat
import sys
import threading
import urllib.parse
import uuid
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, cast

from shard_store import files
from shard_store.errors import (
    NotLocked,
    StoreCorrupt,
    StoreError,
    StoreExists,
    StoreIncomplete,
    StoreKeyError,
    StoreNotFound,
    StoreVersionError,
    SymlinkError,
    WitnessError,
)
from shard_store.journal import KeyedLog, canonical
from shard_store.rows import (
    Acknowledged,
    CheckpointRow,
    Committed,
    DeletionRow,
    NewRecord,
    RecordRow,
    ShardCommit,
    ShardRow,
    checkpoint_row,
    column_json,
    deletion_row,
    record_row,
    seal_text,
)
from shard_store.schema import (
    FIRST_VERSION,
    SCHEMA_VERSION,
    current_version,
    key_check,
    keyed,
    migrate,
)

# sqlite-utils imports pandas where it is installed, only to give its Timestamp a column type (never
# stored here: every table is declared in schema.py); that is a third of a second of every command.
# Hidden while sqlite-utils loads, it is skipped, and imports as usual afterwards. (Another thread
# importing pandas at that moment would fail: shard_store is imported before any thread starts.)
_HIDE_PANDAS = "pandas" not in sys.modules and "sqlite_utils" not in sys.modules
if _HIDE_PANDAS:
    sys.modules["pandas"] = None  # type: ignore[assignment]  # None: `import pandas` fails
try:
    from sqlite_utils import Database
finally:
    if _HIDE_PANDAS:
        del sys.modules["pandas"]

DB_NAME = "store.db"
LOCK_NAME = "writer.lock"
CHECKPOINT_DIR = "checkpoints"
COMPLETE = "complete"  # meta key written in the transaction that stores the first records
SCRUB_OWED = "scrub_owed"  # meta key: a WAL truncation after a deletion is still to be done
JOURNAL_STARTED = "journal_started"  # meta key: every ledger entry is in the deletion journal
KEY_LOCATION = "key_location"  # meta key: "external" when the ledger key is kept outside the store
KEY_CHECK = "key_check"  # meta key: a digest that tells the external key from any other
WITNESSED = "witnessed"  # meta key: when this store started keeping a witness outside it
STORE_ID = "store_id"  # meta key: this store's identity (a witness names it)
JOURNAL_FIELDS = ("request_id", "requested_at", "record_digests")
_CHUNK = 500  # ids per `IN (...)` query: well below SQLite's variable limit
# The deletion journal: one line per acknowledged deletion (keyed digests only), appended and
# fsynced before the acknowledgement commits. SQLite's durability is the database and its WAL
# together; the journal survives losing either (a WAL deleted after a crash, a database restored
# from a backup): a writer re-applies every journalled deletion the database lacks.
JOURNAL_NAME = "deletions.journal"
# What a store directory holds; anything else is reported by the audit.
# SQLite's rollback journal: only the transaction that creates a store uses one (see _populate), so
# one left behind means an interrupted creation.
ROLLBACK_JOURNAL = f"{DB_NAME}-journal"
STORE_FILES = frozenset({DB_NAME, f"{DB_NAME}-wal", f"{DB_NAME}-shm", LOCK_NAME, CHECKPOINT_DIR,
                         JOURNAL_NAME, ROLLBACK_JOURNAL})
PRIVATE_DIR, PRIVATE_FILE = 0o700, 0o600


def _private_file(path: Path) -> None:
    """Create `path` empty, readable and writable by its owner only, unless it exists."""
    with contextlib.suppress(FileExistsError):
        os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, PRIVATE_FILE))


_canonical = canonical


def utcnow() -> str:
    return datetime.now(UTC).isoformat(timespec="microseconds")


def _keyed_or_none(key: bytes, domain: str, value: str | None) -> str | None:
    return None if value is None else keyed(key, domain, value)


def _as_chunks(records: Sequence[NewRecord] | Iterable[Sequence[NewRecord]]
               ) -> Iterable[Sequence[NewRecord]]:
    """Records, or chunks of them, as chunks."""
    if isinstance(records, Sequence) and (not records or isinstance(records[0], NewRecord)):
        return [cast(Sequence[NewRecord], records)]
    return cast(Iterable[Sequence[NewRecord]], records)


def _check_witness_path(root: Path, witness: Path) -> None:
    """A witness must live outside the store: a backup of the store must not carry it along."""
    store, where = root.resolve(), Path(witness).resolve()
    if where == store or store in where.parents:
        raise WitnessError(f"the witness {str(witness)!r} is inside the store {str(root)!r}: keep it "
                           "outside (another disk or machine is better), where a backup of the "
                           "store does not restore it")


def _file_state(path: Path | None) -> tuple[int, ...] | None:
    """What tells a file's versions apart cheaply: inode, size and times (None: no file)."""
    if path is None:
        return None
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    except OSError as exc:  # unreadable now: its full read reports why
        return (-1, exc.errno or 0)
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def _ro_uri(path: Path) -> str:
    return f"file:{urllib.parse.quote(str(path.resolve()))}?mode=ro"


class ShardStore:
    """One SISA store on disk. `ShardStore.create` makes one; `ShardStore.open` reopens it."""

    def __init__(self, root: Path, read_only: bool = False, key: bytes | None = None,
                 witness: Path | None = None) -> None:
        """`key`: the ledger key, for a store that keeps it outside (None: the store's own);
        `witness`: the file outside the store that witnesses its deletions (None: none)."""
        self.root = root
        self.read_only = read_only
        self._given_key = key
        self._key: bytes | None = None
        self.journal_log = KeyedLog(root / JOURNAL_NAME, lambda: self.key, "journal", JOURNAL_FIELDS)
        self.witness_path = Path(witness) if witness is not None else None
        self.witness_log = (KeyedLog(self.witness_path, lambda: self.key, "witness")
                            if self.witness_path is not None else None)
        self._local = threading.local()  # per thread: its connection, its writer-lock depth
        # Every thread's connection, to close them all; a thread's goes with the thread.
        self._connections: weakref.WeakSet[Database] = weakref.WeakSet()
        self.created_versions: dict[int, int] = {}  # shard versions of a store just created
        self._generation = 0  # bumped by close(): a thread's older connection is not reused
        self._guard = threading.Lock()
        # change_counter's own connection (and the generation it was opened in), what it saw
        # last, and the count of changes it saw; one caller at a time.
        self._probe: tuple[Database, int] | None = None
        self._probe_seen: tuple[Any, ...] | None = None
        self._probe_count = 0
        self._probe_guard = threading.Lock()

    # -- lifecycle -----------------------------------------------------------------------------

    @classmethod
    def create(cls, root: str | Path, meta: Mapping[str, Any] | Callable[[], Mapping[str, Any]],
               records: Sequence[NewRecord] | Iterable[Sequence[NewRecord]], shards: int,
               key: bytes | None = None, witness: Path | None = None) -> ShardStore:
        """Create a store holding `records` (or chunks of them, read as they come) and `meta` (or
        what calling it returns once every chunk was written), all in one transaction: a crash
        leaves either a complete store or an incomplete one, which the next `create` replaces. An
        error while the chunks are read (bad input) leaves nothing: not even the directory, if
        this call made it. `key`: a ledger key kept outside the store (the store then holds none);
        `witness`: start a witness of its deletions at that path."""
        root = Path(root)
        if root.exists() and not root.is_dir():
            raise StoreExists(f"{str(root)!r} is a file, not a store directory")
        if (root / DB_NAME).exists():
            if cls._is_complete(root):
                raise StoreExists(f"a store already exists at {str(root)!r}")
        elif root.is_dir() and any(p.name != LOCK_NAME for p in root.iterdir()):
            raise StoreExists(f"{str(root)!r} is not empty and holds no store; give an empty or new "
                              "directory")
        made = not root.exists()
        had_lock = (root / LOCK_NAME).exists()
        chunks = _as_chunks(records)
        root.mkdir(parents=True, exist_ok=True, mode=PRIVATE_DIR)
        root.chmod(PRIVATE_DIR)  # also a directory the user made for it: the store is private
        store = cls(root, key=key, witness=witness)
        if witness is not None:
            _check_witness_path(root, witness)
        try:
            with store.writer():
                if (root / DB_NAME).exists():
                    if cls._is_complete(root):  # another process finished creating it meanwhile
                        raise StoreExists(f"a store already exists at {str(root)!r}")
                    store._wipe()
                # SQLite gives the -wal and -shm files the database file's mode: owner only.
                _private_file(root / DB_NAME)
                _private_file(root / JOURNAL_NAME)
                if key is not None:
                    store._keep_key_outside(key)
                store._migrate()
                (root / CHECKPOINT_DIR).mkdir(exist_ok=True, mode=PRIVATE_DIR)
                try:
                    store._populate(meta, chunks, shards)
                except BaseException:
                    store._wipe()
                    raise
                if witness is not None:
                    store.start_witness()
        except BaseException:
            if made:
                shutil.rmtree(root, ignore_errors=True)
            elif not had_lock:
                (root / LOCK_NAME).unlink(missing_ok=True)
            raise
        return store

    def _populate(self, meta: Mapping[str, Any] | Callable[[], Mapping[str, Any]],
                  chunks: Iterable[Sequence[NewRecord]], shards: int) -> None:
        now = utcnow()
        # A rollback journal while the records go in: in a new database it holds almost nothing,
        # where the WAL would take every page once more (a 250 MB store: 1.3 s against 0.5 s).
        self.conn.execute("PRAGMA journal_mode = DELETE")
        with self.transaction() as conn:
            conn.executemany("INSERT INTO shards (shard, version) VALUES (?, 0)",
                             [(s,) for s in range(shards)])
            # The records' secondary indexes are built once they are all in: faster than keeping
            # them up to date row by row (200,000 records: 1.3 s against 1.8 s).
            indexes = conn.execute("SELECT name, sql FROM sqlite_master WHERE type = 'index' AND "
                                   "tbl_name = 'records' AND sql IS NOT NULL").fetchall()
            for name, _ in indexes:
                conn.execute(f'DROP INDEX "{name}"')
            filled: set[int] = set()
            for chunk in chunks:
                conn.executemany(self._INSERT, [(*r, now) for r in chunk])
                filled.update(r.shard for r in chunk)
            for _, sql in indexes:
                conn.execute(sql)
            conn.executemany("UPDATE shards SET version = version + 1 WHERE shard = ?",
                             [(s,) for s in sorted(filled)])
            for name, value in (meta() if callable(meta) else meta).items():
                conn.execute("INSERT INTO meta (key, value) VALUES (?, ?)",
                             [name, json.dumps(value, sort_keys=True)])
            # The versions the records were written at, read in the same transaction: data
            # kept from them is stale the moment another process changes a shard.
            self.created_versions = self._versions(conn, range(shards))
            conn.execute("INSERT INTO meta (key, value) VALUES (?, 'true')", [COMPLETE])
        self.conn.execute("PRAGMA journal_mode = WAL")

    @classmethod
    def open(cls, root: str | Path, read_only: bool = False, key: bytes | None = None,
             witness: Path | None = None) -> ShardStore:
        """Reopen a store; a writer applies pending schema migrations, a `read_only` store never
        writes (it works where the process may not write) and refuses an older schema. `key` and
        `witness`: as for `create` (a writer starts a witness that does not exist yet)."""
        root = Path(root)
        if root.exists() and not root.is_dir():
            raise StoreNotFound(f"{str(root)!r} is a file, not a store directory")
        if (root / DB_NAME).is_symlink():
            raise SymlinkError(f"{str(root / DB_NAME)!r} is a symbolic link: a store's database is "
                               "never opened through one")
        if not (root / DB_NAME).is_file():
            raise StoreNotFound(f"no store at {str(root)!r}")
        if witness is not None:
            _check_witness_path(root, witness)
        incomplete = StoreIncomplete(
            f"the store at {str(root)!r} is incomplete: its creation was interrupted before its "
            "records were written; create it again (the incomplete store is replaced)")
        if (root / DB_NAME).stat().st_size == 0:
            raise incomplete  # never write a schema into it: only `create` may
        store = cls(root, read_only, key, witness)
        if read_only:
            store._check_version()
        else:
            try:
                empty = current_version(store.conn) == 0
            except sqlite3.DatabaseError as exc:
                raise StoreCorrupt(f"{str(root / DB_NAME)!r} is not a readable SQLite store: "
                                   f"{exc}") from exc
            if empty:
                store.close()
                raise incomplete
            store._migrate()
        if not cls._is_complete(root):
            store.close()
            raise incomplete
        if witness is not None and not read_only and store.get_meta(WITNESSED) is None:
            with store.writer():
                store.start_witness()
        return store

    def _check_version(self) -> None:
        """A read-only store must already be at this code's schema (it cannot migrate)."""
        where = str(self.root / DB_NAME)
        try:
            version = current_version(self.conn)
        except sqlite3.DatabaseError as exc:
            raise StoreCorrupt(f"{where!r} is not a readable SQLite store: {exc}") from exc
        if version == 0:
            raise StoreIncomplete(f"the store at {str(self.root)!r} is incomplete: its creation "
                                  "was interrupted; create it again")
        if version != SCHEMA_VERSION:
            raise StoreVersionError(
                f"{where!r} has schema version {version}; this code reads {SCHEMA_VERSION}. "
                + ("Open it once with write access (any writer command, e.g. recover) to upgrade it"
                   if FIRST_VERSION <= version < SCHEMA_VERSION else
                   "It cannot be read by this version"))

    @staticmethod
    def _is_complete(root: Path) -> bool:
        journal = root / ROLLBACK_JOURNAL
        if journal.exists() and journal.stat().st_size > 0:
            return False  # a creating transaction was interrupted
        try:
            with contextlib.closing(sqlite3.connect(_ro_uri(root / DB_NAME), uri=True)) as conn:
                if current_version(conn) < FIRST_VERSION:
                    return current_version(conn) > 0  # a pre-release store: complete, refused later
                found = conn.execute("SELECT value FROM meta WHERE key = ?", [COMPLETE]).fetchone()
                return found is not None
        except sqlite3.DatabaseError:
            return True  # not ours to wipe: opening it reports the damage

    def _wipe(self) -> None:
        """Remove an incomplete store's files (under the writer lock)."""
        self.close()
        for name in (DB_NAME, f"{DB_NAME}-wal", f"{DB_NAME}-shm", ROLLBACK_JOURNAL, JOURNAL_NAME):
            path = self.root / name
            if path.exists():
                path.unlink()
        shutil.rmtree(self.root / CHECKPOINT_DIR, ignore_errors=True)

    def _migrate(self) -> None:
        where = str(self.root / DB_NAME)
        try:
            was = current_version(self.conn)
            version = migrate(self.conn)
        except sqlite3.DatabaseError as exc:
            raise StoreCorrupt(f"{where!r} is not a readable SQLite store: {exc}") from exc
        if version < FIRST_VERSION:
            raise StoreVersionError(
                f"{where!r} was made by a pre-release version (schema {version}); this version "
                f"reads schema {FIRST_VERSION} and later: create the store again from its data")
        if version > SCHEMA_VERSION:
            raise StoreVersionError(f"{where!r} has schema version {version}, newer than this "
                                    f"code reads ({SCHEMA_VERSION})")
        if was != version:
            if FIRST_VERSION <= was < 5:
                # Schema 4 may have freed deleted records' bytes without zeroing them: rewrite
                # the whole file (secure_delete is on now).
                self.conn.execute("VACUUM")
            # The migration (and the ledger key it made) must not live only in the WAL: a lost
            # WAL would take back the key the journal is keyed with.
            self.truncate_wal()
        if self.get_meta(JOURNAL_STARTED) is None:
            # Schema 4 had no journal (and a crash may have cut its start short): journal every
            # ledger entry it lacks, then say so.
            journalled = {e["request_id"] for e in self.journal()}
            self.journal_log.append([{"request_id": row.request_id, "requested_at": row.requested_at,
                                      "record_digests": row.record_ids}
                                     for row in self.deletions() if row.request_id not in journalled])
            with self.transaction() as conn:
                conn.execute("INSERT OR REPLACE INTO meta (key, value) VALUES (?, 'true')",
                             [JOURNAL_STARTED])

    def _connect(self) -> Database:
        try:
            if self.read_only:
                conn = self._connect_read_only()
            else:
                conn = sqlite3.connect(self.root / DB_NAME, isolation_level=None, timeout=60,
                                       check_same_thread=False)
                conn.execute("PRAGMA journal_mode = WAL")
                conn.execute("PRAGMA synchronous = FULL")  # an acknowledged deletion survives power loss
                conn.execute("PRAGMA secure_delete = ON")  # a deleted record's bytes are zeroed
                conn.execute("PRAGMA foreign_keys = ON")
            conn.execute("PRAGMA cache_size = -65536")  # 64 MiB of pages: shards are read whole
        except sqlite3.DatabaseError as exc:
            raise StoreCorrupt(f"{str(self.root / DB_NAME)!r} is not a readable SQLite store: "
                               f"{exc}") from exc
        # No sqlite-utils plugins: none has any business on a store's connection, and finding
        # them reads the entry points of every installed package, in every process.
        return Database(conn, execute_plugins=False)

    def _connect_read_only(self) -> sqlite3.Connection:
        """A connection that cannot write. Reading a WAL database needs its -shm file: where it is
        missing and this process may not create it, a database with no WAL content (no writer
        has it open) is read as immutable."""
        path = self.root / DB_NAME
        conn = sqlite3.connect(_ro_uri(path), uri=True, isolation_level=None, timeout=60,
                               check_same_thread=False)
        try:
            conn.execute("SELECT 1 FROM sqlite_master LIMIT 1").fetchall()
        except sqlite3.OperationalError:
            conn.close()
            wal = path.with_name(f"{DB_NAME}-wal")
            if wal.exists() and wal.stat().st_size > 0:
                raise StoreError(
                    f"the store at {str(self.root)!r} cannot be read without write access while "
                    "its WAL holds changes (a writer was interrupted): open it once with write "
                    "access (e.g. `recover`), or read it as its owner") from None
            conn = sqlite3.connect(_ro_uri(path) + "&immutable=1", uri=True, isolation_level=None,
                                   check_same_thread=False)
        conn.execute("PRAGMA query_only = ON")
        return conn

    @property
    def db(self) -> Database:
        """This thread's connection (sqlite-utils), opened on first use."""
        db: Database | None = getattr(self._local, "db", None)
        if db is None or getattr(self._local, "generation", None) != self._generation:
            db = self._connect()
            self._local.db, self._local.generation = db, self._generation
            with self._guard:
                self._connections.add(db)
        return db

    @property
    def conn(self) -> sqlite3.Connection:
        return self.db.conn

    def close(self) -> None:
        with self._guard:
            for db in list(self._connections):
                db.close()
            self._connections = weakref.WeakSet()
            self._generation += 1

    def change_counter(self) -> int:
        """A number that grows whenever what a reader of this store reads may have changed since
        the previous call (from any thread): a commit to the database by any connection, of this
        process or another, or a change to the deletion journal or the witness. Equal numbers
        from two calls mean none of that changed between them. It costs a few microseconds: one
        `PRAGMA data_version` and a stat of each file.

        `data_version` moves only for commits by *other* connections, and only when its
        connection starts a read transaction: so it is read on a connection of its own that never
        writes (this object's commits move it too), as a statement of its own, outside any
        transaction, read to the end. A file is compared by inode, size and times: an edit in place
        that keeps its size within the file system's timestamp granularity goes unseen (the
        journal and the witness are only appended to, cut, or replaced whole)."""
        with self._probe_guard:
            probe = self._probe
            if probe is None or probe[1] != self._generation:  # first call, or after close()
                probe = self._probe = (self._connect(), self._generation)
                with self._guard:
                    self._connections.add(probe[0])
                self._probe_seen = None  # a new connection's data_version is not the old one's
            version = probe[0].conn.execute("PRAGMA data_version").fetchall()[0][0]
            seen = (version, _file_state(self.journal_log.path), _file_state(self.witness_path))
            if seen != self._probe_seen:
                self._probe_seen = seen
                self._probe_count += 1
            return self._probe_count

    @property
    def key(self) -> bytes:
        """The ledger key: every keyed digest of this store (tombstones, receipts, seals). Kept in
        the store's meta table, or outside it (given when the store was opened)."""
        if self._key is None:
            self._key = self._find_key()
        return self._key

    @property
    def key_outside(self) -> bool:
        """The ledger key is kept outside the store (a writer of store.db cannot re-seal)."""
        return self.get_meta(KEY_LOCATION) == "external"

    def _find_key(self) -> bytes:
        row = self.conn.execute("SELECT value FROM meta WHERE key = 'ledger_key'").fetchone()
        given = self._given_key
        if row is not None:
            inside = bytes.fromhex(column_json(row[0], "ledger key"))
            if given is not None and given != inside:
                raise StoreKeyError(
                    f"the store at {str(self.root)!r} keeps its own key, and another key was given: "
                    "a store whose key was moved out holds none, so one holding a key again was "
                    "re-keyed by whoever wrote its database")
            return inside
        if not self.key_outside:
            raise StoreCorrupt(f"the store at {str(self.root)!r} holds no ledger key and does not "
                               "say where it is kept: its database was altered")
        if given is None:
            raise StoreKeyError(f"the store at {str(self.root)!r} keeps its key outside it: give "
                                "the key file")
        if key_check(given) != self.get_meta(KEY_CHECK):
            raise StoreKeyError(f"the key given is not the key of the store at {str(self.root)!r}")
        return given

    def _keep_key_outside(self, key: bytes) -> None:
        """A new store whose key is kept outside: the schema (to schema 5) without the key it
        draws, then the rest (every later step of the schema, or of a writer, finds the key
        given)."""
        version = migrate(self.conn, until=5)
        if version != 5:
            raise StoreError(f"a new store's schema is at {version}, not 5")
        with self.transaction() as conn:
            conn.execute("DELETE FROM meta WHERE key = 'ledger_key'")
            conn.executemany("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)",
                             [(KEY_LOCATION, json.dumps("external")),
                              (KEY_CHECK, json.dumps(key_check(key)))])
        self.truncate_wal()  # the key the schema drew is in no file: the page zeroed, the WAL cut

    def move_key_out(self) -> bytes:
        """Remove the ledger key from the store (it keeps a check of it) and return it, for the
        caller to keep elsewhere first: from then on, opening the store needs it."""
        self._require_lock("moving the key out")
        key = self.key
        with self.transaction() as conn:
            conn.execute("DELETE FROM meta WHERE key = 'ledger_key'")
            conn.executemany("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)",
                             [(KEY_LOCATION, json.dumps("external")),
                              (KEY_CHECK, json.dumps(key_check(key)))])
        self._given_key = key
        self.scrub()  # secure_delete zeroed the page; no WAL frame may keep the key
        return key

    def id_digest(self, record_id: str) -> str:
        """The keyed digest a tombstone keeps of a deleted record's id."""
        return keyed(self.key, "id", record_id)

    def truncate_wal(self) -> bool:
        """Copy the WAL into the database and truncate it, so bytes a deletion removed (zeroed by
        secure_delete in the database) stay in no WAL frame. Never waits for a reader (the busy
        handler would, up to the connection's timeout); False if one kept it from completing."""
        if self.read_only:
            return False
        self.conn.execute("PRAGMA busy_timeout = 0")
        try:
            busy = self.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()[0]
        finally:
            self.conn.execute("PRAGMA busy_timeout = 60000")
        return not busy

    def scrub(self) -> bool:
        """Truncate the WAL after a deletion; if a reader prevents it, record that a scrub is owed
        (the audit reports it) and let the next writer try again. Returns whether it is done."""
        if self.read_only:
            return False
        done = self.truncate_wal()
        owed = self.get_meta(SCRUB_OWED) is not None
        if done and owed:
            with self.transaction() as conn:
                conn.execute("DELETE FROM meta WHERE key = ?", [SCRUB_OWED])
            done = self.truncate_wal()
        if not done and not owed:
            with self.transaction() as conn:
                conn.execute("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)",
                             [SCRUB_OWED, json.dumps(utcnow())])
        return done

    def scrub_owed(self) -> str | None:
        """When a WAL truncation after a deletion was first kept from completing (None if none is
        owed)."""
        value = self.get_meta(SCRUB_OWED)
        return str(value) if value is not None else None

    @contextlib.contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """One write transaction, taken at once (`BEGIN IMMEDIATE`), committed or rolled back."""
        conn = self.conn
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield conn
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")

    def copy_to(self, destination: str | Path, witness: Path | None = None) -> ShardStore:
        """A consistent copy of this store at `destination` (which must not exist), taken under
        the writer lock (no retrain or deletion changes files meanwhile): the database through
        SQLite's backup API, every other file as it is; opened with this store's key. `witness`:
        where to put a copy of the witness, if this store keeps one (a copy never writes to the
        original's). For work that changes a store only to measure it (`sisa prove`)."""
        target = Path(destination)
        if target.exists():
            raise StoreError(f"cannot copy the store to {str(target)!r}: it exists")
        with self.writer():
            skip = {DB_NAME, f"{DB_NAME}-wal", f"{DB_NAME}-shm", f"{DB_NAME}-journal", LOCK_NAME}
            shutil.copytree(self.root, target, ignore=lambda d, names: [
                n for n in names if Path(d) == self.root and n in skip])
            out = sqlite3.connect(target / DB_NAME)
            try:
                self.conn.backup(out)
            finally:
                out.close()
            kept = None
            if witness is not None and self.witness_path is not None and self.witness_path.exists():
                shutil.copyfile(self.witness_path, witness)
                kept = witness
        return ShardStore.open(target, key=self._given_key, witness=kept)

    # -- the writer lock -----------------------------------------------------------------------

    @contextlib.contextmanager
    def writer(self, wait: bool = True) -> Iterator[bool]:
        """Exclusive lock for work that retrains or removes files (train, add, forget, recover,
        repair): two processes never retrain one store at once. Re-entrant in a thread. With
        `wait=False` it does not block, and yields whether it got the lock. The holder sweeps
        before it lets go, so files a deletion unregistered meanwhile (its process could not take
        the lock) do not stay behind."""
        depth = getattr(self._local, "lock_depth", 0)
        if depth:
            self._local.lock_depth = depth + 1
            try:
                yield True
            finally:
                self._local.lock_depth = depth
            return
        self.root.mkdir(parents=True, exist_ok=True, mode=PRIVATE_DIR)
        _private_file(self.root / LOCK_NAME)
        with open(self.root / LOCK_NAME, "a+") as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX if wait else fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                yield False
                return
            self._local.lock_depth = 1
            try:
                yield True
                self.sweep()
            finally:
                self._local.lock_depth = 0
                fcntl.flock(handle, fcntl.LOCK_UN)

    @contextlib.contextmanager
    def reading(self) -> Iterator[None]:
        """A shared lock for a reader that must see no writer at work (the audit): writers wait
        for it, and it for them. Needs no write: without a lock file, no writer ever ran."""
        if self.locked:
            yield
            return
        try:
            handle = open(self.root / LOCK_NAME)  # noqa: SIM115 - held for the block
        except FileNotFoundError:
            yield
            return
        with handle:
            fcntl.flock(handle, fcntl.LOCK_SH)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def tidy(self) -> list[str]:
        """Sweep, if no writer is at work (else the writer does before it lets go); returns what
        was removed. (A store opened read-only is tidied too, where this process may remove
        files: the database is not written.)"""
        if not os.access(self.root, os.W_OK) or not os.access(self.root / CHECKPOINT_DIR, os.W_OK):
            return []
        with self.writer(wait=False) as locked:
            return self.sweep() if locked else []

    @property
    def locked(self) -> bool:
        """This thread holds the writer lock."""
        return getattr(self._local, "lock_depth", 0) > 0

    def _require_lock(self, what: str) -> None:
        if not self.locked:
            raise NotLocked(f"{what} needs the store's writer lock")

    # -- meta ------------------------------------------------------------------------------------

    def get_meta(self, key: str) -> Any:
        row = self.conn.execute("SELECT value FROM meta WHERE key = ?", [key]).fetchone()
        return column_json(row[0], f"meta {key!r}") if row else None

    # -- records ---------------------------------------------------------------------------------

    _INSERT = ("INSERT INTO records (id, group_id, digest, shard, slice, order_key, target, text, "
               "features, prior, input_digest, added_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)")

    def insert_records(self, records: Sequence[NewRecord] | Iterable[Sequence[NewRecord]]
                       ) -> dict[int, tuple[int, int]]:
        """Insert placed records, or chunks of them read as they come (all or nothing: an error
        while reading the chunks writes nothing); returns each touched shard's version before and
        after."""
        with self.transaction() as conn:
            now = utcnow()
            shards: set[int] = set()
            for chunk in _as_chunks(records):
                conn.executemany(self._INSERT, [(*r, now) for r in chunk])
                shards.update(r.shard for r in chunk)
            before = self._versions(conn, shards)
            conn.executemany("UPDATE shards SET version = version + 1 WHERE shard = ?",
                             [(s,) for s in sorted(shards)])
            return {s: (before[s], before[s] + 1) for s in sorted(shards)}

    def _chunked(self, sql: str, ids: Iterable[str], params: Sequence[Any] = ()) -> Iterator[dict[str, Any]]:
        """Rows of `sql`, whose `{marks}` stands for the placeholders of up to _CHUNK ids."""
        ids = list(ids)
        for start in range(0, len(ids), _CHUNK):
            chunk = ids[start:start + _CHUNK]
            yield from self.db.query(sql.format(marks=",".join("?" * len(chunk))), [*params, *chunk])

    def find_records(self, ids: Iterable[str]) -> dict[str, RecordRow]:
        """The stored rows (live, or the tombstones of deleted ones) of the given ids that exist,
        by the id given (a tombstone's row holds keyed digests, not the id)."""
        ids = list(dict.fromkeys(ids))
        found = {row["id"]: record_row(row)
                 for row in self._chunked("SELECT * FROM records WHERE id IN ({marks})", ids)}
        by_digest = {self.id_digest(i): i for i in ids if i not in found}
        sql = "SELECT * FROM records WHERE deleted_at IS NOT NULL AND id IN ({marks})"
        for row in self._chunked(sql, by_digest):
            found[by_digest[row["id"]]] = record_row(row)
        return found

    def record_texts(self, ids: Iterable[str]) -> dict[str, tuple[str, str | None]]:
        """(text, target) of the live text records among `ids` (a deleted record's are purged)."""
        sql = ("SELECT id, text, target FROM records WHERE deleted_at IS NULL AND text IS NOT NULL "
               "AND id IN ({marks})")
        return {row["id"]: (row["text"], row["target"]) for row in self._chunked(sql, ids)}

    def groups(self) -> list[str]:
        """The group ids of live records, sorted."""
        sql = "SELECT DISTINCT group_id FROM records WHERE deleted_at IS NULL AND group_id IS NOT NULL"
        return sorted(row[0] for row in self.conn.execute(sql))

    def group_record_ids(self, group_id: str) -> list[str]:
        """The ids of a group's live records."""
        return [r["id"] for r in self.db.query(
            "SELECT id FROM records WHERE group_id = ? AND deleted_at IS NULL ORDER BY id", [group_id])]

    def group_deleted_count(self, group_id: str) -> int:
        """How many of a group's records were deleted (their tombstones key the group)."""
        return int(self.conn.execute(
            "SELECT COUNT(*) FROM records WHERE group_id = ? AND deleted_at IS NOT NULL",
            [keyed(self.key, "group", group_id)]).fetchone()[0])

    def group_shards(self, groups: Sequence[str]) -> dict[str, int]:
        """The shard each of these groups' live records are in (others are absent)."""
        sql = ("SELECT DISTINCT group_id, shard FROM records WHERE deleted_at IS NULL AND "
               "group_id IN ({marks})")
        return {row["group_id"]: row["shard"] for row in self._chunked(sql, groups)}

    def live_records(self, shard: int | None = None) -> Iterator[RecordRow]:
        """Live records in training order: by shard, slice, then order key."""
        where, params = ("AND shard = ?", [shard]) if shard is not None else ("", [])
        sql = (f"SELECT * FROM records WHERE deleted_at IS NULL {where} "
               "ORDER BY shard, slice, order_key, id")
        for row in self.db.query(sql, params):
            yield record_row(row)

    def shard_rows(self, shard: int) -> list[tuple[Any, ...]]:
        """A shard's live records in training order, as plain tuples (this is on the hot path):
        (id, content digest, slice, order key, target, features as float64 bytes or None, text,
        group, prior)."""
        sql = ("SELECT id, digest, slice, order_key, target, features, text, group_id, prior FROM records "
               "WHERE deleted_at IS NULL AND shard = ? ORDER BY slice, order_key, id")
        return self.conn.execute(sql, [shard]).fetchall()

    def record_counts(self) -> dict[int, dict[str, int]]:
        """Per shard: live and deleted record counts."""
        # All records from the placement index, the deleted from the tombstones' (schema 6):
        # neither reads the table's rows.
        total = dict(self.conn.execute(
            "SELECT shard, COUNT(*) FROM records INDEXED BY records_placement GROUP BY shard"))
        deleted = dict(self.conn.execute(
            "SELECT shard, COUNT(*) FROM records WHERE deleted_at IS NOT NULL GROUP BY shard"))
        return {s: {"live": n - deleted.get(s, 0), "deleted": deleted.get(s, 0)}
                for s, n in sorted(total.items())}

    def deleted_digests(self) -> set[str]:
        """The keyed id digests of every deleted record (see `id_digest`)."""
        return {r[0] for r in self.conn.execute("SELECT id FROM records WHERE deleted_at IS NOT NULL")}


    # -- shards ----------------------------------------------------------------------------------

    @staticmethod
    def _versions(conn: sqlite3.Connection, shards: Iterable[int]) -> dict[int, int]:
        wanted = set(shards)
        return {s: v for s, v in conn.execute("SELECT shard, version FROM shards") if s in wanted}

    def shards(self) -> dict[int, ShardRow]:
        """Every shard's version and live checkpoint."""
        return {r["shard"]: ShardRow(r["shard"], r["version"], r["live_key"], r["live_version"])
                for r in self.db.query("SELECT * FROM shards ORDER BY shard")}

    def shard_versions(self, shards: Iterable[int]) -> dict[int, int]:
        return self._versions(self.conn, shards)

    def live(self) -> dict[int, CheckpointRow]:
        """The live checkpoint of every shard that has one."""
        sql = "SELECT c.* FROM shards s JOIN checkpoints c ON c.key = s.live_key ORDER BY s.shard"
        return {r["shard"]: checkpoint_row(r) for r in self.db.query(sql)}

    # -- deletion ledger -------------------------------------------------------------------------

    def acknowledge(self, request_id: str, record_ids: Sequence[str]) -> Acknowledged | None:
        """The acknowledgement of a deletion, in one transaction: write the ledger entry, tombstone
        the records and purge their content and embeddings, and unregister every checkpoint that
        derives from them (those of their shards from the earliest slice they are in; a shard's
        live checkpoint is its last slice, so it goes too). The deletion journal gets the
        request first. After this returns, the deletion survives any crash (and the loss of the
        WAL), and no registered checkpoint holds the records. Ids already deleted are skipped;
        None if no id was live."""
        now = utcnow()
        with self.transaction() as conn:
            live: dict[str, tuple[int, int]] = {}
            for row in self._chunked("SELECT id, shard, slice FROM records WHERE id IN ({marks}) "
                                     "AND deleted_at IS NULL", record_ids):
                live[row["id"]] = (row["shard"], row["slice"])
            ids = [i for i in dict.fromkeys(record_ids) if i in live]
            if not ids:
                return None
            key = self.key
            digests = [keyed(key, "id", i) for i in ids]
            # Durable outside SQLite first: a crash before the commit leaves a journalled
            # deletion the database lacks, which the next writer applies (the request was valid).
            self._journal(request_id, now, digests)
            before, after = self._tombstone(conn, request_id, now, ids, digests, live)
        self.scrub()
        shards = sorted(before)
        return Acknowledged(request_id, now, ids, digests, shards,
                            {s: (before[s], after[s]) for s in shards})

    def _tombstone(self, conn: sqlite3.Connection, request_id: str, now: str, ids: Sequence[str],
                   digests: Sequence[str], live: Mapping[str, tuple[int, int]]
                   ) -> tuple[dict[int, int], dict[int, int]]:
        """Inside the acknowledgement's transaction: the ledger entry, the tombstones, the purge
        of their embeddings and of every checkpoint derived from them. `live`: each id's (shard,
        slice). Returns the affected shards' versions before and after."""
        earliest: dict[int, int] = {}
        for i in ids:
            shard, slice_ = live[i]
            earliest[shard] = min(slice_, earliest.get(shard, slice_))
        shards = sorted(earliest)
        before_rows = {s: r.sha256 for s, r in self.live().items() if s in earliest}
        before = self._versions(conn, shards)
        key = self.key
        conn.execute(
            "INSERT INTO deletions (request_id, record_ids, shards, before, status, requested_at) "
            "VALUES (?, ?, ?, ?, 'pending', ?)",
            [request_id, json.dumps(list(digests)), json.dumps(shards),
             json.dumps({str(s): before_rows.get(s) for s in shards}, sort_keys=True), now])
        # The tombstone: keyed digests of the id, group, content and input, never the values
        # (nor the order key, which anyone with the seed could recompute from a guessed id).
        old = {row["id"]: row for row in self._chunked(
            "SELECT id, group_id, digest, input_digest FROM records WHERE id IN ({marks})", ids)}
        conn.executemany(
            "UPDATE records SET id = ?, group_id = ?, digest = ?, input_digest = ?, deleted_at = ?, "
            "deletion_request = ?, target = NULL, text = NULL, features = NULL, prior = NULL, "
            "order_key = '' WHERE id = ?",
            [(d, _keyed_or_none(key, "group", old[i]["group_id"]),
              keyed(key, "content", old[i]["digest"]),
              _keyed_or_none(key, "input", old[i]["input_digest"]), now, request_id, i)
             for i, d in zip(ids, digests, strict=True)])
        # Embeddings derive from the deleted content: purge them too, unless a live record
        # has the very same input.
        inputs = {row["input_digest"] for row in old.values() if row["input_digest"] is not None}
        conn.executemany(
            "DELETE FROM embeddings WHERE input_digest = ? AND NOT EXISTS (SELECT 1 FROM records "
            "WHERE input_digest = ? AND deleted_at IS NULL)", [(d, d) for d in inputs])
        conn.executemany("UPDATE shards SET live_key = NULL, updated_at = ? WHERE shard = ?",
                         [(now, s) for s in shards])
        for shard, slice_ in earliest.items():
            conn.execute("DELETE FROM checkpoints WHERE shard = ? AND slice >= ?", [shard, slice_])
        return before, self._versions(conn, shards)

    # -- the deletion journal --------------------------------------------------------------------

    def _journal(self, request_id: str, requested_at: str, digests: Sequence[str]) -> None:
        """Journal an acknowledgement (fsynced), and witness it where a witness is kept."""
        entry = {"request_id": request_id, "requested_at": requested_at,
                 "record_digests": list(digests)}
        self.journal_log.append([entry])
        if self.witness_log is not None:
            self.witness_log.append([{"kind": "ack", "store": self.store_id, **entry}])

    def journal_tail(self) -> int:
        """Bytes after the journal's last newline: a line a crash cut short (0 when whole)."""
        return self.journal_log.tail()

    def cut_journal_tail(self) -> None:
        """Cut a line a crash left unfinished (its acknowledgement never committed)."""
        self.journal_log.cut_tail()

    def journal(self) -> list[dict[str, Any]]:
        """The journalled deletions, each checked against its keyed digest (a damaged line is
        StoreCorrupt). A last line cut short is a write a crash interrupted before its
        acknowledgement could commit: ignored."""
        return self.journal_log.entries()

    def journal_missing(self) -> list[dict[str, Any]]:
        """Journalled deletions the database does not hold (its WAL was lost, or it was restored
        from a backup): a writer applies them again on opening; until then nothing may serve."""
        entries = self.journal()
        if not entries:
            return []
        known = {r[0] for r in self.conn.execute("SELECT request_id FROM deletions")}
        return [e for e in entries if e["request_id"] not in known]

    def journal_lacks(self) -> list[str]:
        """Deletions in the database that the journal does not record (it was cut or removed)."""
        journalled = {e["request_id"] for e in self.journal()}
        return sorted(r[0] for r in self.conn.execute("SELECT request_id FROM deletions")
                      if r[0] not in journalled)

    def replay_journal(self) -> list[str]:
        """Acknowledge again, under their own request ids, the deletions the journal (or the
        witness) holds and the database lacks (the records are found by their keyed id digests);
        returns the request ids. A deletion only the witness knew is journalled too."""
        self.cut_journal_tail()
        if not self.journal_missing() and not self.witness_missing():
            return []
        key = self.key
        with self.transaction() as conn:
            # Read again under the write lock: another process may have committed its own
            # journalled deletion meanwhile.
            missing = {e["request_id"]: e for e in [*self.witness_missing(), *self.journal_missing()]}
            journalled = {e["request_id"] for e in self.journal()}
            self.journal_log.append([e for r, e in missing.items() if r not in journalled])
            by_digest = {keyed(key, "id", r[0]): r[0] for r in conn.execute(
                "SELECT id FROM records WHERE deleted_at IS NULL")} if missing else {}
            for entry in sorted(missing.values(), key=lambda e: (e["requested_at"], e["request_id"])):
                ids = [by_digest[d] for d in entry["record_digests"] if d in by_digest]
                live = {row["id"]: (row["shard"], row["slice"]) for row in self._chunked(
                    "SELECT id, shard, slice FROM records WHERE deleted_at IS NULL AND id IN ({marks})",
                    ids)}
                ids = [i for i in ids if i in live]
                self._tombstone(conn, entry["request_id"], entry["requested_at"], ids,
                                [keyed(key, "id", i) for i in ids], live)
        self.scrub()
        return sorted(missing)

    # -- healing ---------------------------------------------------------------------------------

    def rebuild_journal(self) -> list[str]:
        """Write the journal again if it was cut, removed, damaged or replaced by a link: its sound
        lines, and every deletion the ledger or the witness holds. Returns what was wrong ([] if
        nothing)."""
        self._require_lock("rebuilding the journal")
        wrong = []
        path = self.journal_log.path
        if path.is_symlink():
            path.unlink()  # the link, never what it points to
            wrong.append("it was a symbolic link")
        entries, damaged = self.journal_log.read()
        if damaged:
            wrong.append(f"{len(damaged)} damaged line(s)")
        known = {e["request_id"]: e for e in entries}
        lacking = []
        for row in self.deletions():
            if row.request_id not in known:
                lacking.append(row.request_id)
                known[row.request_id] = {"request_id": row.request_id, "requested_at": row.requested_at,
                                         "record_digests": row.record_ids}
        for e in self.witness_acks():
            if e["request_id"] not in known:
                lacking.append(e["request_id"])
                known[e["request_id"]] = {k: e[k] for k in JOURNAL_FIELDS}
        if lacking:
            wrong.append(f"{len(lacking)} deletion(s) missing")
        if wrong:
            self.journal_log.rewrite(sorted(known.values(),
                                            key=lambda e: (e["requested_at"], e["request_id"])))
        return wrong

    def reappeared(self) -> dict[str, str]:
        """Live records whose keyed id digest a deletion already names (a deleted record that was
        inserted again, by hand or with a restored table): id -> the deletion's request id."""
        deleted = {}
        for row in self.deletions():
            for digest in row.record_ids:
                deleted[digest] = row.request_id
        if not deleted:
            return {}
        key = self.key
        live = self.conn.execute("SELECT id FROM records WHERE deleted_at IS NULL").fetchall()
        digests = ((r[0], keyed(key, "id", r[0])) for r in live)
        return {i: deleted[d] for i, d in digests if d in deleted}

    def retombstone(self) -> list[str]:
        """Delete again every record that reappeared after its deletion: its row goes (its
        tombstone stays), with its content and any embedding only it had; its shard retrains
        (the row's removal bumps the shard's version). Returns the ids."""
        back = self.reappeared()
        if not back:
            return []
        with self.transaction() as conn:
            inputs = {row["input_digest"] for row in self._chunked(
                "SELECT input_digest FROM records WHERE id IN ({marks})", back) if row["input_digest"]}
            for chunk_start in range(0, len(back), _CHUNK):
                ids = list(back)[chunk_start:chunk_start + _CHUNK]
                conn.execute(f"DELETE FROM records WHERE id IN ({','.join('?' * len(ids))})", ids)
            conn.executemany(
                "DELETE FROM embeddings WHERE input_digest = ? AND NOT EXISTS (SELECT 1 FROM records "
                "WHERE input_digest = ? AND deleted_at IS NULL)", [(d, d) for d in inputs])
            conn.execute("UPDATE shards SET live_key = NULL WHERE live_key IS NOT NULL AND "
                         "live_version != version")
        self.scrub()
        return sorted(back)

    def reset_receipts(self) -> list[str]:
        """Pending deletions that still hold a sound receipt and their place in the chain (an
        applied deletion's status reset by hand): applied again as they were, so the chain stays
        whole. Returns their request ids."""
        fixed = []
        for row in self.pending_deletions():
            receipt = row.receipt
            seq, digest = self.chain_positions().get(row.request_id, (None, None))
            if receipt is None or seq is None or receipt.get("sequence") != seq:
                continue
            if self.receipt_digest(receipt) != receipt.get("digest") or digest != receipt.get("digest"):
                continue
            with self.transaction() as conn:
                conn.execute("UPDATE deletions SET status = 'applied', applied_at = ? WHERE "
                             "request_id = ? AND status = 'pending'",
                             [receipt.get("applied_at") or utcnow(), row.request_id])
            fixed.append(row.request_id)
        return fixed

    # -- the witness -----------------------------------------------------------------------------

    @property
    def store_id(self) -> str:
        """This store's identity (a witness names the store it witnesses)."""
        return str(self.get_meta(STORE_ID))

    def witness_entries(self) -> list[dict[str, Any]]:
        """The witness's lines ([] where none is kept); one of another store, or damaged, is a
        WitnessError."""
        log = self.witness_log
        if log is None:
            return []
        if log.path.is_symlink():
            raise WitnessError(f"the witness {str(log.path)!r} is a symbolic link: give its real path")
        if not log.path.exists():
            if self.get_meta(WITNESSED) is not None:
                raise WitnessError(f"this store keeps a witness, and {str(log.path)!r} does not exist: "
                                   "give the witness's path")
            return []
        try:
            entries, damaged = log.read()
        except OSError as exc:
            raise WitnessError(f"the witness {str(log.path)!r} cannot be read: {exc}") from None
        if damaged:
            first = log.first() or {}
            if first.get("store") not in (None, self.store_id):
                raise WitnessError(f"{str(log.path)!r} is the witness of another store")
            raise WitnessError(f"the witness {str(log.path)!r} line {damaged[0]} is damaged, edited, "
                               "or was written with another key")
        other = [e for e in entries if e.get("store") != self.store_id]
        if other:
            raise WitnessError(f"{str(log.path)!r} is the witness of another store")
        started = self.get_meta(WITNESSED)
        starts = [e.get("witness") for e in entries if e.get("kind") == "start"]
        if started is not None and starts and starts[0] != started.get("witness"):
            raise WitnessError(f"{str(log.path)!r} is another witness of this store than the one "
                               "it keeps")
        return entries

    def witness_acks(self) -> list[dict[str, Any]]:
        return [e for e in self.witness_entries() if e.get("kind") == "ack"]

    def witness_missing(self) -> list[dict[str, Any]]:
        """Witnessed deletions the database lacks (a backup was restored, or its WAL lost): a
        writer applies them again on opening; until then nothing may serve."""
        acks = self.witness_acks()
        if not acks:
            return []
        known = {r[0] for r in self.conn.execute("SELECT request_id FROM deletions")}
        return [{k: e[k] for k in JOURNAL_FIELDS} for e in acks if e["request_id"] not in known]

    def witness_problems(self) -> list[str]:
        """What the witness says the store lacks: deletions, and the receipts it saw applied."""
        problems = [f"deletion {e['request_id']} was acknowledged (the witness holds it) but the "
                    "database lacks it: the store was restored from a backup or lost its WAL"
                    for e in self.witness_missing()]
        applied = [e for e in self.witness_entries() if e.get("kind") == "applied"]
        if applied:
            last = applied[-1]
            mine = {seq: digest for seq, digest in self.chain_positions().values()}
            if last["sequence"] not in mine:
                problems.append(f"the witness saw receipt {last['sequence']} applied; the store's "
                                f"receipt chain ends at {max(mine, default=0)}: it was restored "
                                "from a backup or its ledger cut")
            elif mine[last["sequence"]] != last["head"]:
                problems.append(f"the store's receipt {last['sequence']} is not the one the witness "
                                "saw: its ledger was rewritten")
        return problems

    def start_witness(self) -> None:
        """Start keeping the witness: every deletion and receipt the store holds now is written to
        it first; a witness that exists already must be this store's (one restored with an older
        copy of the store is adopted: it then says what the copy lacks)."""
        self._require_lock("starting a witness")
        log = self.witness_log
        if log is None:
            return
        started = self.get_meta(WITNESSED)
        if log.exists():
            entries = self.witness_entries()
            start = next((e for e in entries if e.get("kind") == "start"), None)
            if started is None and start is not None:
                with self.transaction() as conn:
                    conn.execute("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)",
                                 [WITNESSED, json.dumps({"witness": start["witness"],
                                                         "started": start["started"]})])
            return
        if started is not None:
            raise WitnessError(f"this store keeps a witness, and {str(log.path)!r} does not exist: "
                               "give the witness's path")
        begun = {"witness": uuid.uuid4().hex, "started": utcnow()}
        lines: list[dict[str, Any]] = [{"kind": "start", "store": self.store_id, **begun}]
        lines += [{"kind": "ack", "store": self.store_id, "request_id": r.request_id,
                   "requested_at": r.requested_at, "record_digests": r.record_ids}
                  for r in self.deletions()]
        lines += self._applied_lines(0)
        log.append(lines)
        with self.transaction() as conn:
            conn.execute("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)",
                         [WITNESSED, json.dumps(begun)])

    def _applied_lines(self, after: int) -> list[dict[str, Any]]:
        """Witness lines of the chained receipts after sequence `after`."""
        positions = sorted((seq, rid, digest) for rid, (seq, digest) in self.chain_positions().items())
        return [{"kind": "applied", "store": self.store_id, "request_id": rid, "sequence": seq,
                 "head": digest} for seq, rid, digest in positions if seq > after]

    def catch_up_witness(self) -> None:
        """Witness what the store holds and the witness does not (a writer crashed between a
        commit and its witness line): acknowledgements, then receipts."""
        log = self.witness_log
        if log is None:
            return
        entries = self.witness_entries()
        acked = {e["request_id"] for e in entries if e.get("kind") == "ack"}
        lines: list[dict[str, Any]] = [
            {"kind": "ack", "store": self.store_id, "request_id": r.request_id,
             "requested_at": r.requested_at, "record_digests": r.record_ids}
            for r in self.deletions() if r.request_id not in acked]
        seen = [e["sequence"] for e in entries if e.get("kind") == "applied"]
        lines += self._applied_lines(seen[-1] if seen else 0)
        log.append(lines)

    def require_witness(self) -> None:
        """A writer of a store that keeps a witness must have it (an acknowledgement the witness
        never saw would be lost with a restored backup)."""
        started = self.get_meta(WITNESSED)
        if started is not None and self.witness_log is None:
            raise WitnessError(f"the store at {str(self.root)!r} keeps a witness of its deletions "
                               f"(since {started.get('started')}): give its path")

    def pending_deletions(self) -> list[DeletionRow]:
        return [deletion_row(r) for r in self.db.query(
            "SELECT * FROM deletions WHERE status = 'pending' ORDER BY requested_at, request_id")]

    def pending_shards(self) -> set[int]:
        """Shards with a deletion acknowledged but not applied: never serve from them."""
        return {s for d in self.pending_deletions() for s in d.shards}

    def deletion(self, request_id: str) -> DeletionRow | None:
        rows = list(self.db.query("SELECT * FROM deletions WHERE request_id = ?", [request_id]))
        return deletion_row(rows[0]) if rows else None

    def deletions(self) -> list[DeletionRow]:
        return [deletion_row(r) for r in self.db.query(
            "SELECT * FROM deletions ORDER BY requested_at, request_id")]

    def deletion_count(self) -> int:
        return int(self.conn.execute("SELECT COUNT(*) FROM deletions").fetchone()[0])

    # -- embedding cache -------------------------------------------------------------------------

    def get_embeddings(self, model: str, digests: Sequence[str]) -> dict[str, bytes]:
        """Cached vectors (float32 bytes) of these input digests under one encoder fingerprint."""
        sql = "SELECT input_digest, vector FROM embeddings WHERE model = ? AND input_digest IN ({marks})"
        return {row["input_digest"]: row["vector"]
                for row in self._chunked(sql, dict.fromkeys(digests), [model])}

    def put_embeddings(self, model: str, dim: int, vectors: Mapping[str, bytes]) -> None:
        """Cache vectors; never one of an input only deleted records had (a deletion may have been
        acknowledged while the vector was being computed). A read-only store caches nothing."""
        if self.read_only:
            return
        key = self.key
        with self.transaction() as conn:
            conn.executemany(
                "INSERT OR REPLACE INTO embeddings (model, input_digest, dim, vector) "
                f"SELECT ?, ?, ?, ? WHERE NOT ({self._DELETED_ONLY})",
                [(model, d, dim, v, keyed(key, "input", d), d) for d, v in vectors.items()])

    # An input digest (keyed, then plain) that deleted records have and no live record has.
    _DELETED_ONLY = ("EXISTS (SELECT 1 FROM records WHERE input_digest = ? AND deleted_at IS NOT NULL) "
                     "AND NOT EXISTS (SELECT 1 FROM records WHERE input_digest = ? AND deleted_at IS NULL)")

    def deleted_embeddings(self) -> int:
        """Cached vectors of inputs that only deleted records had (there should be none)."""
        key = self.key
        deleted = {r[0] for r in self.conn.execute(
            "SELECT input_digest FROM records WHERE deleted_at IS NOT NULL AND input_digest IS NOT NULL")}
        if not deleted:
            return 0
        live = {r[0] for r in self.conn.execute(
            "SELECT input_digest FROM records WHERE deleted_at IS NULL AND input_digest IS NOT NULL")}
        return sum(1 for (d,) in self.conn.execute("SELECT input_digest FROM embeddings")
                   if d not in live and keyed(key, "input", d) in deleted)

    def embedding_count(self, model: str | None = None) -> int:
        where, params = ("WHERE model = ?", [model]) if model else ("", [])
        return int(self.conn.execute(f"SELECT COUNT(*) FROM embeddings {where}", params).fetchone()[0])

    def copy_embeddings_from(self, other: str | Path) -> int:
        """Seed this store's embedding cache from another store's (same keys, same vectors)."""
        other_db = Path(other) / DB_NAME
        if not other_db.is_file():
            raise StoreNotFound(f"no store at {str(other)!r} to copy embeddings from")
        before = self.embedding_count()
        self.conn.execute("ATTACH DATABASE ? AS other", [str(other_db)])
        try:
            with self.transaction() as conn:
                conn.execute("INSERT OR IGNORE INTO embeddings SELECT * FROM other.embeddings")
        finally:
            self.conn.execute("DETACH DATABASE other")
        return self.embedding_count() - before

    # -- checkpoints -----------------------------------------------------------------------------

    def register_checkpoint(self, shard: int, version: int, key: str, slice_: int, parent: str | None,
                            blobs: Mapping[str, bytes], weights: str,
                            record_count: int) -> CheckpointRow | None:
        """Write a checkpoint's files (`blobs`: name -> bytes; `weights` names the weights file),
        then register them, if the shard is still at `version` (else the records it was trained
        on have changed meanwhile: None is returned, and `sweep` removes the files)."""
        self._require_lock("writing checkpoints")
        relative = f"{CHECKPOINT_DIR}/{files.dirname(shard, slice_, key)}"
        digests = files.write_dir(self.root, relative, blobs)
        row: dict[str, Any] = {
            "key": key, "shard": shard, "slice": slice_, "parent": parent, "path": relative,
            "sha256": digests[weights], "files": json.dumps(digests, sort_keys=True),
            "record_count": record_count, "created_at": utcnow()}
        row["seal"] = keyed(self.key, "seal", seal_text(row))
        with self.transaction() as conn:
            if self._versions(conn, [shard]).get(shard) == version:
                conn.execute("INSERT OR REPLACE INTO checkpoints (key, shard, slice, parent, path, "
                             "sha256, files, record_count, created_at, seal) VALUES (:key, :shard, "
                             ":slice, :parent, :path, :sha256, :files, :record_count, :created_at, "
                             ":seal)", row)
                return checkpoint_row(row)
        return None

    def sealed(self, row: CheckpointRow) -> bool:
        """The checkpoint's registration (its files' sha256 included) is as it was written: no
        one without the ledger key changed it."""
        return row.seal is not None and row.seal == keyed(self.key, "seal", seal_text(row))

    def integrity(self) -> list[str]:
        """SQLite's own check of every page of the database ([] when sound)."""
        found = [r[0] for r in self.conn.execute("PRAGMA quick_check(20)")]
        return [] if found == ["ok"] else found

    def symlinks(self) -> list[str]:
        """Every symbolic link in the store directory, relative to it (none belongs there)."""
        return files.symlinks(self.root)

    def remove_symlinks(self) -> list[str]:
        """Unlink every symbolic link in the store (the link, never what it points to)."""
        self._require_lock("removing links")
        found = self.symlinks()
        for relative in found:
            (self.root / relative).unlink()
        return found

    def loose_modes(self) -> list[str]:
        """The store directory and files in it that others than the owner may write, with their
        mode (a store is created owner-only; someone loosened it)."""
        found = []
        for top, dirs, names in os.walk(self.root, followlinks=False):
            for path in [Path(top)] + [Path(top) / n for n in [*dirs, *names]]:
                if path.is_symlink() or (path != Path(top) and path.is_dir()):
                    continue  # a link is reported as one; a directory when the walk reaches it
                mode = path.stat().st_mode
                if mode & (stat.S_IWGRP | stat.S_IWOTH):
                    found.append(f"{path} ({stat.filemode(mode)})")
        return found

    def remove_strays(self) -> list[str]:
        """Remove what is in the store directory and not part of the store (it may hold a deleted
        record); a link is unlinked, never followed."""
        self._require_lock("removing stray files")
        found = self.stray_files()
        for name in found:
            files.remove(self.root, name)
        return found

    def stray_files(self) -> list[str]:
        """Entries in the store directory that are not the store's own (anything may hide there)."""
        return sorted(p.name for p in self.root.iterdir() if p.name not in STORE_FILES)

    def checkpoint(self, key: str) -> CheckpointRow | None:
        rows = list(self.db.query("SELECT * FROM checkpoints WHERE key = ?", [key]))
        return checkpoint_row(rows[0]) if rows else None

    def checkpoints(self, shard: int | None = None) -> list[CheckpointRow]:
        where, params = ("WHERE shard = ?", [shard]) if shard is not None else ("", [])
        return [checkpoint_row(r) for r in self.db.query(
            f"SELECT * FROM checkpoints {where} ORDER BY shard, slice, key", params)]

    def checkpoint_count(self) -> int:
        return int(self.conn.execute("SELECT COUNT(*) FROM checkpoints").fetchone()[0])

    def read_files(self, row: CheckpointRow, names: Sequence[str]) -> dict[str, bytes]:
        """The verified bytes of some of a checkpoint's files."""
        return files.read_files(self.root, row.path, row.files, names)

    def verify_files(self, row: CheckpointRow) -> None:
        """Every file of the checkpoint is present, intact, and no other file is there."""
        files.verify_dir(self.root, row.path, row.files)

    def commit(self, shards: Mapping[int, ShardCommit],
               receipts: Mapping[str, Mapping[str, Any]] | None = None) -> Committed:
        """In one transaction: swap the live checkpoint of every shard still at its planned
        version, unregister its checkpoints that are no longer wanted, and mark applied, with its
        receipt, each pending request in `receipts` whose shards are now all current. Each
        receipt joins the chain: its sequence number, the time, the digest of the receipt before
        and its own keyed digest are added. (`sweep` then removes the files of what was
        unregistered.)"""
        self._require_lock("committing checkpoints")
        now = utcnow()
        with self.transaction() as conn:
            versions = self._versions(conn, shards)
            done = {s for s, c in shards.items() if versions.get(s) == c.version}
            dropped = 0
            for s in sorted(done):
                c = shards[s]
                conn.execute("UPDATE shards SET live_key = ?, live_version = ?, updated_at = ? "
                             "WHERE shard = ?", [c.live_key, c.version, now, s])
                for (key,) in conn.execute("SELECT key FROM checkpoints WHERE shard = ?", [s]).fetchall():
                    if key not in c.keep:
                        dropped += conn.execute("DELETE FROM checkpoints WHERE key = ?", [key]).rowcount
            current = {r[0] for r in conn.execute(
                "SELECT shard FROM shards WHERE live_key IS NOT NULL AND live_version = version")}
            applied, chained = [], {}
            for request_id, receipt in (receipts or {}).items():
                row = conn.execute("SELECT shards FROM deletions WHERE request_id = ? AND "
                                   "status = 'pending'", [request_id]).fetchone()
                if row is not None and set(json.loads(row[0])) <= current:
                    seq, previous = conn.execute(
                        "SELECT COALESCE(MAX(seq), 0) + 1, (SELECT receipt_digest FROM deletions "
                        "WHERE seq = (SELECT MAX(seq) FROM deletions)) FROM deletions").fetchone()
                    body = {**receipt, "sequence": seq, "previous": previous, "applied_at": now}
                    digest = self.receipt_digest(body)
                    chained[request_id] = {**body, "digest": digest}
                    conn.execute("UPDATE deletions SET status = 'applied', applied_at = ?, receipt = ?, "
                                 "seq = ?, receipt_digest = ? WHERE request_id = ?",
                                 [now, _canonical(chained[request_id]), seq, digest, request_id])
                    applied.append(request_id)
        if applied:
            self.scrub()
            if self.witness_log is not None:  # after the commit: a crash before is caught up
                self.witness_log.append([{"kind": "applied", "store": self.store_id, "request_id": r,
                                          "sequence": chained[r]["sequence"],
                                          "head": chained[r]["digest"]} for r in applied])
        return Committed(done, applied, dropped, chained)

    def receipt_digest(self, body: Mapping[str, Any]) -> str:
        """The keyed digest of a receipt (every field but `digest`)."""
        return keyed(self.key, "receipt", _canonical({k: v for k, v in body.items() if k != "digest"}))

    def orphan_tombstones(self) -> int:
        """Tombstones whose deletion request is not in the ledger (there should be none)."""
        return int(self.conn.execute(
            "SELECT COUNT(*) FROM records r WHERE deleted_at IS NOT NULL AND NOT EXISTS "
            "(SELECT 1 FROM deletions d WHERE d.request_id = r.deletion_request)").fetchone()[0])

    def chain_positions(self) -> dict[str, tuple[int, str | None]]:
        """request id -> (sequence number, receipt digest) of every ledger entry that holds a place
        in the receipt chain, as its columns store them."""
        return {r[0]: (r[1], r[2]) for r in self.conn.execute(
            "SELECT request_id, seq, receipt_digest FROM deletions WHERE seq IS NOT NULL")}

    def tombstones_of(self, request_id: str, digests: Sequence[str]) -> set[str]:
        """Which of these keyed id digests are tombstones that this deletion request made."""
        if not digests:
            return set()
        return {r["id"] for r in self._chunked(
            "SELECT id FROM records WHERE deleted_at IS NOT NULL AND deletion_request = ? AND "
            "id IN ({marks})", digests, [request_id])}

    def drop_checkpoints(self, keys: Iterable[str]) -> int:
        """Unregister checkpoints (a shard whose live checkpoint goes has none until retrained);
        `sweep` then removes their files."""
        self._require_lock("removing checkpoints")
        keys = list(keys)
        with self.transaction() as conn:
            conn.executemany("UPDATE shards SET live_key = NULL WHERE live_key = ?", [(k,) for k in keys])
            return sum(conn.execute("DELETE FROM checkpoints WHERE key = ?", [k]).rowcount
                       for k in keys)

    def unregistered(self) -> list[str]:
        """Files and directories under checkpoints/ that the database does not register."""
        registered = {r[0] for r in self.conn.execute("SELECT path FROM checkpoints")}
        return [p for p in files.entries(self.root, CHECKPOINT_DIR) if p not in registered]

    def sweep(self) -> list[str]:
        """Remove everything under checkpoints/ that the database does not register: files of
        checkpoints a transaction unregistered, and temporaries of a write that was cut short."""
        self._require_lock("removing files")
        removed = self.unregistered()
        for relative in removed:
            files.remove(self.root, relative)
        return removed

