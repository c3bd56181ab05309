"""What sharding costs a causal LM, and what each way of serving the shards costs: for S = 1, 2,
4, 8 shards of one chitchat corpus, the held-out perplexity gain over the base model under each
combination (mixture, product, merged adapter), the share of the monolith's (S=1) gain it keeps,
the per-token decoding latency of each, and the seconds of one deletion.

    python -m benchmarks.lm_scaling --out results/lm-scaling          # SmolLM2-135M, CPU: ~30 min
    python -m benchmarks.lm_scaling --tiny --model DIR --out D         # seconds: every code path

Every store trains on the same records with the same settings (one slice, so one deletion
retrains its shard from scratch: the most a deletion costs); the frozen layers' activations are
computed once and shared (`embeddings_from`). Gain is in nats per token: log perplexity of the
base model minus that of the ensemble, on held-out users' turns. Writes results.json, summary.md
and scaling.png to --out.
"""

from __future__ import annotations

import dataclasses
import math
import time
from pathlib import Path
from typing import Any

from benchmarks.common import (
    execution,
    lm_benchmark_main,
    machine,
    save_figure,
    seconds_per_token,
    write_json,
)
from sisa import PartitionConfig, Sisa, SisaConfig
from sisa.api import resolve_source
from sisa.builtin import stable_subset
from sisa.config import CausalLMConfig, Combine
from sisa.serving.scorers import perplexity

COMBINES: tuple[Combine, ...] = ("mean", "product", "merged")


@dataclasses.dataclass(frozen=True)
class Setting:
    model: str
    records: int  # chitchat training turns
    holdout: int  # held-out users' turns scored
    shards: tuple[int, ...]
    epochs: int
    top_k: int
    learning_rate: float
    max_length: int
    decode_tokens: int
    decode_repeats: int


FULL = Setting("SmolLM2-135M-Instruct", 2000, 200, (1, 2, 4, 8), 1, 2, 5e-3, 48, 16, 3)
TINY = Setting("", 48, 8, (1, 2, 4), 1, 1, 1e-2, 32, 4, 1)


def _config(s: Setting, shards: int) -> SisaConfig:
    return SisaConfig(
        partition=PartitionConfig(shards=shards, slices=1, seed=0),
        training=CausalLMConfig(model=s.model, epochs_per_slice=s.epochs, learning_rate=s.learning_rate,
                                top_k_layers=s.top_k, max_length=s.max_length),
        execution=execution())


def run(s: Setting, out: Path, work: Path) -> dict[str, Any]:
    started = time.perf_counter()
    rows, spec = resolve_source("builtin:chitchat", None)
    rows = stable_subset(rows, spec.id_column, s.records)
    held_rows, held_spec = resolve_source("builtin:chitchat:test", spec)
    held_rows = stable_subset(held_rows, held_spec.id_column, s.holdout)
    results: list[dict[str, Any]] = []
    first: Path | None = None
    base_log_ppl = math.nan
    for shards in s.shards:
        t = time.perf_counter()
        sisa = Sisa.train(work / f"s{shards}", rows, _config(s, shards), spec, embeddings_from=first)
        train_seconds = time.perf_counter() - t
        first = first or sisa.root
        scorer = sisa.language_model().with_base()
        held = sisa.lm_inputs([r["text"] for r in held_rows], None)
        point: dict[str, Any] = {"shards": shards, "train_seconds": train_seconds,
                                 "train_samples": sisa.training_report_.samples, "combine": {}}
        prompt = scorer.tokenizer("how was your day?", add_special_tokens=False)["input_ids"]
        for combine in COMBINES:
            scores = scorer.scores(held, combine)
            log_ppl = math.log(perplexity(scores, "ensemble"))
            base_log_ppl = math.log(perplexity(scores, "base"))
            point["combine"][combine] = {
                "holdout_perplexity": math.exp(log_ppl), "gain_nats": base_log_ppl - log_ppl,
                "seconds_per_token": seconds_per_token(scorer, prompt, combine, s.decode_tokens,
                                                       s.decode_repeats)}
            print(f"S={shards} {combine}: held-out ppl {math.exp(log_ppl):.3f}, "
                  f"{point['combine'][combine]['seconds_per_token'] * 1000:.1f} ms/token", flush=True)
        # One deletion: the first live record (one slice, so its shard retrains from scratch).
        victim = next(iter(sisa.live_records())).id
        receipt = sisa.forget([victim])
        point["deletion"] = {"seconds": receipt.seconds, "samples": receipt.samples_retrained}
        results.append(point)
        sisa.close()
    monolith = next((p for p in results if p["shards"] == 1), None)
    for p in results:
        for c in p["combine"].values():
            c["share_of_monolith_gain"] = (c["gain_nats"] / monolith["combine"]["mean"]["gain_nats"]
                                           if monolith else None)
    result = {"setting": dataclasses.asdict(s), "machine": machine(),
              "base_holdout_perplexity": math.exp(base_log_ppl), "points": results,
              "seconds": time.perf_counter() - started}
    _plot(result, out)
    (out / "summary.md").write_text(summary(result))
    write_json(out / "results.json", result)
    return result


def _plot(result: dict[str, Any], out: Path) -> None:
    import matplotlib.pyplot as plt

    fig, (gain, speed) = plt.subplots(1, 2, figsize=(10, 4))
    shards = [p["shards"] for p in result["points"]]
    for combine in COMBINES:
        gain.plot(shards, [p["combine"][combine]["gain_nats"] for p in result["points"]], "o-",
                  label=combine)
        speed.plot(shards, [p["combine"][combine]["seconds_per_token"] * 1000 for p in result["points"]],
                   "o-", label=combine)
    gain.set_xscale("log", base=2)
    gain.set_xlabel("shards S")
    gain.set_ylabel("held-out gain over the base (nats/token)")
    speed.set_xscale("log", base=2)
    speed.set_xlabel("shards S")
    speed.set_ylabel("ms per generated token")
    gain.legend()
    speed.legend()
    save_figure(fig, out, "scaling")


def summary(r: dict[str, Any]) -> str:
    s = r["setting"]
    lines = [f"Setting: {s['model'] or 'tiny'} on {s['records']} chitchat turns, {s['holdout']} "
             f"held-out users' turns, one slice, {s['epochs']} epoch, LoRA on the top {s['top_k']} "
             f"layers, lr {s['learning_rate']}, max length {s['max_length']}; {r['machine']}; "
             f"{r['seconds']:.0f} s in all. Base model's held-out perplexity: "
             f"{r['base_holdout_perplexity']:.3f}.", "",
             "| S | combine | held-out ppl | gain (nats/token) | share of S=1's gain | ms/token "
             "| one deletion (s) | samples retrained |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for p in r["points"]:
        for combine, c in p["combine"].items():
            share = "-" if c["share_of_monolith_gain"] is None else f"{c['share_of_monolith_gain']:.2f}"
            lines.append(f"| {p['shards']} | {combine} | {c['holdout_perplexity']:.3f} | "
                         f"{c['gain_nats']:.4f} | {share} | {c['seconds_per_token'] * 1000:.1f} | "
                         f"{p['deletion']['seconds']:.1f} | {p['deletion']['samples']} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    lm_benchmark_main(__doc__, FULL, TINY, run, summary, "sisa-lm-scaling-", options=("records",))


if __name__ == "__main__":
    main()
