"""Benchmark 5: framework overhead. SISA with S=1, R=1 against a plain torch loop doing the same
optimizer steps (same model, seeds, batches) on the same data, in one run."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from benchmarks.common import SYN_SPEC, Mode, mlp_config, plain_torch_loop, synthetic_rows, timer
from sisa.api import Sisa


def run(mode: Mode, work: Path) -> dict[str, Any]:
    rows = synthetic_rows(mode.synthetic_rows)
    # Warm-up: imports and allocator, so neither side pays a one-off cost.
    Sisa.train(work / "overhead-warm", rows[:2000], mlp_config(1, 1), SYN_SPEC)[0].close()
    with timer() as t:
        sisa, report = Sisa.train(work / "overhead", rows, mlp_config(1, 1), SYN_SPEC)
    plain_seconds, steps = plain_torch_loop(sisa)
    trainer_seconds = sum(r.seconds for r in report.retrained)
    sisa.close()
    result = {
        "rows": len(rows), "optimizer_steps": steps,
        "plain_torch_seconds": round(plain_seconds, 3),
        "sisa_end_to_end_seconds": round(t["seconds"], 3),  # + reading, validating, placing
        "sisa_training_seconds": round(report.seconds, 3),  # plan, train, checkpoint, swap
        "sisa_shard_trainer_seconds": round(trainer_seconds, 3),
        "ratio_end_to_end": round(t["seconds"] / plain_seconds, 3),
        "ratio_training": round(report.seconds / plain_seconds, 3),
        "ratio_shard_trainer": round(trainer_seconds / plain_seconds, 3),
    }
    print(f"  overhead: training {result['ratio_training']}x, end to end "
          f"{result['ratio_end_to_end']}x the plain loop", flush=True)
    return result


def plot(result: dict[str, Any], out: Path) -> Path:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    names = ["plain torch", "SISA shard trainer", "SISA training", "SISA end to end"]
    values = [result["plain_torch_seconds"], result["sisa_shard_trainer_seconds"],
              result["sisa_training_seconds"], result["sisa_end_to_end_seconds"]]
    ax.barh(names, values)
    ax.set(xlabel="seconds", title=f"S=1, R=1 vs plain torch ({result['rows']} rows, "
                                   f"{result['optimizer_steps']} steps)")
    fig.tight_layout()
    path = out / "overhead.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
