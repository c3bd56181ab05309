"""Predicting new data at scale, as users run it: `sisa predict` as a fresh process on a file of
N rows holding only the model's 20 feature columns (no id, no group, no label: new data), on an
MLP store of S=16 shards, R=4 slices.

    python -m benchmarks.predict_scale --out DIR [--rows 1000000] [--train-rows 50000] [--tiny]

Measured in one run: `python -c pass` (a process's floor); `sisa predict --output F --json` (the
predictions to a file, a summary on stdout); `sisa predict --json` to a file (every prediction
streamed on stdout); each its wall time, peak memory and rows per second. The goal in issue 21:
1,000,000 rows in under 30 s. Writes DIR/predict_scale.json and prints the figures.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.cli_kit import feature_flags, gaussian, sisa, write_table
from benchmarks.common import machine, write_json

FEATURES = 20


def python_floor() -> float:
    started = time.perf_counter()
    subprocess.run([sys.executable, "-c", "pass"], check=True)
    return time.perf_counter() - started


def run(out: Path, rows: int, train_rows: int, shards: int, slices: int) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix="sisa-predict-scale-"))
    try:
        data = write_table(work / "train.csv", gaussian(train_rows, FEATURES, seed=0))
        store = work / "store"
        trained = sisa("train", "--store", str(store), "--data", str(data), *feature_flags(FEATURES),
                       "--shards", str(shards), "--slices", str(slices), "--epochs", "1",
                       "--batch-size", "128", "--json", "--no-progress")
        new = gaussian(rows, FEATURES, seed=1)
        del new["id"], new["label"]  # new data: only the model's columns
        started = time.perf_counter()
        big = write_table(work / "new.csv", new)
        write_seconds = time.perf_counter() - started
        floor = python_floor()
        summary = sisa("predict", "--store", str(store), "--data", str(big), "--output",
                       str(work / "predictions.jsonl"), "--json")
        written = sum(1 for _ in (work / "predictions.jsonl").open())
        streamed = sisa("predict", "--store", str(store), "--data", str(big), "--json")
        result: dict[str, Any] = {
            "machine": machine(), "rows": rows, "features": FEATURES, "shards": shards,
            "slices": slices, "train_rows": train_rows, "train_wall": round(trained.wall, 2),
            "csv_mb": round(big.stat().st_size / 2**20, 1), "csv_write_seconds": round(write_seconds, 2),
            "python_c_pass_wall": round(floor, 3),
            "output_file": {"wall": round(summary.wall, 2), "peak_mb": round(summary.peak_mb),
                            "rows_per_second": round(rows / summary.wall), "lines_written": written,
                            "stdout": summary.output},
            "json_stdout": {"wall": round(streamed.wall, 2), "peak_mb": round(streamed.peak_mb),
                            "rows_per_second": round(rows / streamed.wall),
                            "rows_parsed": len(streamed.output or [])},
            "goal_seconds": 30,
        }
        assert written == rows and summary.output["predictions"] == rows, summary.output
        assert result["json_stdout"]["rows_parsed"] == rows
    finally:
        shutil.rmtree(work, ignore_errors=True)
    write_json(out / "predict_scale.json", result)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("results/predict_scale"))
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--train-rows", type=int, default=50_000)
    parser.add_argument("--shards", type=int, default=16)
    parser.add_argument("--slices", type=int, default=4)
    parser.add_argument("--tiny", action="store_true", help="10,000 rows on a 2,000-record store")
    args = parser.parse_args()
    if args.tiny:
        args.rows, args.train_rows = 10_000, 2_000
    result = run(args.out, args.rows, args.train_rows, args.shards, args.slices)
    print(json.dumps({k: result[k] for k in ("rows", "shards", "python_c_pass_wall", "output_file",
                                             "json_stdout")}, indent=1))


if __name__ == "__main__":
    main()
