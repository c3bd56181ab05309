"""Benchmark 5: framework overhead. SISA with S=1, R=1 against a plain torch loop doing the same
optimizer steps (same model, seeds, batches) on the same data, in one run: paired repeats, and the
median of their ratios."""

from __future__ import annotations

import dataclasses
import statistics
from pathlib import Path
from typing import Any

from benchmarks.common import (
    SYN_SPEC,
    Mode,
    mlp_config,
    plain_torch_loop,
    save_figure,
    synthetic_rows,
    timer,
)
from sisa.api import Sisa

# The suite's small MLP (bookkeeping per record weighs against ~3 us of compute per record and
# epoch), and a wider one whose compute per record is closer to a real model's.
MODELS: dict[str, dict[str, Any]] = {"mlp-64": {"hidden_sizes": (64,), "batch_size": 128},
          "mlp-512x512": {"hidden_sizes": (512, 512), "batch_size": 64}}


def _measure(name: str, rows: list[dict[str, Any]], work: Path, repeats: int) -> dict[str, Any]:
    config = mlp_config(1, 1)
    config = config.replace(training=dataclasses.replace(config.training, **MODELS[name]))
    # Warm-up: imports and allocator, so neither side pays a one-off cost.
    Sisa.train(work / f"{name}-warm", rows[:2000], config, SYN_SPEC).close()
    runs = []
    previous: Sisa | None = None
    for repeat in range(repeats):
        # Paired, back to back, so the machine's drift hits both sides; which side goes first
        # alternates, as the first run over fresh memory of a given size is the slower one.
        plain_first = previous is not None and repeat % 2 == 1
        if previous is not None and plain_first:
            plain_seconds, steps = plain_torch_loop(previous)  # same data, same steps
        with timer() as t:
            sisa = Sisa.train(work / f"{name}-{repeat}", rows, config, SYN_SPEC)
        report = sisa.training_report_
        if not plain_first:
            plain_seconds, steps = plain_torch_loop(sisa)
        if previous is not None:
            previous.close()
        previous = sisa
        runs.append({
            "plain_torch_seconds": round(plain_seconds, 3),
            "sisa_end_to_end_seconds": round(t["seconds"], 3),  # + reading, validating, placing
            "sisa_training_seconds": round(report.seconds, 3),  # plan, train, checkpoint, swap
            "sisa_shard_trainer_seconds": round(sum(r.seconds for r in report.retrained), 3),
        })
    if previous is not None:
        previous.close()
    median = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
    ratio = {k: statistics.median(r[f"sisa_{k}_seconds"] / r["plain_torch_seconds"] for r in runs)
             for k in ("end_to_end", "training", "shard_trainer")}
    result = {
        "model": name, "rows": len(rows), "optimizer_steps": steps, "repeats": repeats,
        **{k: round(v, 3) for k, v in median.items()},
        **{f"ratio_{k}": round(v, 3) for k, v in ratio.items()},
        "runs": runs,
    }
    print(f"  overhead {name}: training {result['ratio_training']}x, end to end "
          f"{result['ratio_end_to_end']}x the plain loop (median of {repeats})", flush=True)
    return result


def run(mode: Mode, work: Path) -> dict[str, Any]:
    rows = synthetic_rows(mode.synthetic_rows)
    return {"models": [_measure(name, rows, work, mode.overhead_repeats) for name in MODELS]}


def plot(result: dict[str, Any], out: Path) -> Path:
    import matplotlib.pyplot as plt

    models = result["models"]
    fig, axes = plt.subplots(1, len(models), figsize=(6 * len(models), 3.5), squeeze=False)
    for ax, m in zip(axes[0], models, strict=True):
        names = ["plain torch", "SISA shard trainer", "SISA training", "SISA end to end"]
        values = [m["plain_torch_seconds"], m["sisa_shard_trainer_seconds"],
                  m["sisa_training_seconds"], m["sisa_end_to_end_seconds"]]
        ax.barh(names, values)
        ax.set(xlabel="seconds", title=f"{m['model']}: S=1, R=1 vs plain torch "
                                       f"({m['rows']} rows, {m['optimizer_steps']} steps)")
    return save_figure(fig, out, "overhead.png")
