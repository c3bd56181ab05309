"""Benchmark 1: the cost of honouring one uniformly chosen deletion, over a grid of S and R.

For each (S, R): train the SISA store (its training phase is exactly what retraining the ensemble
from scratch costs), then time single deletions (one from every slice index, so their mean is the
expected cost of a uniform deletion) and count their samples; against (a) that full SISA retrain
and (b) retraining one monolithic model, with SISA's expected speed-up 3RS/(2R+1).

Two pairs are timed, each like with like:
- warm: a long-lived process (a service, a notebook) that holds the shard data in memory; the
  scratch retrain uses the data just ingested, each deletion the data kept from before.
- cold: a fresh process; the scratch retrain first reads every shard from the store, each
  deletion reads its shard (timed deletions on other records, with the kept data dropped first).
"""

from __future__ import annotations

import random
import statistics
from pathlib import Path
from typing import Any

from benchmarks.common import (
    SYN_SPEC,
    Mode,
    expected_speedup,
    mlp_config,
    save_figure,
    synthetic_rows,
    timer,
)
from sisa.api import Sisa


def _victims(sisa: Sisa, shards: int, rounds: int, rng: random.Random) -> tuple[list[str], list[str]]:
    """Two disjoint samples, stratified by slice: `rounds` random records from every slice index
    each. A uniform deletion starts from each slice with equal probability, so the mean over the
    strata is its expected cost, without the noise of a small sample."""
    by_slice: dict[int, list[str]] = {}
    for shard in range(shards):
        for record_id, _digest, slice_, _order in sisa.store.live_placements(shard):
            by_slice.setdefault(slice_, []).append(record_id)
    first: list[str] = []
    second: list[str] = []
    for k in sorted(by_slice):
        drawn = rng.sample(by_slice[k], 2 * rounds)
        first += drawn[:rounds]
        second += drawn[rounds:]
    return first, second


def _delete(sisa: Sisa, victims: list[str], cold: bool) -> tuple[float, float]:
    """Mean seconds and samples of deleting each victim on its own."""
    times, samples = [], []
    for victim in victims:
        if cold:
            sisa.manager.data.clear()  # as in a fresh process: the shard is read from the store
        with timer() as t:
            receipt = sisa.forget([victim])
        times.append(t["seconds"])
        samples.append(receipt.samples_retrained)
    return statistics.mean(times), statistics.mean(samples)


def run(mode: Mode, work: Path) -> dict[str, Any]:
    rows = synthetic_rows(mode.synthetic_rows)
    mono, mono_report = Sisa.train(work / "mono", rows, mlp_config(1, 1), SYN_SPEC)
    mono.close()
    monolith_seconds = mono_report.seconds
    cells = []
    rng = random.Random(7)
    for shards in mode.grid_shards:
        for slices in mode.grid_slices:
            sisa, report = Sisa.train(work / f"s{shards}-r{slices}", rows,
                                      mlp_config(shards, slices), SYN_SPEC)
            sisa.manager.data.clear()
            with timer() as load:  # what a cold scratch retrain reads first
                sisa.manager.data.get(range(shards))
            warm_victims, cold_victims = _victims(sisa, shards, mode.deletion_rounds, rng)
            warm_time, warm_samples = _delete(sisa, warm_victims, cold=False)
            cold_time, cold_samples = _delete(sisa, cold_victims, cold=True)
            sisa.close()
            theory = expected_speedup(shards, slices)
            scratch_cold = report.seconds + load["seconds"]
            speedup_time = report.seconds / warm_time
            speedup_cold = scratch_cold / cold_time
            cells.append({
                "shards": shards, "slices": slices,
                "scratch_seconds": round(report.seconds, 4),
                "scratch_load_seconds": round(load["seconds"], 4),
                "scratch_samples": report.samples,
                "deletion_seconds": round(warm_time, 4),
                "deletion_seconds_cold": round(cold_time, 4),
                "deletion_samples": round((warm_samples + cold_samples) / 2, 1),
                "deletions": len(warm_victims) + len(cold_victims),
                "speedup_time": round(speedup_time, 3),
                "speedup_time_cold": round(speedup_cold, 3),
                "speedup_samples": round(2 * report.samples / (warm_samples + cold_samples), 3),
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
