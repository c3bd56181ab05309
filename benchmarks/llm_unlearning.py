"""Unlearning in a causal LM, measured as a reviewer would: SISA's exact deletion and five tuned
approximate baselines (gradient ascent, gradient difference, NPO, SimNPO, RMU) on a monolith,
every forgetting figure against its retrained oracle, with bootstrap confidence intervals, an
equivalence test with its power, and a utility gate.

    python -m benchmarks.llm_unlearning --out results/llm           # SmolLM2-135M on chitchat (CPU: hours)
    python -m benchmarks.llm_unlearning --out D --methods none      # SISA's part alone
    python -m benchmarks.llm_unlearning --out D --shards 4 --canaries 24 --per-user 1  # any setting field
    python -m benchmarks.llm_unlearning --tiny --model DIR --out D  # seconds: every code path

results.json and summary.md are written once SISA's part is done, and again with the baselines.

- Data: chitchat turns of training users plus `per_user` canaries of each forgotten user (each a
  secret of random digits, inserted `repeats` times); held-out texts are turns of users never trained on
  (`builtin:chitchat:test`); never-inserted canaries (free: every candidate secret is scored once
  per model) give the null distribution of exposure.
- SISA: train, forget every canary user in one request, and check the store after against the
  retrained oracle (a scratch store on the records left) by sha256; its verdict (`prove`).
- Baselines: a monolith (one shard, one slice) trained with enough epochs to memorise the canaries
  about as much as the shards do (both stated); each method swept over learning rate and epochs
  (OpenUnlearning's default point among them, with its warm-up, weight decay and batch 32), on
  the forgotten users' distinct texts with retain texts drawn from a set kept apart from the
  retain texts measured; the point selected is the one whose forgotten canaries' exposure is
  closest to the oracle's among those within the utility gate (held-out perplexity at most 1.05x
  the monolith's). The oracle: the monolith retrained without the forgotten users.
- Figures per model: forgotten canaries' exposure (raw; gained over the base model), its paired
  difference from the oracle's exposure of the same secrets, and the TOST against never-inserted
  canaries with its power; membership AUCs of forgotten natural turns and of canary texts (each
  against held-out texts) for LOSS, zlib, Min-K%, Min-K%++, the reference attack (log-likelihood
  over the base model's) and, for single models, the gradient norm; each AUC minus the oracle's
  (privleak-style), with 95% bootstrap intervals; held-out, retain and forget perplexity; compute.
- Also: per-token decoding latency of the mixture, product and merged adapter against one adapter;
  the export's load check (`sisa export --format hf`, loaded by transformers in a process that
  cannot import sisa).

Writes results.json, summary.md and exposure.png to --out.
"""

from __future__ import annotations

import dataclasses
import json
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
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
from sisa import PartitionConfig, Sisa, SisaConfig, evidence
from sisa.api import resolve_source
from sisa.builtin import stable_subset
from sisa.config import CausalLMConfig, Combine
from sisa.serving.scorers import perplexity
from sisa.unlearning import expected_speedup
from sisa.workflows.approximate import METHODS, Method, monolith_model, scorer_for, select, sweep
from sisa.workflows.attacks import gradient_norm_scores
from sisa.workflows.export import export_hf
from sisa.workflows.proof import (
    POWER_NEEDED,
    UTILITY_GATE,
    Evidence,
    equivalence,
    make_canaries,
    measure,
    prove,
    stored_inputs,
    text_inputs,
)

SCORES = ("loss", "zlib", "min_k", "min_k_plus_plus", "reference")


@dataclasses.dataclass(frozen=True)
class Setting:
    model: str
    records: int  # chitchat training turns (plus canary copies)
    canaries: int  # canaries inserted (all forgotten, with their users)
    per_user: int  # canaries per user
    never: int  # canaries never inserted
    repeats: int
    digits: int
    shards: int
    slices: int
    epochs: int  # per slice, for the shards
    mono_epochs: int  # for the monolith, to memorise about as much as the shards
    top_k: int
    learning_rate: float
    max_length: int
    holdout: int
    retain: int  # retain texts measured
    retain_train: int  # retain texts the methods with a retain term draw from (disjoint)
    references: int
    grid: tuple[tuple[int, float], ...]  # (epochs, learning rate) points of every method
    margin: float  # TOST margin, bits
    decode_tokens: int
    # The approximate methods run on the monolith, comma-separated: "all", or "none" for SISA's
    # part alone (its verdict, oracle check, decoding and export: no monolith, oracle or sweeps).
    methods: str = "all"
    # False: the baselines alone (no SISA store: its part has its own runs, `--methods none`).
    sisa_part: bool = True
    mono_rank: int = 8  # the monolith's LoRA rank (the shards': CausalLMConfig's default, 8)
    mono_learning_rate: float = 0.0  # the monolith's (0: the shards' `learning_rate`)


# Never-inserted canaries cost nothing extra (every candidate secret is scored once per model).
# The TOST (margin 0.5 bit) needs about 80 forgotten canaries for 90% power at the spread seen
# (sd 1.32 bits; 24 gave v0.8's run 22%); 3 per user reach it with 28 users. At S=4 the shards
# memorised too little for the verdict to judge (about 20 canaries per top-2-layer adapter;
# reference/v0.10-lm-memorisation); at S=8 they memorise 10.8-10.9 bits against the 9.97-bit bar.
# 78 canaries gave 89.9% power, 84 gave 91.6% (reference/v0.11-llm-unlearning). The monolith,
# one rank-8 top-2-layer adapter for all of them, memorised far less at 5 epochs (3.95 bits at
# 78). At rank 64 (the S shards' parameters together), 10 epochs and lr 5e-3 it diverged (1.89 bits,
# held-out perplexity 1,498); the pilots of reference/v0.12-lm-memorisation measure the others.
FULL = Setting("SmolLM2-135M-Instruct", 240, 84, 3, 4096, 12, 4, 8, 2, 5, 5, 2, 5e-3, 64, 64, 48, 48,
               1000, ((10, 1e-5), (10, 1e-4), (5, 5e-4)), 0.5, 16)
TINY = Setting("", 24, 3, 2, 4, 2, 2, 2, 2, 1, 2, 1, 1e-2, 32, 6, 6, 6, 50, ((1, 1e-3), (2, 1e-2)),
               0.5, 4)


# The setting's fields the command line can change (--per-user 3, --methods none, ...).
OPTIONS = ("records", "canaries", "per_user", "never", "repeats", "epochs", "mono_epochs",
           "mono_rank", "mono_learning_rate", "learning_rate", "shards", "slices", "top_k", "methods",
           "sisa_part")


def _config(s: Setting, shards: int, slices: int, epochs: int, rank: int = 8,
            learning_rate: float = 0.0) -> SisaConfig:
    return SisaConfig(
        partition=PartitionConfig(shards=shards, slices=slices, seed=0),
        training=CausalLMConfig(model=s.model, epochs_per_slice=epochs,
                                learning_rate=learning_rate or s.learning_rate,
                                top_k_layers=s.top_k, max_length=s.max_length,
                                lora_r=rank, lora_alpha=2 * rank),  # the scale alpha / r stays 2
        execution=execution())


def _mono_config(s: Setting) -> SisaConfig:
    """The monolith's (and its oracle's): one shard, one slice, its own epochs, rank and rate."""
    return _config(s, 1, 1, s.mono_epochs, s.mono_rank, s.mono_learning_rate)


def training_data(s: Setting) -> tuple[list[dict[str, Any]], Any, Any]:
    """The setting's training records (chitchat turns plus every canary's copies), their data
    spec, and the canary set (`benchmarks.lm_memorisation` trains on the same)."""
    rows, spec = resolve_source("builtin:chitchat", None)
    rows = stable_subset(rows, spec.id_column, s.records)
    canaries = make_canaries([r["sender"] for r in rows], s.canaries, s.never, s.digits, s.repeats,
                             per_user=s.per_user)
    return rows + canaries.rows(spec), spec, canaries


def _mean_ci(values: Sequence[float]) -> dict[str, Any]:
    values = [float(v) for v in values]
    lo, hi = evidence.bootstrap_ci(values)
    return {"mean": statistics.fmean(values) if values else None, "ci": [lo, hi], "n": len(values)}


def _canaries(ev: Evidence, groups: set[str], oracle: Evidence | None) -> dict[str, Any]:
    """The forgotten canaries' exposure on their own shard (raw, and gained over the base), its
    paired difference from the oracle's exposure of the same secrets, the never-inserted ones',
    and the TOST of the two on exposure gained over the base."""
    gone = [c for c in ev.canaries if c.inserted and c.group in groups and c.exposure_shard is not None]
    never = [c for c in ev.canaries if not c.inserted and c.exposure_shard is not None]
    out: dict[str, Any] = {
        "forgotten": _mean_ci([c.exposure_shard for c in gone]),  # type: ignore[misc]
        "forgotten_gained": _mean_ci([c.calibrated_shard for c in gone]),  # type: ignore[misc]
        "never": _mean_ci([c.exposure_shard for c in never]),  # type: ignore[misc]
        "never_gained": _mean_ci([c.calibrated_shard for c in never]),  # type: ignore[misc]
        "greedy_reproduced": sum(bool(c.greedy_shard) for c in gone),
        "tost": equivalence([float(c.calibrated_shard) for c in gone],  # type: ignore[arg-type]
                            [float(c.calibrated_shard) for c in never], MARGIN[0]),  # type: ignore[arg-type]
    }
    if oracle is not None:
        theirs = {c.id: c.exposure_shard for c in oracle.canaries}
        out["minus_oracle"] = _mean_ci([float(c.exposure_shard) - float(theirs[c.id])  # type: ignore[arg-type]
                                        for c in gone if theirs.get(c.id) is not None])
    return out


ORACLE = "oracle (monolith retrained without them)"
MARGIN = [0.5]  # set from the setting in `run` (the TOST margin the summary states)


def _mia(ev: Evidence, kinds: list[str], oracle: Evidence | None,
         grad: dict[str, list[float]] | None = None,
         oracle_grad: dict[str, list[float]] | None = None) -> dict[str, Any]:
    """Per kind of forgotten text (natural turns, canary texts), per score: the AUC against the
    held-out texts with its interval, and minus the oracle's AUC (interval; privleak)."""
    out: dict[str, Any] = {}
    scores = {k: dict(v) for k, v in ev.member_scores.items()}
    theirs = {k: dict(v) for k, v in oracle.member_scores.items()} if oracle is not None else None
    if grad is not None:
        scores["forget"]["gradient_norm"] = grad["forget"]
        scores["holdout"]["gradient_norm"] = grad["holdout"]
        if theirs is not None and oracle_grad is not None:
            theirs["forget"]["gradient_norm"] = oracle_grad["forget"]
            theirs["holdout"]["gradient_norm"] = oracle_grad["holdout"]
    for kind in ("natural", "canary"):
        idx = [i for i, k in enumerate(kinds) if k == kind]
        if not idx:
            continue
        out[kind] = {}
        for name, values in scores.get("forget", {}).items():
            f = [values[i] for i in idx]
            h = scores["holdout"][name]
            row: dict[str, Any] = {"auc": evidence.auc(f, h), "ci": list(evidence.auc_ci(f, h))}
            if theirs is not None and name in theirs.get("forget", {}):
                of = [theirs["forget"][name][i] for i in idx]
                oh = theirs["holdout"][name]
                row["oracle_auc"] = evidence.auc(of, oh)
                row["minus_oracle_ci"] = list(evidence.auc_difference_ci(f, h, of, oh))
                row["privleak"] = evidence.privleak(row["auc"], row["oracle_auc"])
            out[kind][name] = row
    return out


def _kinds(texts: list[str], canaries: Any) -> list[str]:
    canary_texts = {canaries.text(c) for c in canaries.canaries if c.inserted}
    return ["canary" if t in canary_texts else "natural" for t in texts]


def _grad(store: Sisa, model: Any, forget: Any, holdout: Any) -> dict[str, list[float]]:
    """The gradient-norm attack's scores (higher: more member-like) of the forget and held-out
    texts under a single model of `store` (inputs as it trains on them: the frozen layers'
    activations computed, or read from its cache)."""
    return {name: list(map(float, gradient_norm_scores(model, store.model_inputs(part[1], None))))
            for name, part in (("forget", forget), ("holdout", holdout))}


def _decode_latency(sisa: Sisa, tokens: int) -> dict[str, Any]:
    """Seconds per generated token: the S-shard ensemble under each combination (mean and
    product run one row per shard; merged, one row) against one adapter alone, greedy."""
    scorer = sisa.language_model()
    shard = next(iter(sisa.servable()))
    model: Any = sisa.shard_model(shard)
    single = sisa.language_model({shard: model.adapter()})
    prompt = scorer.tokenizer("how was your day?", add_special_tokens=False)["input_ids"]
    out: dict[str, Any] = {"shards": len(scorer.names)}
    runs: list[tuple[str, Any, Combine]] = [("single", single, "mean"), ("mean", scorer, "mean"),
                                            ("product", scorer, "product"), ("merged", scorer, "merged")]
    for name, s, combine in runs:
        out[name] = seconds_per_token(s, prompt, combine, tokens)
    for name in ("mean", "product", "merged"):
        out[f"{name}_vs_single"] = out[name] / out["single"]
    return out


def _export_check(sisa: Sisa, work: Path, texts: list[str], max_length: int) -> dict[str, Any]:
    """Export the store and load it with transformers alone, in a process where importing sisa
    fails; its held-out perplexity beside the merged adapter's, as sisa serves it."""
    target = work / "export"
    report = export_hf(sisa, target)
    probe = (
        "import sys, json, math, torch\n"
        "sys.modules['sisa'] = None  # no sisa: importing it fails\n"
        "from transformers import AutoModelForCausalLM, AutoTokenizer\n"
        "d, texts, most = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3])\n"
        "tok = AutoTokenizer.from_pretrained(d); model = AutoModelForCausalLM.from_pretrained(d).eval()\n"
        "nll = n = 0\n"
        "for t in texts:\n"
        "    ids = tok(t, return_tensors='pt', add_special_tokens=False)['input_ids']\n"
        "    if tok.eos_token_id is not None:\n"
        "        ids = torch.cat([ids, torch.tensor([[tok.eos_token_id]])], 1)\n"
        "    ids = ids[:, :most]  # as sisa truncates\n"
        "    with torch.no_grad():\n"
        "        logp = torch.log_softmax(model(input_ids=ids).logits[0, :-1].double(), -1)\n"
        "    nll -= float(logp[torch.arange(ids.shape[1] - 1), ids[0, 1:]].sum()); n += ids.shape[1] - 1\n"
        "print(json.dumps({'perplexity': math.exp(nll / n), 'tokens': n,\n"
        "                  'provenance': json.load(open(d + '/sisa_provenance.json'))['receipts_head']}))\n")
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", probe, str(target), json.dumps(texts), str(max_length)],
                          capture_output=True, text=True, timeout=900)
    loaded: dict[str, Any] | None = (json.loads(proc.stdout.strip().splitlines()[-1])
                                     if proc.returncode == 0 else None)
    merged = sisa.language_model().scores(sisa.lm_inputs(texts, None), "merged")
    return {"loaded": loaded is not None, "error": None if loaded else proc.stderr[-2000:],
            "load_seconds": time.perf_counter() - started,
            "export_perplexity": loaded["perplexity"] if loaded is not None else None,
            "merged_perplexity": perplexity(merged, "ensemble"),
            "receipts_head": report.receipts_head,
            "provenance_matches": loaded is not None and loaded["provenance"] == report.receipts_head}


def _methods(spec: str) -> tuple[Method, ...]:
    """The approximate methods `--methods` names: "all", "none", or a comma-separated list."""
    if spec == "all":
        return METHODS
    if spec == "none":
        return ()
    names = [m.strip() for m in spec.split(",") if m.strip()]
    unknown = [m for m in names if m not in METHODS]
    if unknown or not names:
        raise SystemExit(f"--methods: unknown method(s) {unknown or [spec]}; choose from "
                         f"{', '.join(METHODS)}, or all, or none")
    return tuple(m for m in METHODS if m in names)


def _baselines(s: Setting, work: Path, train: list[dict[str, Any]], spec: Any, canaries: Any,
               groups: list[str], held_texts: list[str], embeddings: Path | None,
               methods: Sequence[Method]) -> dict[str, Any]:
    """The monolith, its oracle (the monolith retrained without the forgotten users), and each
    approximate method swept on the monolith, its point selected under the utility gate."""
    gone = set(groups)
    rank = s.mono_rank
    t = time.perf_counter()
    mono = Sisa.train(work / "mono", train, _mono_config(s), spec,
                      embeddings_from=embeddings)
    mono_train = time.perf_counter() - t
    held = text_inputs(mono, held_texts, None)  # chitchat has no prompts
    forget_ids = [i for g in groups for i in mono.group_ids(g)]
    forget = stored_inputs(mono, forget_ids)  # distinct texts
    kinds = _kinds(forget[1], canaries)
    inserted = [c for c in canaries.canaries if c.inserted]
    copies = {i for c in inserted for i in canaries.record_ids(c)}
    firsts = {canaries.record_ids(c)[0] for c in inserted}
    # The distinct texts: one record of each canary's copies.
    distinct_forget = [i for i in forget_ids if i not in copies or i in firsts]
    forget_set = set(forget_ids)
    live = [r.id for r in mono.live_records() if r.id not in forget_set]
    pool = [r["id"] for r in stable_subset([{"id": i} for i in live], "id", s.retain + s.retain_train)]
    retain_ids, retain_train_ids = pool[:s.retain], pool[s.retain:]
    retain = stored_inputs(mono, retain_ids)
    shard_of = {c.id: 0 for c in canaries.canaries}

    def evidence_of(scorer: Any) -> Evidence:
        return measure(scorer, canaries, shard_of, forget, held, retain, [0], references=s.references)

    mono_ev = evidence_of(mono.language_model())
    mono_grad = _grad(mono, monolith_model(mono), forget, held)
    utility = mono_ev.perplexity["holdout"]
    memorised = statistics.fmean(float(c.exposure_shard) for c in mono_ev.canaries  # type: ignore[arg-type]
                                 if c.inserted and c.group in gone)
    print(f"monolith ({s.mono_epochs} epochs, rank {rank}, lr {s.mono_learning_rate or s.learning_rate:g}, "
          f"{mono_train:.0f} s): forgotten canaries' "
          f"mean exposure {memorised:.2f} bits, held-out ppl {utility:.4g}", flush=True)
    t = time.perf_counter()
    kept = [r for r in train if str(r.get(str(spec.group_column))) not in gone]
    oracle = Sisa.train(work / "oracle", kept, _mono_config(s), spec,
                        embeddings_from=embeddings)
    oracle_seconds = time.perf_counter() - t
    oracle_ev = evidence_of(oracle.language_model())
    oracle_grad = _grad(oracle, monolith_model(oracle), forget, held)

    def summarise(name: str, ev: Evidence, grad: dict[str, list[float]] | None,
                  **extra: Any) -> dict[str, Any]:
        """A monolith-family model against the monolith's oracle."""
        return {"model": name, "canaries": _canaries(ev, gone, oracle_ev),
                "mia": _mia(ev, kinds, oracle_ev, grad, oracle_grad),
                "perplexity": ev.perplexity, **extra}

    models = [summarise("monolith before", mono_ev, mono_grad, seconds=0.0),
              summarise(ORACLE, oracle_ev, oracle_grad,
                        seconds=oracle_seconds, samples=oracle.training_report_.samples)]
    sweeps: dict[str, list[dict[str, Any]]] = {}
    for method in methods:
        grid = [{"epochs": e, "learning_rate": lr} for e, lr in s.grid]
        points, adapters, evs = [], [], []
        for run_ in sweep(mono, distinct_forget, retain_train_ids, method, grid):
            ev = evidence_of(scorer_for(mono, run_.adapter))
            point = summarise(method, ev, None, **run_.summary())
            point["distance_to_oracle"] = abs(point["canaries"]["minus_oracle"]["mean"])
            points.append(point)
            adapters.append(run_.adapter)
            evs.append(ev)
            print(f"{method} {run_.epochs} epochs lr {run_.learning_rate:g}: exposure "
                  f"{point['canaries']['forgotten']['mean']:.2f} (oracle "
                  f"{models[1]['canaries']['forgotten']['mean']:.2f}), held-out ppl "
                  f"{ev.perplexity['holdout']:.4g}, {run_.seconds:.0f} s", flush=True)
        sweeps[method] = points
        chosen = select(points, utility, UTILITY_GATE,
                        perplexity=lambda p: p["perplexity"]["holdout"],
                        forgetting=lambda p: -p["distance_to_oracle"])
        # None passes the gate: the least damaging point is shown, marked as failing it.
        shown = chosen if chosen is not None else min(points, key=lambda p: p["perplexity"]["holdout"])
        # The gradient-norm attack on the shown point's own adapter.
        at = points.index(shown)
        unlearned = monolith_model(mono)
        unlearned.load_adapter(adapters[at])
        shown = {**shown, "passes_gate": chosen is not None,
                 "mia": _mia(evs[at], kinds, oracle_ev, _grad(mono, unlearned, forget, held),
                             oracle_grad)}
        models.append(shown)

    for store in (mono, oracle):
        store.close()
    return {"models": models, "sweeps": sweeps, "utility": utility,
            "monolith": {"train_seconds": mono_train, "train_samples": mono.training_report_.samples,
                         "epochs": s.mono_epochs, "rank": rank,
                         "learning_rate": s.mono_learning_rate or s.learning_rate,
                         "mean_exposure_before": models[0]["canaries"]["forgotten"]["mean"]},
            "oracle_samples": oracle.training_report_.samples}


def _sisa(s: Setting, work: Path, train: list[dict[str, Any]], spec: Any, canaries: Any,
          groups: list[str], holdout: str, held_texts: list[str]) -> tuple[dict[str, Any], Path]:
    """SISA's part: train, forget the canary users in one request, check the store after against
    its retrained oracle; decoding latency and the export's load check. Returns the result's
    SISA entries and the store's root (the monolith reuses its embedding cache)."""
    gone = set(groups)
    t = time.perf_counter()
    sisa = Sisa.train(work / "sisa", train, _config(s, s.shards, s.slices, s.epochs), spec)
    sisa_train = time.perf_counter() - t
    latency = _decode_latency(sisa, s.decode_tokens)
    # The forgotten texts as `prove` scores them (their kinds), read before they are deleted.
    sisa_kinds = _kinds(stored_inputs(sisa, [i for g in groups for i in sisa.group_ids(g)])[1], canaries)
    proof = prove(sisa, canaries, holdout, groups, s.holdout, s.retain, references=s.references,
                  in_place=True, oracle=True, margin=s.margin)
    receipt = sisa.deletions()[-1].receipt or {}
    print(f"SISA: verdict {proof.verdict} ({proof.verdict_reason})", flush=True)

    # SISA's oracle is a scratch SISA store on the records left, and the store after the deletion
    # is that store byte for byte (`proof.oracle`): its own evidence after is the oracle's.
    after: Evidence = proof.after  # type: ignore[assignment]
    sisa_rows = [{"model": name, "canaries": _canaries(ev, gone, after),
                  "mia": _mia(ev, sisa_kinds, after), "perplexity": ev.perplexity, **extra}
                 for name, ev, extra in (
                     ("SISA before", proof.before, {"seconds": sisa_train}),
                     ("SISA after (exact)", after, {"seconds": proof.deletion_seconds,
                                                    "samples": receipt.get("samples_retrained")}))]
    export = _export_check(sisa, work, held_texts, s.max_length)
    tost = proof.tost or {}
    part = {
        "sisa": {
            "train_seconds": sisa_train, "train_samples": sisa.training_report_.samples,
            "deletion_seconds": proof.deletion_seconds,
            "deletion_samples": receipt.get("samples_retrained"),
            "shards_retrained": [a["shard"] for a in receipt.get("affected_shards", [])],
            "memorised": proof.memorised, "mean_exposure_before": proof.mean_exposure_before,
            "verdict": proof.verdict, "verdict_reason": proof.verdict_reason,
            "oracle": proof.oracle.to_dict() if proof.oracle else None,
            "tost": tost, "proof": proof.to_dict(),
        },
        "models": sisa_rows,
        "power": {"needed": POWER_NEEDED, "margin": s.margin, "sisa_tost_power": tost.get("power"),
                  "forgotten_needed": tost.get("forgotten_needed")},
        "decoding": latency,
        "export": export,
        "retrain_cost": {"deletion_samples": receipt.get("samples_retrained"),
                         "all_shards_samples": sisa.training_report_.samples,
                         "theory_one_deletion": expected_speedup(s.shards, s.slices)},
    }
    sisa.close()
    return part, sisa.root


def run(s: Setting, out: Path, work: Path) -> dict[str, Any]:
    started = time.perf_counter()
    methods = _methods(s.methods)  # before any work: a misspelt method fails at once
    if not s.sisa_part and not methods:
        raise SystemExit("--sisa-part no with --methods none leaves nothing to run")
    MARGIN[0] = s.margin
    train, spec, canaries = training_data(s)
    groups = sorted({c.group for c in canaries.canaries if c.inserted})
    holdout = "builtin:chitchat:test"
    # The held-out texts every model is measured on: turns of users never trained on.
    held_rows, held_spec = resolve_source(holdout, spec)
    held_texts = [r["text"] for r in stable_subset(held_rows, held_spec.id_column, s.holdout)]

    result: dict[str, Any] = {"setting": dataclasses.asdict(s), "machine": machine(), "models": []}

    def write() -> None:
        result["seconds"] = time.perf_counter() - started
        _plot(result, out)
        (out / "summary.md").write_text(summary(result))
        write_json(out / "results.json", result)

    embeddings = None
    if s.sisa_part:
        part, embeddings = _sisa(s, work, train, spec, canaries, groups, holdout, held_texts)
        result.update(part)
        write()  # SISA's part stands on its own: a long run stopped in the baselines keeps it
    if methods:
        family = _baselines(s, work, train, spec, canaries, groups, held_texts, embeddings, methods)
        result["models"] = [*result["models"], *family["models"]]
        result["monolith"] = family["monolith"]
        result["sweeps"] = family["sweeps"]
        result["utility_gate"] = {"factor": UTILITY_GATE,
                                  "monolith_holdout_perplexity": family["utility"]}
        result.setdefault("retrain_cost", {})["monolith_retrain_samples"] = family["oracle_samples"]
        write()
    return result


def _plot(result: dict[str, Any], out: Path) -> None:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for method, points in result.get("sweeps", {}).items():
        ax.scatter([p["perplexity"]["holdout"] for p in points],
                   [p["canaries"]["forgotten"]["mean"] for p in points], label=method, s=18)
    models = result["models"]
    # SISA before and after, and (with the baselines) the monolith's oracle.
    marked = {"SISA before": "s", "SISA after (exact)": "*", ORACLE: "D"}
    for m in models:
        if m["model"] not in marked:
            continue
        marker = marked[m["model"]]
        ax.scatter(m["perplexity"]["holdout"], m["canaries"]["forgotten"]["mean"], marker=marker, s=90,
                   color="black", label=m["model"])
    gate = result.get("utility_gate")
    if gate is not None:
        ax.axvline(gate["factor"] * gate["monolith_holdout_perplexity"], linestyle=":", color="grey",
                   label=f"utility gate ({gate['factor']:g}x)")
    never = models[1]["canaries"]["never"]["mean"]
    if never is not None:
        ax.axhline(never, linestyle="--", color="grey", label="never-inserted canaries")
    ax.set_xscale("log")
    ax.set_xlabel("held-out perplexity (utility: lower is better)")
    ax.set_ylabel("forgotten canaries' exposure (bits)")
    ax.legend(fontsize=6)
    save_figure(fig, out, "exposure")


def _ci(x: dict[str, Any]) -> str:
    if x.get("mean") is None:
        return "-"
    lo, hi = x["ci"]
    return f"{x['mean']:.2f} [{lo:.2f}, {hi:.2f}]"


def summary(r: dict[str, Any]) -> str:
    s, sisa = r["setting"], r.get("sisa")
    mono = r.get("monolith")
    shards = (f"shards {sisa['mean_exposure_before']:.2f} bits, " if sisa else
              "shards not measured in this run (--sisa-part no), ")
    if mono:
        monolith = (f"monolith {mono['mean_exposure_before']:.2f} bits ({mono['epochs']} epochs, LoRA "
                    f"rank {mono.get('rank', 8)}, lr {mono.get('learning_rate', s['learning_rate']):g}, "
                    f"{mono['train_seconds']:.0f} s).")
    elif s.get("methods") == "none":
        monolith = "no monolith or baselines (--methods none)."
    else:
        monolith = "the monolith and the baselines not yet measured (they run next)."
    lines = [
        f"Setting: {s['model'] or 'tiny'} on {s['records']} chitchat turns plus {s['canaries']} "
        f"canaries ({s.get('per_user', 1)} per user) x {s['repeats']} copies ({s['digits']} digits; "
        f"{s['never']} never-inserted "
        f"canaries), S={s['shards']}, R={s['slices']}, {s['epochs']} epochs per slice (the monolith "
        f"{s['mono_epochs']} epochs), LoRA on the top {s['top_k']} layers, lr {s['learning_rate']}; "
        f"{r['machine']}; {r['seconds']:.0f} s in all.", "",
        f"Memorisation before forgetting (forgotten canaries' mean exposure): {shards}{monolith}",
        "", "Brackets: 95% bootstrap intervals. Exposure on the canary's own model, in bits; "
        "'- oracle': paired difference from the oracle's exposure of the same secrets; AUC: forgotten "
        "texts against held-out users' texts (0.5: indistinguishable), '- oracle' its difference "
        "from the oracle's AUC.", "",
        "| model | canaries' exposure | - oracle | gained over base | TOST p (power) | natural turns: "
        "LOSS AUC - oracle | canary texts: LOSS AUC | reference AUC - oracle (natural) | held-out ppl "
        "| retain ppl | seconds |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for m in r["models"]:
        c, mia = m["canaries"], m["mia"]
        nat, can = mia.get("natural", {}), mia.get("canary", {})

        def diff(block: dict[str, Any], score: str) -> str:
            row = block.get(score)
            if not row or "minus_oracle_ci" not in row:
                return "-" if not row else f"{row['auc']:.2f}"
            lo, hi = row["minus_oracle_ci"]
            return f"{row['auc'] - row['oracle_auc']:+.2f} [{lo:+.2f}, {hi:+.2f}]"

        loss_can = can.get("loss")
        name = m["model"]
        if "hyperparameters" in m:
            h = m["hyperparameters"]
            gate = "" if m.get("passes_gate") else ", fails the gate"
            name = f"{m['method']} ({h['epochs']} ep, lr {h['learning_rate']:g}{gate})"
        tost = c["tost"]
        lines.append(
            f"| {name} | {_ci(c['forgotten'])} | {_ci(c.get('minus_oracle', {}))} | "
            f"{_ci(c['forgotten_gained'])} | {tost['p_value']:.3f} ({tost['power']:.1%}) | "
            f"{diff(nat, 'loss')} | {loss_can['auc']:.2f} | {diff(nat, 'reference')} | "
            f"{m['perplexity']['holdout']:.4g} | {m['perplexity']['retain']:.4g} | "
            f"{(m.get('seconds') or 0):.1f} |" if loss_can else f"| {name} | - |")
    c = r.get("retrain_cost", {})
    oracle = next((m for m in r["models"] if m["model"] == ORACLE), None)
    mono_compute = (f"the monolith's retrain (oracle) {oracle['seconds']:.0f} s "
                    f"({c['monolith_retrain_samples']} samples); each baseline's seconds in the table "
                    "(its forward/backward passes, at its selected point)." if oracle else "")
    if not sisa:
        return "\n".join([*lines, "", f"- Compute: {mono_compute}"]) + "\n"
    d, e = r["decoding"], r["export"]
    o = sisa["oracle"] or {}
    lines += [
        "",
        f"- SISA's verdict: **{sisa['verdict']}**: {sisa['verdict_reason']}",
        f"- The store after the deletion against its retrained oracle: "
        f"{'identical' if o.get('identical') else 'DIFFERENT'} ({len(o.get('shards', {}))} shards, "
        f"sha256; the oracle trained in {o.get('seconds', 0):.0f} s on {o.get('records')} records).",
        f"- TOST power at this run's sizes (margin {s['margin']} bit): "
        f"{r['power']['sisa_tost_power'] or 0:.1%}; {r['power']['needed']:.0%} needs "
        f"{r['power']['forgotten_needed']} forgotten canaries.",
        f"- Compute: SISA's deletion {sisa['deletion_seconds']:.0f} s ({sisa['deletion_samples']} "
        f"samples; shards {sisa['shards_retrained']})" + (f"; {mono_compute}" if oracle else "."),
        f"- Decoding at S={d['shards']}: one adapter {d['single'] * 1000:.1f} ms/token; mixture "
        f"{d['mean_vs_single']:.2f}x, product {d['product_vs_single']:.2f}x, merged "
        f"{d['merged_vs_single']:.2f}x.",
        f"- Export (`sisa export --format hf`), loaded by transformers with sisa unimportable: "
        f"{'yes' if e['loaded'] else 'NO'}; held-out perplexity {e['export_perplexity']} against "
        f"{e['merged_perplexity']} for the merged adapter as sisa serves it; provenance names the "
        f"receipt head: {e['provenance_matches']}."]
    return "\n".join(lines) + "\n"


def main() -> None:
    lm_benchmark_main(__doc__, FULL, TINY, run, summary, "sisa-llm-bench-", options=OPTIONS)


if __name__ == "__main__":
    main()
