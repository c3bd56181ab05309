"""Benchmark 1: the cost of honouring one uniformly chosen deletion, over a grid of S and R.

For each (S, R): train the SISA store (its training phase is exactly what retraining the ensemble
from scratch costs), then time single deletions (one from every slice index, so their mean is the
expected cost of a uniform deletion) and count their samples; against (a) that full SISA retrain
and (b) retraining one monolithic model, with SISA's expected speed-up 3RS/(2R+1).
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
            # Stratified by slice: one random record from every slice index, `deletion_rounds`
            # times. A uniform deletion starts from each slice with equal probability, so the
            # mean over the strata is its expected cost, without the noise of a small sample.
            by_slice: dict[int, list[str]] = {}
            for shard in range(shards):
                for record_id, _digest, slice_, _order in sisa.store.live_placements(shard):
                    by_slice.setdefault(slice_, []).append(record_id)
            victims = [rng.choice(by_slice[k]) for _ in range(mode.deletion_rounds)
                       for k in sorted(by_slice)]
            times, samples = [], []
            for victim in victims:
                with timer() as t:
                    receipt = sisa.forget([victim])
                times.append(t["seconds"])
                samples.append(receipt.samples_retrained)
            sisa.close()
            mean_time, mean_samples = statistics.mean(times), statistics.mean(samples)
            theory = expected_speedup(shards, slices)
            speedup_time = report.seconds / mean_time
            cells.append({
                "shards": shards, "slices": slices,
                "scratch_seconds": round(report.seconds, 4),
                "scratch_samples": report.samples,
                "deletion_seconds": round(mean_time, 4),
                "deletion_samples": round(mean_samples, 1),
                "deletions": len(victims),
                "speedup_time": round(speedup_time, 3),
                "speedup_samples": round(report.samples / mean_samples, 3) if mean_samples else None,
                "speedup_vs_monolith": round(monolith_seconds / mean_time, 3),
                "theory": round(theory, 3),
                "ratio_time_to_theory": round(speedup_time / theory, 3),
            })
            print(f"  retrain_cost S={shards} R={slices}: {cells[-1]['speedup_time']}x "
                  f"(theory {theory:.2f}x)", flush=True)
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
        axes[0].plot(xs, [c["theory"] for c in sub], linestyle="--", color=line[0].get_color())
        axes[1].plot(xs, [c["ratio_time_to_theory"] for c in sub], marker="o", label=f"R={slices}")
    axes[0].set(xscale="log", yscale="log", xlabel="shards S",
                ylabel="speed-up of one deletion (wall time)",
                title="measured (solid) vs 3RS/(2R+1) (dashed)")
    axes[1].axhline(1.0, color="grey", linewidth=0.8)
    axes[1].set(xscale="log", xlabel="shards S", ylabel="measured / theoretical",
                title=f"against retraining the ensemble ({result['rows']} rows)")
    for ax in axes:
        ax.legend()
    return save_figure(fig, out, "retrain_cost.png")
