"""Core cost figures on scikit-learn's digits (MLP backend), all measured in one run.

    python -m benchmarks.core_digits [--shards 4 --slices 4 --deletions 10 --out results/]

Reports: full training wall time (in-process and Ray), the retrain time and samples of single
deletions next to SISA's expected fraction (2R+1)/(3R)/S, and the framework's overhead against a
plain torch loop doing the same optimizer steps on the same data.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import plain_torch_loop
from sisa import ExecutionConfig, MLPConfig, PartitionConfig, Sisa, SisaConfig
from sisa.unlearning import expected_retrain_fraction


def run(shards: int, slices: int, epochs: int, deletions: int, out: Path) -> dict[str, Any]:
    config = SisaConfig(
        partition=PartitionConfig(shards=shards, slices=slices, seed=0),
        training=MLPConfig(epochs_per_slice=epochs),
        execution=ExecutionConfig(progress=False),
    )
    work = Path(tempfile.mkdtemp(prefix="sisa-bench-"))
    try:
        # Warm up imports and the data loader so the first timed run pays no one-off cost.
        Sisa.train(work / "warm", "builtin:digits", config).close()

        started = time.perf_counter()
        sisa = Sisa.train(work / "local", "builtin:digits", config)
        local_seconds = time.perf_counter() - started
        report = sisa.training_report_
        train_samples = report.samples
        shard_seconds = sum(r.seconds for r in report.retrained)  # inside the shard trainer

        started = time.perf_counter()
        ray_config = config.replace(execution=ExecutionConfig(executor="ray", progress=False))
        Sisa.train(work / "ray", "builtin:digits", ray_config).close()
        ray_seconds = time.perf_counter() - started

        plain_seconds, plain_steps = plain_torch_loop(sisa)

        ids = sorted(r.id for r in sisa.live_records())
        rng = random.Random(1)
        single = []
        for record_id in rng.sample(ids, deletions):
            started = time.perf_counter()
            receipt = sisa.forget([record_id])
            single.append({"id": record_id, "wall_seconds": time.perf_counter() - started,
                           "retrain_seconds": receipt.seconds,
                           "samples": receipt.samples_retrained,
                           "start_slice": receipt.affected_shards[0]["start_slice"]})
        sisa.close()
    finally:
        shutil.rmtree(work, ignore_errors=True)

    mean_samples = statistics.mean(d["samples"] for d in single)
    mean_wall = statistics.mean(d["wall_seconds"] for d in single)
    result = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}",
        "dataset": "builtin:digits (train split)",
        "records": len(ids),
        "shards": shards, "slices": slices, "epochs_per_slice": epochs,
        "full_train_seconds_local": round(local_seconds, 3),
        "full_train_seconds_ray": round(ray_seconds, 3),
        "full_train_samples": train_samples,
        "single_deletion": {
            "count": deletions,
            "mean_wall_seconds": round(mean_wall, 4),
            "mean_retrain_seconds": round(statistics.mean(d["retrain_seconds"] for d in single), 4),
            "mean_samples": round(mean_samples, 1),
            "measured_fraction": round(mean_samples / train_samples, 4),
            "expected_fraction": round(expected_retrain_fraction(shards, slices), 4),
            "speedup_vs_full_sisa_retrain": round(local_seconds / mean_wall, 2),
            "deletions": single,
        },
        "overhead": {
            "plain_torch_seconds": round(plain_seconds, 3),
            "plain_torch_steps": plain_steps,
            "sisa_local_seconds": round(local_seconds, 3),
            "sisa_shard_trainer_seconds": round(shard_seconds, 3),
            "ratio_shard_trainer": round(shard_seconds / plain_seconds, 3),
            "ratio_local": round(local_seconds / plain_seconds, 3),
            "ratio_ray": round(ray_seconds / plain_seconds, 3),
        },
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "core_digits.json").write_text(json.dumps(result, indent=2))
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--shards", type=int, default=4)
    parser.add_argument("--slices", type=int, default=4)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--deletions", type=int, default=10, help="single deletions to average")
    parser.add_argument("--out", type=Path, default=Path("results"))
    args = parser.parse_args()
    result = run(args.shards, args.slices, args.epochs, args.deletions, args.out)
    summary = {k: v for k, v in result.items() if k != "single_deletion"}
    summary["single_deletion"] = {k: v for k, v in result["single_deletion"].items()
                                  if k != "deletions"}
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
