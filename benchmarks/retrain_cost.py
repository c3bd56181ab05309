"""Benchmark 1: the cost of honouring one uniformly chosen deletion, over a grid of S and R.

For each (S, R): train the SISA store (its training phase is exactly what retraining the ensemble
from scratch costs), then time single deletions (one from every slice index, so their mean is the
expected cost of a uniform deletion) and count their samples; against (a) that full SISA retrain
and (b) retraining one monolithic model, with SISA's expected speed-up 3RS/(2R+1).

Two pairs are timed, each like with like:
- warm: a long-lived process (a service, a notebook) that holds the shard data in memory; the
  scratch retrain uses the data it holds, each deletion the data kept from before.
- cold: a fresh process; the scratch retrain first reads every shard from the store, each
  deletion reads its shard (timed deletions on other records, with the kept data dropped first).
The scratch retrain is the median of the training run and one retrain from scratch per round.
"""

from __future__ import annotations

import random
import statistics
from pathlib import Path
from typing import Any

from benchmarks.common import (
    SYN_SPEC,
    Mode,
    mlp_config,
    save_figure,
    synthetic_rows,
    timer,
)
from sisa import Sisa
from sisa.unlearning import expected_speedup


def _victims(sisa: Sisa, shards: int, rounds: int,
             rng: random.Random) -> tuple[list[list[str]], list[list[str]]]:
    """Two disjoint sets of `rounds` rounds, each round one random record from every slice index.
    A uniform deletion starts from each slice with equal probability, so the mean over the strata
    is its expected cost, without the noise of a small sample."""
    by_slice: dict[int, list[str]] = {}
    for data in sisa.shard_data(range(shards)).values():
        for member in data.members:
            by_slice.setdefault(member.slice, []).append(member.id)
    drawn = {k: rng.sample(ids, 2 * rounds) for k, ids in sorted(by_slice.items())}
    first = [[drawn[k][r] for k in drawn] for r in range(rounds)]
    second = [[drawn[k][rounds + r] for k in drawn] for r in range(rounds)]
    return first, second


def _delete(sisa: Sisa, victims: list[str], cold: bool) -> list[tuple[float, int]]:
    """Seconds and samples of deleting each victim on its own."""
    out = []
    for victim in victims:
        if cold:
            sisa.clear_cache()  # as in a fresh process: the shard is read from the store
        with timer() as t:
            receipt = sisa.forget([victim])
        out.append((t["seconds"], receipt.samples_retrained))
    return out


def run(mode: Mode, work: Path) -> dict[str, Any]:
    rows = synthetic_rows(mode.synthetic_rows)
    mono = Sisa.train(work / "mono", rows, mlp_config(1, 1), SYN_SPEC)
    mono_report = mono.training_report_
    mono.close()
    monolith_seconds = mono_report.seconds
    cells = []
    rng = random.Random(7)
    for shards in mode.grid_shards:
        for slices in mode.grid_slices:
            sisa = Sisa.train(work / f"s{shards}-r{slices}", rows, mlp_config(shards, slices), SYN_SPEC)
            report = sisa.training_report_
            scratch_times, load_times = [report.seconds], []
            warm_rounds, cold_rounds = _victims(sisa, shards, mode.deletion_rounds, rng)
            warm, cold = [], []
            # Rounds of (warm deletions, cold deletions, a cold load of every shard, a retrain of
            # the ensemble from scratch): drift of a shared machine spreads over both sides.
            for warm_victims, cold_victims in zip(warm_rounds, cold_rounds, strict=True):
                warm += _delete(sisa, warm_victims, cold=False)
                cold += _delete(sisa, cold_victims, cold=True)
                with timer() as load:  # what a cold scratch retrain reads first
                    sisa.shard_data(range(shards), fresh=True)
                load_times.append(load["seconds"])
                scratch_times.append(sisa.repair(from_scratch=True).seconds)
            sisa.close()
            scratch = statistics.median(scratch_times)
            scratch_cold = scratch + statistics.median(load_times)
            warm_time = statistics.mean(t for t, _ in warm)
            cold_time = statistics.mean(t for t, _ in cold)
            samples = statistics.mean(n for _, n in warm + cold)
            theory = expected_speedup(shards, slices)
            scratch_cold = report.seconds + load["seconds"]
            speedup_time = scratch / warm_time
            speedup_cold = scratch_cold / cold_time
            cells.append({
                "shards": shards, "slices": slices,
                "scratch_seconds": round(scratch, 4),  # median of the scratch retrains
                "scratch_runs": [round(x, 4) for x in scratch_times],
                "scratch_load_seconds": round(statistics.median(load_times), 4),
                "scratch_samples": report.samples,
                "deletion_seconds": round(warm_time, 4),
                "deletion_seconds_cold": round(cold_time, 4),
                "deletion_samples": round(samples, 1),
                "deletions": len(warm) + len(cold),
                "speedup_time": round(speedup_time, 3),
                "speedup_time_cold": round(speedup_cold, 3),
                "speedup_samples": round(report.samples / samples, 3),
                "speedup_vs_monolith": round(monolith_seconds / warm_time, 3),
                "theory": round(theory, 3),
                "ratio_time_to_theory": round(speedup_time / theory, 3),
                "ratio_time_to_theory_cold": round(speedup_cold / theory, 3),
            })
            print(f"  retrain_cost S={shards} R={slices}: {cells[-1]['speedup_time']}x warm, "
                  f"{cells[-1]['speedup_time_cold']}x cold (theory {theory:.2f}x)", flush=True)
    return {"rows": len(rows), "monolith_seconds": round(monolith_seconds, 4),
            "monolith_samples": mono_report.samples, "cells": cells}


def plot(result: dict[str, Any], out: Path) -> Path:
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    cells = result["cells"]
    for slices in sorted({c["slices"] for c in cells}):
        sub = [c for c in cells if c["slices"] == slices]
        xs = [c["shards"] for c in sub]
        line = axes[0].plot(xs, [c["speedup_time"] for c in sub], marker="o", label=f"R={slices}")
        color = line[0].get_color()
        axes[0].plot(xs, [c["theory"] for c in sub], linestyle="--", color=color)
        axes[1].plot(xs, [c["ratio_time_to_theory"] for c in sub], marker="o", color=color,
                     label=f"R={slices} warm")
        axes[1].plot(xs, [c["ratio_time_to_theory_cold"] for c in sub], marker="x", color=color,
                     linestyle=":", label=f"R={slices} cold")
    axes[0].set(xscale="log", yscale="log", xlabel="shards S",
                ylabel="speed-up of one deletion (wall time, warm)",
                title="measured (solid) vs 3RS/(2R+1) (dashed)")
    axes[1].axhline(1.0, color="grey", linewidth=0.8)
    axes[1].set(xscale="log", xlabel="shards S", ylabel="measured / theoretical",
                title=f"against retraining the ensemble ({result['rows']} rows)")
    for ax in axes:
        ax.legend()
    return save_figure(fig, out, "retrain_cost.png")
