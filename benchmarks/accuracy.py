"""Benchmark 3: held-out accuracy of the ensemble against the number of shards (hard and soft
voting) next to the monolith, on digits and the synthetic data (MLP), Rotten Tomatoes (`head`),
and Rotten Tomatoes with `lora` at small S."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from benchmarks.common import SYN_SPEC, Mode, execution, mlp_config, save_figure, synthetic_rows
from sisa import HeadConfig, LoraConfig, PartitionConfig, Sisa, SisaConfig, TrainingConfig
from sisa.api import resolve_source
from sisa.builtin import stable_subset

RT = "builtin:rotten_tomatoes"


def text_config(shards: int, slices: int, training: TrainingConfig) -> SisaConfig:
    """A text backend's own defaults (head: logistic, 10 epochs, lr 3e-3; lora: 2 epochs, batch
    16, lr 2e-3, 64 tokens)."""
    return SisaConfig(partition=PartitionConfig(shards=shards, slices=slices),
                      training=training, execution=execution())


def _curve(name: str, work: Path, train: Any, test: Any, spec: Any, shard_counts: tuple[int, ...],
           make_config: Any, embeddings_from: Path | None = None) -> dict[str, Any]:
    points = []
    for shards in shard_counts:
        slices = 1 if shards == 1 else 4
        store = work / f"acc-{name}-{shards}"
        sisa = Sisa.train(store, train, make_config(shards, slices), spec,
                          embeddings_from=embeddings_from)
        report = sisa.training_report_
        result = sisa.evaluate(test)
        sisa.close()
        if embeddings_from is None and sisa.encoder is not None:
            embeddings_from = store  # later stores reuse the embeddings
        points.append({"shards": shards, "slices": slices, "soft": result.ensemble_soft.accuracy,
                       "hard": result.ensemble_hard.accuracy,
                       "macro_f1": result.ensemble_soft.macro_f1,
                       "train_seconds": round(report.seconds, 3)})
        print(f"  accuracy {name} S={shards}: soft {points[-1]['soft']:.4f} "
              f"hard {points[-1]['hard']:.4f}", flush=True)
    return {"data": name, "records": len(train), "test_records": len(test), "points": points}


def run(mode: Mode, work: Path) -> dict[str, Any]:
    curves = []
    syn = synthetic_rows(mode.stream_rows)
    syn_test = synthetic_rows(max(200, mode.stream_rows // 5), seed=1, prefix="test")
    curves.append(_curve("synthetic (mlp)", work, syn, syn_test, SYN_SPEC, mode.accuracy_shards,
                         lambda s, r: mlp_config(s, r)))
    digits, digits_spec = resolve_source("builtin:digits", None)
    digits_test, _ = resolve_source("builtin:digits:test", None)
    curves.append(_curve("digits (mlp)", work, digits, digits_test, digits_spec,
                         mode.accuracy_shards, lambda s, r: mlp_config(s, r, epochs=5)))
    if mode.text_train != 0:
        train, spec = resolve_source(RT, None)
        test, _ = resolve_source(f"{RT}:test", None)
        train = stable_subset(train, spec.id_column, mode.text_train)
        test = stable_subset(test, spec.id_column, mode.text_train // 3 if mode.text_train else None)
        curves.append(_curve("rotten_tomatoes (head)", work, train, test, spec,
                             mode.accuracy_shards, lambda s, r: text_config(s, r, HeadConfig())))
    if mode.lora_train:
        train, spec = resolve_source(RT, None)
        test, _ = resolve_source(f"{RT}:test", None)
        train = stable_subset(train, spec.id_column, mode.lora_train)
        test = stable_subset(test, spec.id_column, max(100, mode.lora_train // 3))
        curves.append(_curve("rotten_tomatoes (lora)", work, train, test, spec, mode.lora_shards,
                             lambda s, r: text_config(s, r, LoraConfig())))
    return {"curves": curves}


def plot(result: dict[str, Any], out: Path) -> Path:
    import matplotlib.pyplot as plt

    curves = result["curves"]
    fig, axes = plt.subplots(1, len(curves), figsize=(4 * len(curves), 3.6), squeeze=False)
    for ax, curve in zip(axes[0], curves, strict=True):
        xs = [p["shards"] for p in curve["points"]]
        ax.plot(xs, [p["soft"] for p in curve["points"]], marker="o", label="soft voting")
        ax.plot(xs, [p["hard"] for p in curve["points"]], marker="s", label="hard voting")
        ax.axhline(curve["points"][0]["soft"], color="grey", linestyle="--", label="monolith (S=1)")
        ax.set(xscale="log", xlabel="shards S", ylabel="held-out accuracy",
               title=f"{curve['data']} ({curve['records']} train)")
        ax.legend(fontsize=8)
    return save_figure(fig, out, "accuracy.png")
