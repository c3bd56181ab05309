"""Running the `sisa` CLI as users do, a fresh process per command, for the end-to-end and scaling
benchmarks: its wall time, its peak memory (the process's own, from wait4) and its JSON output;
and writing synthetic data files through Arrow."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from sisa.testing import free_port

SISA = [sys.executable, "-m", "sisa.cli"]


@dataclass
class Timed:
    argv: list[str]
    wall: float  # seconds, start to exit
    peak_mb: float  # the process's maximum resident set size
    code: int
    output: Any  # parsed JSON of stdout, or None
    stderr: str
    cpu: float = 0.0  # seconds of CPU (user + system) the process used: less swayed by a busy machine


def sisa(*argv: str, check: bool = True) -> Timed:
    """`sisa argv` as a fresh process (stdout to a file: a pipe could block a large output)."""
    return timed([*SISA, *argv], list(argv), check)


def timed(command: list[str], argv: list[str] | None = None, check: bool = True) -> Timed:
    """Any command as a fresh process, timed as `sisa` is (`argv`: what the result names)."""
    argv = command if argv is None else argv
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        started = time.perf_counter()
        proc = subprocess.Popen(command, stdout=out, stderr=err)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - started
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        text, errors = out.read(), err.read()
    try:
        parsed = json.loads(text) if text.strip() else None
    except ValueError:
        parsed = None
    result = Timed(list(argv), wall, usage.ru_maxrss / 1024, proc.returncode, parsed, errors,
                   usage.ru_utime + usage.ru_stime)
    if check and proc.returncode != 0:
        name = "sisa " if command[:len(SISA)] == SISA else ""
        raise RuntimeError(f"{name}{' '.join(argv[:3])} ... failed ({proc.returncode}): {errors[-2000:]}")
    return result


class Serving:
    """`sisa serve --store store *options` as a fresh process, its output appended to `log`,
    started when /readyz answers one of `ready` (200 only: every shard servable; 503 too: up, some
    shard sitting out). `startup` is the seconds from launch to that answer."""

    def __init__(self, store: Path, log: Path, token: str, *options: str,
                 ready: tuple[int, ...] = (200,), timeout: float = 600) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        self.token = token
        argv = [*SISA, "serve", "--store", str(store), "--port", str(self.port),
                "--log-level", "warning", *options]
        started = time.perf_counter()
        with open(log, "ab") as out:
            self.proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT,
                                         env={**os.environ, "SISA_SERVE_TOKEN": token})
        self.client = httpx.Client(base_url=self.url, timeout=120)
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"sisa serve exited: {log.read_text()[-3000:]}")
            if time.perf_counter() - started > timeout:
                self.kill()
                raise RuntimeError(f"sisa serve did not start in {timeout:.0f} s")
            try:
                if self.client.get("/readyz").status_code in ready:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        self.startup = time.perf_counter() - started

    def worker_ready(self, timeout: float = 300) -> None:
        """Wait until the deletion worker (a process of its own) has opened the store."""
        auth = {"Authorization": f"Bearer {self.token}"}
        deadline = time.perf_counter() + timeout
        while not self.client.get("/v1/status", headers=auth).json()["service"]["worker"]["ready"]:
            if time.perf_counter() > deadline:
                raise RuntimeError(f"the deletion worker did not start in {timeout:.0f} s")
            time.sleep(0.1)

    def stop(self) -> None:
        """SIGINT, as Ctrl-C: a graceful shutdown; killed if it takes over a minute."""
        self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()

    def kill(self) -> None:
        """SIGKILL: no chance to tidy up."""
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(60)


def write_table(path: Path, columns: dict[str, Any]) -> Path:
    """Columns (name -> array or list) as a CSV or Parquet file, by the suffix."""
    import pyarrow as pa

    table = pa.table(columns)
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        pq.write_table(table, path)
    else:
        import pyarrow.csv as pacsv

        pacsv.write_csv(table, path)
    return path


def purchase_like(rows: int, test_rows: int, features: int = 600, classes: int = 100,
                  seed: int = 0) -> tuple[dict[str, Any], dict[str, Any]]:
    """Binary feature vectors around `classes` random prototypes (5% of bits flipped), like the
    Purchase-100 data of the SISA paper: train and test columns from the same prototypes."""
    rng = np.random.default_rng(seed)
    prototypes = rng.random((classes, features)) < 0.2

    def draw(n: int, prefix: str) -> dict[str, Any]:
        y = rng.integers(0, classes, n)
        x = (prototypes[y] ^ (rng.random((n, features)) < 0.05)).astype(np.int8)
        cols: dict[str, Any] = {"id": [f"{prefix}{i:07d}" for i in range(n)], "label": y}
        cols.update({f"f{j}": x[:, j] for j in range(features)})
        return cols

    return draw(rows, "p"), draw(test_rows, "t")


def gaussian(rows: int, features: int = 20, classes: int = 10, seed: int = 0, prefix: str = "r",
             decimals: int = 4) -> dict[str, Any]:
    """Float features (rounded to `decimals`) around `classes` Gaussian centres, which are the
    same for every `seed` (a test file draws from the training data's distribution)."""
    centres = np.random.default_rng(0).normal(0, 1.5, (classes, features))
    rng = np.random.default_rng(1000 + seed)
    y = rng.integers(0, classes, rows)
    x = np.round(centres[y] + rng.normal(0, 1.0, (rows, features)), decimals)
    cols: dict[str, Any] = {"id": [f"{prefix}{i:08d}" for i in range(rows)], "label": y}
    cols.update({f"f{j}": x[:, j] for j in range(features)})
    return cols


def feature_flags(features: int) -> list[str]:
    return ["--id-column", "id", "--label-column", "label",
            "--feature-columns", ",".join(f"f{j}" for j in range(features))]


def pick_per_slice(store: Path, per_slice: int, slices: int) -> list[str]:
    """Record ids to forget one at a time: `per_slice` from each slice index, each from another
    shard where there are enough (read from the store's database, read-only)."""
    import sqlite3

    conn = sqlite3.connect(f"file:{store / 'store.db'}?mode=ro", uri=True)
    try:
        picked: list[str] = []
        for k in range(slices):
            rows = conn.execute(
                "SELECT id, shard FROM records WHERE deleted_at IS NULL AND slice = ? "
                "ORDER BY order_key LIMIT 2000", [k]).fetchall()
            shards_used: set[int] = set()
            for record_id, shard in rows:
                if shard not in shards_used:
                    picked.append(record_id)
                    shards_used.add(shard)
                if len(shards_used) == per_slice:
                    break
    finally:
        conn.close()
    return picked
