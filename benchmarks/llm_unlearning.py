"""Unlearning in a causal LM, end to end: SISA's exact deletion against gradient ascent, gradient
difference and NPO on a monolithic LoRA model trained on the same data.

    python -m benchmarks.llm_unlearning --out results/llm        # SmolLM2-135M on chitchat (CPU: ~25 min)
    python -m benchmarks.llm_unlearning --tiny --model DIR --out D  # seconds: every code path

Writes results.json, summary.md and exposure.png to --out. The figures:
1. canary exposure before/after (own shard and ensemble) for SISA and each baseline, membership
   AUCs, retain and held-out perplexity, seconds per deletion;
2. ensemble decoding at S shards: per-token latency against a single adapter's;
3. the ensemble's held-out perplexity against the monolith's;
4. the deletion's retrain cost against retraining every shard and the monolith (samples; theory);
5. what top-k adaptation with cached lower-layer activations saves per retrain.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.common import execution, machine, save_figure, write_json
from sisa import PartitionConfig, Sisa, SisaConfig
from sisa.api import resolve_source
from sisa.builtin import stable_subset
from sisa.config import CausalLMConfig
from sisa.evidence import ks_pvalue
from sisa.serving.generation import decode
from sisa.unlearning import expected_speedup
from sisa.workflows.approximate import METHODS, scorer_for, unlearn
from sisa.workflows.proof import Evidence, make_canaries, measure, prove, stored_inputs, text_inputs


@dataclasses.dataclass(frozen=True)
class Setting:
    model: str
    records: int  # chitchat training turns (plus canary copies)
    canaries: int  # users with a canary (all forgotten)
    never: int  # canaries never inserted
    repeats: int
    digits: int
    shards: int
    slices: int
    epochs: int
    top_k: int
    learning_rate: float
    max_length: int
    holdout: int
    retain: int
    references: int
    baseline_steps: tuple[int, ...]
    baseline_rates: tuple[float, ...]
    decode_tokens: int
    topk_records: int  # records of the top-k comparison


# Never-inserted canaries cost nothing extra (every candidate secret is scored once per model), so
# 64 of them give the forgotten canaries a steady reference.
FULL = Setting("SmolLM2-135M-Instruct", 240, 8, 64, 8, 4, 4, 2, 3, 2, 5e-3, 64, 48, 48, 1000,
               (10,), (1e-4, 1e-3, 1e-2), 24, 32)
TINY = Setting("", 24, 2, 2, 2, 2, 2, 2, 1, 1, 1e-2, 32, 6, 6, 50, (2,), (1e-3, 1e-2), 4, 6)


def _config(s: Setting, shards: int, slices: int, top_k: int | None = None) -> SisaConfig:
    return SisaConfig(
        partition=PartitionConfig(shards=shards, slices=slices, seed=0),
        training=CausalLMConfig(model=s.model, epochs_per_slice=s.epochs, learning_rate=s.learning_rate,
                                top_k_layers=s.top_k if top_k is None else top_k,
                                max_length=s.max_length),
        execution=execution())


def _canary_summary(ev: Evidence, groups: set[str]) -> dict[str, Any]:
    gone = [c.exposure_shard for c in ev.canaries if c.inserted and c.group in groups
            and c.exposure_shard is not None]
    never = [c.exposure_shard for c in ev.canaries if not c.inserted and c.exposure_shard is not None]
    return {
        "forgotten_mean_exposure": statistics.fmean(gone) if gone else None,
        "never_mean_exposure": statistics.fmean(never) if never else None,
        "ks_pvalue": ks_pvalue(gone, never),
        "forgotten_greedy_reproduced": sum(bool(c.greedy_shard) for c in ev.canaries
                                           if c.inserted and c.group in groups),
        "membership_auc": ev.membership_auc.get("ensemble", {}),
        "perplexity": ev.perplexity,
    }


def _decode_latency(sisa: Sisa, tokens: int) -> dict[str, float]:
    """Seconds per generated token: the S-shard ensemble (one mixed-adapter pass per token)
    against one adapter alone, same prompt, greedy."""
    scorer = sisa.language_model()
    shard = next(iter(sisa.servable()))
    model: Any = sisa.shard_model(shard)
    single = sisa.language_model({shard: model.adapter()})  # that shard's adapter alone
    prompt = scorer.tokenizer("how was your day?", add_special_tokens=False)["input_ids"]
    out = {}
    for name, s in (("ensemble", scorer), ("single", single)):
        decode(s, prompt, 2)  # warm
        started = time.perf_counter()
        made = decode(s, prompt, tokens, stop=())
        out[name] = (time.perf_counter() - started) / max(1, len(made))
    out["ratio"] = out["ensemble"] / out["single"]
    out["shards"] = len(scorer.names)
    return out


def _topk_saving(s: Setting, rows: list[dict[str, Any]], spec: Any, work: Path) -> dict[str, Any]:
    """Seconds per training sample of one shard: LoRA on every layer against the top k on cached
    activations (the cache filled beforehand, as a retrain finds it)."""
    out: dict[str, Any] = {}
    data = rows[:s.topk_records]
    for name, top_k in (("all_layers", 0), (f"top_{s.top_k}", s.top_k)):
        cfg = _config(s, 1, 1, top_k)
        sisa = Sisa.train(work / f"topk-{name}", data, cfg, spec)
        first = sisa.training_report_
        retrain = sisa.repair(from_scratch=True)  # a retrain finds the activations cached
        out[name] = {"train_seconds": first.seconds, "retrain_seconds": retrain.seconds,
                     "samples": retrain.samples,
                     "seconds_per_sample": retrain.seconds / max(1, retrain.samples)}
        sisa.close()
    out["speedup"] = out["all_layers"]["seconds_per_sample"] / out[f"top_{s.top_k}"]["seconds_per_sample"]
    return out


def run(s: Setting, out: Path, work: Path) -> dict[str, Any]:
    started = time.perf_counter()
    rows, spec = resolve_source("builtin:chitchat", None)
    rows = stable_subset(rows, spec.id_column, s.records)
    canaries = make_canaries([r["sender"] for r in rows], s.canaries, s.never, s.digits, s.repeats)
    train = rows + canaries.rows(spec)
    groups = sorted({c.group for c in canaries.canaries if c.inserted})
    holdout = "builtin:chitchat:test"

    # SISA: train, prove (measure, forget every canary user in one request, measure).
    t = time.perf_counter()
    sisa = Sisa.train(work / "sisa", train, _config(s, s.shards, s.slices), spec)
    sisa_train = time.perf_counter() - t
    sisa_samples = sisa.training_report_.samples
    latency = _decode_latency(sisa, s.decode_tokens)
    proof = prove(sisa, canaries, holdout, groups, s.holdout, s.retain, references=s.references)
    receipt = sisa.deletions()[-1].receipt or {}
    # One more deletion, of a single chat turn: the cost the theory 3RS/(2R+1) speaks of.
    one = sisa.forget([sorted(r.id for r in sisa.live_records())[0]])

    # The monolith and the approximate baselines on it.
    t = time.perf_counter()
    mono = Sisa.train(work / "mono", train, _config(s, 1, 1), spec)
    mono_train = time.perf_counter() - t
    mono_samples = mono.training_report_.samples
    forget_ids = [i for g in groups for i in mono.group_ids(g)]
    forget_set = set(forget_ids)
    live = [r.id for r in mono.live_records() if r.id not in forget_set]
    retain_ids = [r["id"] for r in stable_subset([{"id": i} for i in live], "id", s.retain)]
    held_rows, held_spec = resolve_source(holdout, mono.data_spec)
    held_rows = stable_subset(held_rows, held_spec.id_column, s.holdout)
    held = text_inputs(mono, [r["text"] for r in held_rows], None)  # chitchat has no prompts
    forget_texts, retain_texts = stored_inputs(mono, forget_ids), stored_inputs(mono, retain_ids)
    shard_of = {c.id: 0 for c in canaries.canaries}

    def evidence(scorer: Any) -> Evidence:
        return measure(scorer, canaries, shard_of, forget_texts, held, retain_texts, [0],
                       references=s.references)

    baselines = [{"method": "none (monolith as trained)", "steps": 0, "learning_rate": 0.0,
                  "seconds": 0.0, **_canary_summary(evidence(mono.language_model()), set(groups))}]
    for method in METHODS:
        for steps in s.baseline_steps:
            for lr in s.baseline_rates:
                unlearned = unlearn(mono, forget_ids, retain_ids, method, steps, lr)
                found = evidence(scorer_for(mono, unlearned.adapter))
                baselines.append({"method": method, "steps": steps, "learning_rate": lr,
                                  "seconds": unlearned.seconds, **_canary_summary(found, set(groups))})
                print(f"{method} steps={steps} lr={lr}: {baselines[-1]['forgotten_mean_exposure']}, "
                      f"holdout ppl {found.perplexity['holdout']:.4g}", flush=True)
    mono_retrain_samples = mono_samples  # retraining the monolith without them: all of it again

    topk = _topk_saving(s, rows, spec, work)
    theory = expected_speedup(s.shards, s.slices)
    result: dict[str, Any] = {
        "setting": dataclasses.asdict(s),
        "machine": machine(),
        "sisa": {
            "train_seconds": sisa_train,
            "train_samples": sisa_samples,
            "deletion_seconds": proof.deletion_seconds,
            "deletion_samples": receipt.get("samples_retrained"),
            "shards_retrained": [a["shard"] for a in receipt.get("affected_shards", [])],
            "memorised": proof.memorised,
            "mean_exposure_before": proof.mean_exposure_before,
            "before": _canary_summary(proof.before, set(groups)),
            "after": _canary_summary(proof.after, set(groups)) if proof.after else None,
            "forgotten_like_never": proof.forgotten_like_never,
            "proof": proof.to_dict(),
        },
        "monolith": {"train_seconds": mono_train, "train_samples": mono_samples},
        "baselines": baselines,
        "decoding": latency,
        "perplexity": {"ensemble_holdout": proof.before.perplexity["holdout"],
                       "monolith_holdout": baselines[0]["perplexity"]["holdout"]},
        "retrain_cost": {
            "one_record_samples": one.samples_retrained,
            "one_record_seconds": one.seconds,
            "one_record_vs_all_shards": sisa_samples / max(1, one.samples_retrained),
            "deletion_samples": receipt.get("samples_retrained"),
            "all_shards_samples": sisa_samples,
            "monolith_samples": mono_retrain_samples,
            "vs_all_shards": sisa_samples / max(1, receipt.get("samples_retrained") or 1),
            "theory_one_deletion": theory,
            "note": f"{len(groups)} users forgotten in one request; theory is for one record",
        },
        "top_k": topk,
        "seconds": time.perf_counter() - started,
    }
    result["perplexity"]["ratio"] = (result["perplexity"]["ensemble_holdout"]
                                     / result["perplexity"]["monolith_holdout"])
    _plot(result, out)
    (out / "summary.md").write_text(summary(result))
    write_json(out / "results.json", result)
    sisa.close()
    mono.close()
    return result


def _plot(result: dict[str, Any], out: Path) -> None:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for b in result["baselines"][1:]:
        ax.scatter(b["perplexity"]["holdout"], b["forgotten_mean_exposure"] or 0,
                   label=f"{b['method']} lr={b['learning_rate']:g}")
    sisa = result["sisa"]
    ax.scatter(sisa["before"]["perplexity"]["holdout"], sisa["before"]["forgotten_mean_exposure"] or 0,
               marker="s", color="black", label="SISA before")
    if sisa["after"]:
        ax.scatter(sisa["after"]["perplexity"]["holdout"], sisa["after"]["forgotten_mean_exposure"] or 0,
                   marker="*", s=150, color="green", label="SISA after (exact)")
        never = sisa["after"]["never_mean_exposure"]
        if never is not None:
            ax.axhline(never, linestyle="--", color="grey", label="never-inserted canaries")
    ax.set_xscale("log")
    ax.set_xlabel("held-out perplexity (utility: lower is better)")
    ax.set_ylabel("forgotten canaries' exposure (bits)")
    ax.legend(fontsize=7)
    save_figure(fig, out, "exposure")


def summary(r: dict[str, Any]) -> str:
    s, sisa = r["setting"], r["sisa"]
    lines = [
        f"Setting: {s['model'] or 'tiny'} on {s['records']} chitchat turns plus {s['canaries']} "
        f"canaries x {s['repeats']} copies ({s['digits']} digits), S={s['shards']}, R={s['slices']}, "
        f"{s['epochs']} epochs per slice, LoRA on the top {s['top_k']} layers, lr {s['learning_rate']}; "
        f"{r['machine']}; {r['seconds']:.0f} s in all.", "",
        "| model | forgotten canaries' exposure (bits) | never-inserted (bits) | KS p | greedy reproduced "
        "| MIA AUC loss / zlib / min-k / min-k++ | held-out ppl | retain ppl | seconds |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]

    def row(name: str, x: dict[str, Any], seconds: Any) -> None:
        auc = x["membership_auc"]
        aucs = " / ".join(f"{auc.get(k, float('nan')):.2f}"
                          for k in ("loss", "zlib", "min_k", "min_k_plus_plus"))
        fmt = lambda v: "-" if v is None else f"{v:.2f}"  # noqa: E731
        lines.append(f"| {name} | {fmt(x['forgotten_mean_exposure'])} | {fmt(x['never_mean_exposure'])} "
                     f"| {fmt(x['ks_pvalue'])} | {x['forgotten_greedy_reproduced']} | {aucs} "
                     f"| {x['perplexity']['holdout']:.4g} | {x['perplexity']['retain']:.4g} | {seconds} |")

    row("SISA before", sisa["before"], f"train {sisa['train_seconds']:.0f}")
    if sisa["after"]:
        row("SISA after (exact)", sisa["after"], f"{sisa['deletion_seconds']:.1f}")
    for b in r["baselines"]:
        row(f"{b['method']} ({b['steps']} steps, lr {b['learning_rate']:g})", b, f"{b['seconds']:.1f}")
    d, p, c, t = r["decoding"], r["perplexity"], r["retrain_cost"], r["top_k"]
    k = f"top_{s['top_k']}"
    lines += ["",
              f"- Memorised before forgetting: {sisa['memorised']} (mean exposure on the own shard "
              f"{sisa['mean_exposure_before']:.2f} bits); forgotten canaries look like never-inserted "
              f"ones: {sisa['forgotten_like_never']}.",
              f"- Decoding at S={d['shards']}: {d['ensemble'] * 1000:.1f} ms per token against "
              f"{d['single'] * 1000:.1f} ms for one adapter ({d['ratio']:.2f}x).",
              f"- Held-out perplexity: ensemble {p['ensemble_holdout']:.2f}, monolith "
              f"{p['monolith_holdout']:.2f} ({p['ratio']:.3f}x).",
              f"- Deletion retrain: forgetting the {s['canaries']} users in one request retrained "
              f"{c['deletion_samples']} samples against {c['all_shards_samples']} for every shard "
              f"({c['vs_all_shards']:.2f}x fewer) and {c['monolith_samples']} for the monolith; one "
              f"chat turn then took {c['one_record_samples']} samples in {c['one_record_seconds']:.1f} s "
              f"({c['one_record_vs_all_shards']:.2f}x fewer than every shard; theory for one record "
              f"{c['theory_one_deletion']:.2f}x, an expectation over slices).",
              f"- Top-k: {t['all_layers']['seconds_per_sample'] * 1000:.0f} ms per training sample "
              f"with LoRA on every layer, {t[k]['seconds_per_sample'] * 1000:.0f} ms on the top "
              f"{s['top_k']} with cached activations ({t['speedup']:.2f}x)."]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--tiny", action="store_true", help="seconds of work: every code path")
    parser.add_argument("--model", help="causal LM directory (default: the packaged SmolLM2)")
    args = parser.parse_args()
    setting = TINY if args.tiny else FULL
    if args.model:
        setting = dataclasses.replace(setting, model=args.model)
    if not setting.model:
        parser.error("--tiny needs --model DIR (a small causal LM)")
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="sisa-llm-bench-") as tmp:
        result = run(setting, args.out, Path(tmp))
    print(summary(result))
    print(json.dumps({"out": str(args.out)}))


if __name__ == "__main__":
    main()

