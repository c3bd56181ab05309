"""What the fault harness's two halves share: the small fixture store and its rows, the CLI run as
a subprocess (to its end, or killed), and reading a store's files (digests, derived checkpoints).
"""

from __future__ import annotations

import hashlib
import json
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sisa import DataSpec, ExecutionConfig, MLPConfig, PartitionConfig, Sisa, SisaConfig

ROOT = Path(__file__).resolve().parents[1]
KILLER = ROOT / "tests" / "killer.py"
STORE = "shard_store.store:ShardStore"
FEATURES = ("f0", "f1", "f2", "f3")
SPEC = DataSpec(id_column="id", label_column="label", feature_columns=FEATURES, group_column="user")
CONFIG = SisaConfig(partition=PartitionConfig(shards=3, slices=3, seed=11),
                    training=MLPConfig(epochs_per_slice=2, batch_size=8, hidden_sizes=(8,)),
                    execution=ExecutionConfig(progress=False))
TRAIN_FLAGS = ["--id-column", "id", "--label-column", "label", "--feature-columns", "f0,f1,f2,f3",
               "--group-column", "user", "--shards", "3", "--slices", "3", "--epochs", "2",
               "--batch-size", "8", "--hidden-sizes", "8", "--seed", "11", "--no-progress"]
TIMEOUT = 600  # seconds for any one CLI process


def numeric_rows(n: int, seed: int = 7, prefix: str = "r") -> list[dict[str, Any]]:
    """Three separable-ish classes, 10 records per user (as tests/conftest.make_rows)."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        label = i % 3
        row: dict[str, Any] = {"id": f"{prefix}{i:04d}", "label": label, "user": f"u{i // 10}"}
        for j, name in enumerate(FEATURES):
            row[name] = rng.gauss(1.5 * label if j == label else 0.0, 1.0)
        rows.append(row)
    return rows


def write_csv(path: Path, rows: list[dict[str, Any]]) -> Path:
    import csv

    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


# -- processes -------------------------------------------------------------------------------------

@dataclass
class Run:
    """One CLI process: killed (SIGKILL), completed (exit 0) or failed (another exit status)."""

    outcome: str
    returncode: int
    stderr: str
    seconds: float

    @property
    def message(self) -> str:
        lines = [line for line in self.stderr.strip().splitlines() if line.strip()]
        return lines[-1][:300] if lines else ""

    @property
    def traceback(self) -> bool:
        return "Traceback (most recent call last)" in self.stderr


def _run(cmd: list[str], delay: float | None = None) -> Run:
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if delay is not None:
        try:
            proc.wait(timeout=delay)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGKILL)
    try:
        _, err = proc.communicate(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        proc.kill()
        _, err = proc.communicate()
        return Run("timeout", -1, err, time.perf_counter() - started)
    code = proc.returncode
    outcome = "killed" if code == -signal.SIGKILL else "completed" if code == 0 else "failed"
    return Run(outcome, code, err, time.perf_counter() - started)


def sisa_cli(*argv: str) -> Run:
    """`sisa argv` as a fresh process, to its end."""
    return _run([sys.executable, "-m", "sisa.cli", *argv])


def killed_at(point: str, *argv: str) -> Run:
    """`sisa argv` as a fresh process that dies of SIGKILL at a named step (tests/killer.py)."""
    return _run([sys.executable, str(KILLER), point, "--", *argv])


def killed_after(delay: float, *argv: str) -> Run:
    """`sisa argv` as a fresh process, sent SIGKILL after `delay` seconds unless done by then."""
    return _run([sys.executable, "-m", "sisa.cli", *argv], delay=delay)


# -- reading a store -------------------------------------------------------------------------------

def tree_digest(store: Path) -> dict[str, str]:
    """sha256 of every file under the store: store.db-shm aside (readers may rewrite it), and an
    empty store.db-wal counts as none (SQLite creates one when a reader opens the database)."""
    if not store.is_dir():
        return {}
    return {str(p.relative_to(store)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(store.rglob("*")) if p.is_file() and p.name != "store.db-shm"
            and not (p.name == "store.db-wal" and p.stat().st_size == 0)}


def derived_from(store: Path, ids: set[str]) -> list[str]:
    """Checkpoint directories on disk (registered or not) whose records, followed through the
    parents' manifests on disk, hold one of `ids`; one whose chain cannot be followed, one with
    no manifest, and any temporary count too (nothing on disk proves them clean)."""
    top = store / "checkpoints"
    if not top.is_dir():
        return sorted(str(p) for p in store.rglob(".tmp-*"))
    manifests: dict[str, tuple[Path, str | None, set[str]]] = {}
    bad = []
    for path in top.rglob("manifest.json"):
        try:
            m = json.loads(path.read_text())
            manifests[m["key"]] = (path.parent, m["parent"], set(m["records"]))
        except (ValueError, KeyError, TypeError):
            bad.append(str(path.parent))
    bad += [str(p) for p in top.glob("*/*") if not (p / "manifest.json").is_file()]
    bad += [str(p) for p in store.rglob(".tmp-*")]
    for directory, parent, records in manifests.values():
        seen = set(records)
        while parent is not None and parent in manifests:
            _, parent, more = manifests[parent]
            seen |= more
        if parent is not None or seen & ids:
            bad.append(str(directory))
    return sorted(set(bad))


# -- the fixture -----------------------------------------------------------------------------------

@dataclass
class Fixture:
    work: Path
    rows: list[dict[str, Any]]
    new_rows: list[dict[str, Any]]
    train_csv: Path
    new_csv: Path
    base: Path  # trained on `rows`
    victims: list[tuple[str, list[str], list[str]]]  # (name, forget arguments, ids deleted)
    checkpoints: list[str]  # the base store's checkpoint directories, relative to the store
    scratch: dict[frozenset[str], dict[int, str]] = field(default_factory=dict)
    durations: dict[str, float] = field(default_factory=dict)

    def scratch_shas(self, ids: set[str]) -> dict[int, str]:
        """Live weights' sha256 per shard of a store trained from scratch on exactly `ids`."""
        key = frozenset(ids)
        if key not in self.scratch:
            where = Path(tempfile.mkdtemp(dir=self.work, prefix="scratch-")) / "store"
            rows = [r for r in self.rows + self.new_rows if r["id"] in ids]
            with Sisa.train(where, rows, CONFIG, SPEC) as sisa:
                self.scratch[key] = {s: row.sha256 for s, row in sisa.store.live().items()}
            shutil.rmtree(where.parent)
        return self.scratch[key]


def build_fixture(work: Path) -> Fixture:
    rows, new_rows = numeric_rows(90), numeric_rows(20, seed=5, prefix="n")
    base = work / "base"
    with Sisa.train(base, rows, CONFIG, SPEC) as sisa:
        first: dict[tuple[int, int], str] = {}  # (shard, slice) -> the first record there
        for r in sisa.store.live_records():
            first.setdefault((r.shard, r.slice), r.id)
        shas = {s: row.sha256 for s, row in sisa.store.live().items()}
        checkpoints = [row.path for row in sisa.store.checkpoints()]
    groups = {"u2": [r["id"] for r in rows if r["user"] == "u2"],
              "u5": [r["id"] for r in rows if r["user"] == "u5"]}
    id_sets = {"one id, slice 0": [first[0, 0]], "one id, last slice": [first[1, 2]],
               "two ids, two shards": [first[0, 1], first[2, 2]],
               "three ids, every shard": [first[0, 2], first[1, 1], first[2, 0]]}
    victims = [(name, ids, ids) for name, ids in id_sets.items()]
    victims += [(f"group {g}", ["--group", g], ids) for g, ids in groups.items()]
    fx = Fixture(work, rows, new_rows, write_csv(work / "train.csv", rows),
                 write_csv(work / "new.csv", new_rows), base, victims, checkpoints)
    fx.scratch[frozenset(r["id"] for r in rows)] = shas
    return fx

