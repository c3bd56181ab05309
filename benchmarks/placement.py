"""Benchmark 4: deletion-aware placement. Records whose prior says they are likely to be deleted
(the top 10% here) go to the last slice of their shard, or to a dedicated shard; a stream of
deletions drawn from that prior then costs less, at the accuracy shown."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import NO_GROUP_SPEC, Mode, mlp_config, save_figure, synthetic_rows
from benchmarks.streams import SHARDS, SLICES, draw_stream, plot_curves, run_stream

STRATEGIES = [("uniform", {}), ("late_slices", {"late_slices": 1}),
              ("dedicated_shards", {"dedicated_shards": 1})]


def run(mode: Mode, work: Path) -> dict[str, Any]:
    rows = synthetic_rows(mode.stream_rows)
    test = synthetic_rows(max(200, mode.stream_rows // 5), seed=1, prefix="test")
    threshold = float(np.quantile([r["prior"] for r in rows], 0.9))
    requests = draw_stream("pareto", rows, mode.stream_length)
    likely_share = sum(r["prior"] >= threshold for r in rows) / len(rows)
    likely_ids = {r["id"] for r in rows if r["prior"] >= threshold}
    hit_share = sum(any(i in likely_ids for i in ids) for ids in requests) / max(1, len(requests))
    results = []
    for name, extra in STRATEGIES:
        config = mlp_config(SHARDS, SLICES, placement=name, prior_threshold=threshold, **extra)
        stream = run_stream(name, work / f"placement-{name}", rows, test, config, NO_GROUP_SPEC,
                            requests)
        last = stream["points"][-1]
        results.append({"placement": name, "train_samples": stream["train_samples"],
                        "stream_samples": last["samples"], "stream_seconds": last["seconds"],
                        "accuracy_before": stream["points"][0]["accuracy"],
                        "accuracy_after": last["accuracy"], "points": stream["points"]})
    return {"rows": len(rows), "shards": SHARDS, "slices": SLICES,
            "prior_threshold": round(threshold, 4), "likely_share": round(likely_share, 4),
            "deletions_of_likely_records": round(hit_share, 4), "results": results}


def plot(result: dict[str, Any], out: Path) -> Path:
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    plot_curves(axes[0], axes[1], [(r["placement"], r) for r in result["results"]],
                "deletion-aware placement: cost of a prior-drawn stream")
    return save_figure(fig, out, "placement.png")
