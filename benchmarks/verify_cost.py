"""What verifying every loaded checkpoint costs: the seconds per GB of reading and hashing files the
way a load does (one component at a time, no link followed), and the share of that in what users
run: a `sisa predict` of 4 rows and a `sisa forget` of one record, as fresh processes, on an MLP
store (S=8, R=4).

    python -m benchmarks.verify_cost --out DIR [--rows N --features F] [--tiny]

The verification of a predict is the live checkpoints' (their seals and files); of a forget, the
live checkpoints a writer vouches for, and the parent its retrain resumes from. Both are timed in
this process on the same store, then set beside the commands' wall time.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.cli_kit import feature_flags, gaussian, sisa, write_table
from benchmarks.common import machine, write_json
from shard_store import ShardStore
from shard_store.files import read_bytes
from sisa.status import checkpoint_problem


def hash_rate(work: Path, megabytes: int) -> dict[str, float]:
    """Seconds per GB: reading a file with `O_NOFOLLOW` per component and hashing it (as a load
    does), and hashing bytes already in memory."""
    path = work / "blob"
    path.write_bytes(os.urandom(megabytes << 20))
    best_read, best_hash = float("inf"), float("inf")
    for _ in range(3):
        started = time.perf_counter()
        data = read_bytes(work, "blob")
        hashlib.sha256(data).hexdigest()
        best_read = min(best_read, time.perf_counter() - started)
        started = time.perf_counter()
        hashlib.sha256(data).hexdigest()
        best_hash = min(best_hash, time.perf_counter() - started)
    gb = megabytes / 1024
    path.unlink()
    return {"read_and_hash_seconds_per_gb": round(best_read / gb, 3),
            "hash_seconds_per_gb": round(best_hash / gb, 3)}


def verify_seconds(store: Path, parent_of: str | None = None) -> tuple[float, int]:
    """Seconds to verify the live checkpoints (and a parent checkpoint), and the bytes read."""
    s = ShardStore.open(store, read_only=True)
    try:
        rows = list(s.live().values())
        if parent_of is not None:
            rows += [c for c in s.checkpoints() if c.key == parent_of]
        started = time.perf_counter()
        for row in rows:
            assert checkpoint_problem(s, row) is None, row.key
        seconds = time.perf_counter() - started
        size = sum((store / row.path / name).stat().st_size for row in rows for name in row.files)
    finally:
        s.close()
    return seconds, size


def run(rows: int, features: int) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix="sisa-verify-"))
    try:
        rate = hash_rate(work, 64 if rows < 10_000 else 256)
        data = write_table(work / "data.csv", gaussian(rows, features, seed=1, prefix="r"))
        store = work / "store"
        sisa("train", "--store", str(store), "--data", str(data), *feature_flags(features),
             "--shards", "8", "--slices", "4", "--epochs", "2", "--no-progress")
        ask = write_table(work / "ask.csv", gaussian(4, features, seed=2, prefix="q"))
        predict_wall = min(sisa("predict", "--store", str(store), "--data", str(ask), "--json").wall
                           for _ in range(3))
        predict_verify, live_bytes = verify_seconds(store)
        s = ShardStore.open(store, read_only=True)
        victim = next(s.live_records(0)).id
        live = s.live()[0]
        s.close()
        forget_wall = sisa("forget", "--store", str(store), victim, "--no-progress").wall
        forget_verify, forget_bytes = verify_seconds(store, parent_of=live.parent)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return {
        "machine": machine(), "rows": rows, "features": features, "shards": 8, "slices": 4,
        **rate,
        "live_checkpoints_bytes": live_bytes,
        "predict_wall_seconds": round(predict_wall, 3),
        "predict_verify_seconds": round(predict_verify, 4),
        "predict_verify_share": round(predict_verify / predict_wall, 4),
        "forget_wall_seconds": round(forget_wall, 3),
        "forget_verify_seconds": round(forget_verify, 4),
        "forget_verify_bytes": forget_bytes,
        "forget_verify_share": round(forget_verify / forget_wall, 4),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.verify_cost", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("results/verify_cost"))
    parser.add_argument("--rows", type=int, default=50_000)
    parser.add_argument("--features", type=int, default=600)
    parser.add_argument("--tiny", action="store_true", help="2,000 rows of 20 features")
    args = parser.parse_args(argv)
    rows, features = (2_000, 20) if args.tiny else (args.rows, args.features)
    result = run(rows, features)
    write_json(args.out / "verify_cost.json", result)
    for key, value in result.items():
        if key != "machine":
            print(f"{key}: {value}")


if __name__ == "__main__":
    main()
