"""Benchmark 2: batched deletions against one at a time, and streams of deletions.

Batches: K uniform deletions in one request against the same K one request at a time, with the
measured number of shards hit next to the expected S(1-(1-1/S)^K). Streams: deletions drawn
uniformly, from a skewed (Pareto) prior, or a whole user at a time (with group placement on and
off), with cumulative retrain cost and held-out accuracy after each deletion.
"""

from __future__ import annotations

import random
import shutil
from pathlib import Path
from typing import Any

from benchmarks.common import (
    NO_GROUP_SPEC,
    SYN_SPEC,
    Mode,
    expected_shards_hit,
    mlp_config,
    save_figure,
    synthetic_rows,
    timer,
)
from sisa.api import Sisa
from sisa.config import DataSpec, SisaConfig

SHARDS, SLICES = 8, 4


def _fresh_copy(template: Path, target: Path) -> Sisa:
    shutil.copytree(template, target)
    return Sisa.open(target)


def batches(mode: Mode, work: Path, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    template = work / "batch-template"
    Sisa.train(template, rows, mlp_config(SHARDS, SLICES), SYN_SPEC).close()
    rng = random.Random(11)
    out = []
    for k in mode.batch_sizes:
        victims = rng.sample([r["id"] for r in rows], k)
        together = _fresh_copy(template, work / f"batch-{k}-together")
        with timer() as t_batch:
            receipt = together.forget(victims)
        together.close()
        apart = _fresh_copy(template, work / f"batch-{k}-apart")
        samples_apart = 0
        with timer() as t_apart:
            for victim in victims:
                samples_apart += apart.forget([victim]).samples_retrained
        apart.close()
        out.append({
            "k": k,
            "batched_seconds": round(t_batch["seconds"], 4),
            "batched_samples": receipt.samples_retrained,
            "one_at_a_time_seconds": round(t_apart["seconds"], 4),
            "one_at_a_time_samples": samples_apart,
            "shards_hit": len(receipt.affected_shards),
            "expected_shards_hit": round(expected_shards_hit(SHARDS, k), 3),
        })
        print(f"  batch K={k}: {out[-1]['batched_seconds']}s batched vs "
              f"{out[-1]['one_at_a_time_seconds']}s one at a time", flush=True)
    return out


def draw_stream(kind: str, rows: list[dict[str, Any]], length: int, seed: int = 3) -> list[list[str]]:
    """Deletion requests (each a list of ids): uniform, Pareto-weighted, or whole users."""
    rng = random.Random(seed)
    if kind == "uniform":
        return [[i] for i in rng.sample([r["id"] for r in rows], length)]
    if kind == "pareto":
        chosen: list[list[str]] = []
        pool = list(rows)
        for _ in range(length):  # without replacement, each draw proportional to the prior
            pick = rng.choices(range(len(pool)), weights=[r["prior"] for r in pool])[0]
            chosen.append([pool.pop(pick)["id"]])
        return chosen
    users: dict[str, list[str]] = {}
    for r in rows:
        users.setdefault(r["user"], []).append(r["id"])
    return [users[u] for u in rng.sample(sorted(users), length)]


def run_stream(name: str, store: Path, rows: list[dict[str, Any]], test: list[dict[str, Any]],
               config: SisaConfig, spec: DataSpec, requests: list[list[str]]) -> dict[str, Any]:
    sisa = Sisa.train(store, rows, config, spec)
    report = sisa.training_report_
    _, test_inputs, test_labels = sisa.load_inputs(test, labelled=True)

    def accuracy() -> float:
        predicted = sisa.predict(test_inputs)
        return sum(p == y for p, y in zip(predicted, test_labels, strict=True)) / len(test_labels)

    points = [{"deletions": 0, "records": 0, "samples": 0, "seconds": 0.0, "shards_hit": 0,
               "accuracy": accuracy()}]
    samples, seconds, records = 0, 0.0, 0
    for n, request in enumerate(requests, start=1):
        with timer() as t:
            receipt = sisa.forget(request)
        samples += receipt.samples_retrained
        seconds += t["seconds"]
        records += len(receipt.record_ids)
        points.append({"deletions": n, "records": records, "samples": samples,
                       "seconds": round(seconds, 4), "shards_hit": len(receipt.affected_shards),
                       "accuracy": accuracy()})
    sisa.close()
    print(f"  stream {name}: {samples} samples, {seconds:.2f}s for {len(requests)} requests, "
          f"accuracy {points[0]['accuracy']:.3f} -> {points[-1]['accuracy']:.3f}", flush=True)
    return {"name": name, "train_samples": report.samples, "train_seconds": round(report.seconds, 4),
            "points": points}


def run(mode: Mode, work: Path) -> dict[str, Any]:
    rows = synthetic_rows(mode.stream_rows)
    test = synthetic_rows(max(200, mode.stream_rows // 5), seed=1, prefix="test")
    config = mlp_config(SHARDS, SLICES)
    streams: list[dict[str, Any]] = []
    for kind, spec, label in [("uniform", NO_GROUP_SPEC, "uniform"),
                              ("pareto", NO_GROUP_SPEC, "pareto"),
                              ("user", SYN_SPEC, "user, group placement on"),
                              ("user", NO_GROUP_SPEC, "user, group placement off")]:
        requests = draw_stream(kind, rows, mode.stream_length)
        streams.append(run_stream(label, work / f"stream-{len(streams)}", rows, test, config, spec,
                                  requests))
    return {"rows": len(rows), "shards": SHARDS, "slices": SLICES,
            "batches": batches(mode, work, rows), "streams": streams}


def plot_curves(cost_ax: Any, accuracy_ax: Any, series: list[tuple[str, dict[str, Any]]],
                title: str) -> None:
    """Cumulative retrain cost (in full trainings) and accuracy after each deletion request."""
    for label, stream in series:
        xs = [p["deletions"] for p in stream["points"]]
        cost_ax.plot(xs, [p["samples"] / stream["train_samples"] for p in stream["points"]],
                     label=label)
        accuracy_ax.plot(xs, [p["accuracy"] for p in stream["points"]], label=label)
    cost_ax.set(xlabel="deletion requests", ylabel="cumulative retrain / full training", title=title)
    accuracy_ax.set(xlabel="deletion requests", ylabel="held-out accuracy", title="accuracy")
    cost_ax.legend()


def plot(result: dict[str, Any], out: Path) -> Path:
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    b = result["batches"]
    ks = [x["k"] for x in b]
    axes[0].plot(ks, [x["batched_samples"] for x in b], marker="o", label="one request")
    axes[0].plot(ks, [x["one_at_a_time_samples"] for x in b], marker="o", label="one at a time")
    twin = axes[0].twinx()
    twin.plot(ks, [x["shards_hit"] for x in b], color="grey", marker="x", label="shards hit")
    twin.plot(ks, [x["expected_shards_hit"] for x in b], color="grey", linestyle="--",
              label="S(1-(1-1/S)^K)")
    twin.set_ylabel("shards hit")
    axes[0].set(xscale="log", xlabel="K deletions", ylabel="samples retrained",
                title=f"batched vs one at a time (S={result['shards']}, R={result['slices']})")
    axes[0].legend(loc="upper left")
    twin.legend(loc="lower right")
    plot_curves(axes[1], axes[2], [(s["name"], s) for s in result["streams"]],
                "cumulative retrain cost")
    return save_figure(fig, out, "streams.png")
