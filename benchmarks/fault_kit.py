"""What the fault harness's two halves share: the small fixture store and its rows, and the CLI run
as a subprocess (to its end, or killed). The data, the killer and the store's file checks are the
fault kit's (`sisa.testing`), which the tests use too.
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sisa import Sisa
from sisa.testing import SPEC, TRAIN_FLAGS, derived_from, killer, make_rows, small_config, write_csv
from sisa.testing import store_snapshot as tree_digest

STORE = "shard_store.store:ShardStore"
CONFIG = small_config()
TIMEOUT = 600  # seconds for any one CLI process
__all__ = ["STORE", "TRAIN_FLAGS", "Fixture", "Run", "build_fixture", "derived_from", "killed_after",
           "killed_at", "sisa_cli", "tree_digest", "write_csv"]


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
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
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
    """`sisa argv` as a fresh process that dies of SIGKILL at a named step (sisa.testing.killer)."""
    return _run(killer.command(point, *argv))


def killed_after(delay: float, *argv: str) -> Run:
    """`sisa argv` as a fresh process, sent SIGKILL after `delay` seconds unless done by then."""
    return _run([sys.executable, "-m", "sisa.cli", *argv], delay=delay)


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
                self.scratch[key] = {s: row.sha256 for s, row in sisa.live_checkpoints().items()}
            shutil.rmtree(where.parent)
        return self.scratch[key]


def build_fixture(work: Path) -> Fixture:
    rows, new_rows = make_rows(90), make_rows(20, seed=5, prefix="n")
    base = work / "base"
    with Sisa.train(base, rows, CONFIG, SPEC) as sisa:
        first: dict[tuple[int, int], str] = {}  # (shard, slice) -> the first record there
        for r in sisa.live_records():
            first.setdefault((r.shard, r.slice), r.id)
        shas = {s: row.sha256 for s, row in sisa.live_checkpoints().items()}
        checkpoints = [row.path for row in sisa.checkpoints()]
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

