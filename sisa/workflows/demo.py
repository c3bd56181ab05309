"""The end-to-end demonstration behind `sisa demo`: SISA ensemble against a monolith, then a deletion.

Classifiers: trains both on a built-in data set, evaluates them on its held-out split, forgets a
few random records, and measures what the deletion cost against retraining from scratch.
Causal LMs (`run_lm_demo`): trains on chat turns with canaries, generates, forgets a user, and
shows the evidence that the user's text is gone.
"""

from __future__ import annotations

import random
import tempfile
import time
from collections import Counter
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

from sisa.api import Sisa, resolve_source
from sisa.builtin import stable_subset
from sisa.config import PartitionConfig, SisaConfig
from sisa.errors import ConfigError
from sisa.unlearning import Progress, expected_retrain_fraction
from sisa.workflows.proof import CanarySet, canary_shards, make_canaries, prove

RT = "builtin:rotten_tomatoes"
# backend -> (built-in data set, training records used); training settings are the backend's own
# defaults (sisa.config). LoRA on a 2-core CPU takes about 0.6 s a step: a subset keeps it minutes.
DEMO_DATA: dict[str, tuple[str, int | None]] = {
    "head": (RT, None),
    "lora": (RT, 800),
    "mlp": ("builtin:digits", None),
    "causal_lm": ("builtin:chitchat", 160),
}
# The causal-LM demo's training, where the command line leaves it open: LoRA on the top 2 of
# SmolLM2's 30 layers (the 28 below run once per text, cached), at a rate that memorises a canary
# within 3 epochs per slice. Each canary is inserted 12 times (`run_lm_demo`): one in the last
# slice is then seen 36 times (at 8 copies, 24 times, one reached only 8.2 bits of exposure;
# at 12, the forgotten ones measured 11.7 and 13.3 bits before the deletion).
LM_DEMO_TRAINING = {"top_k_layers": 2, "learning_rate": 5e-3, "epochs_per_slice": 3, "max_length": 64}


def demo_options(backend: str, given: Mapping[str, Any]) -> dict[str, Any]:
    """The options a demo of `backend` trains with (named as the CLI's): those given, and where
    they are left open (None), the demo's own (the causal-LM demo's training above)."""
    if backend not in DEMO_DATA:
        raise ConfigError(f"the demo's backend must be one of {sorted(DEMO_DATA)}, got {backend!r}")
    own = LM_DEMO_TRAINING if backend == "causal_lm" else {}
    return {**given, **{k: v for k, v in own.items() if given.get(k) is None}, "backend": backend}


def run(config: SisaConfig, dataset: str | None = None, limit: int | None = None,
        forget_count: int = 5, progress: Progress | None = None) -> dict[str, Any]:
    """`sisa demo`: the classifier demo (`run_demo`) or, for the causal_lm backend, the
    language-model one (`run_lm_demo`), on the backend's built-in data set unless told."""
    backend = config.training.backend
    if backend not in DEMO_DATA:
        raise ConfigError(f"the demo's backend must be one of {sorted(DEMO_DATA)}, got {backend!r}")
    default_data, default_limit = DEMO_DATA[backend]
    limit = limit if limit is not None else default_limit
    if backend == "causal_lm":
        return run_lm_demo(config, dataset=dataset or default_data, limit=limit, progress=progress)
    return run_demo(config, dataset=dataset or default_data, forget_count=forget_count, limit=limit,
                    progress=progress)


def summary_rows(result: Mapping[str, Any]) -> list[tuple[str, str, str]]:
    """The classifier demo's figures as (what, SISA, monolith) rows."""
    r = result
    return [
        ("held-out accuracy", f"{r['sisa_accuracy']:.4f}", f"{r['monolith_accuracy']:.4f}"),
        ("held-out macro-F1", f"{r['sisa_macro_f1']:.4f}", f"{r['monolith_macro_f1']:.4f}"),
        ("full training (s)", f"{r['sisa_train_seconds']:.2f}", f"{r['monolith_train_seconds']:.2f}"),
        ("retraining from scratch (s)" + ("" if r["scratch_retrain_measured"] else ", = full training"),
         f"{r['scratch_retrain_seconds']:.2f}", f"{r['monolith_train_seconds']:.2f}"),
        (f"forget {len(r['forgotten'])} records (s)", f"{r['forget_seconds']:.2f}", ""),
        ("samples retrained", f"{r['forget_samples']} of {r['sisa_train_samples']}", ""),
        ("speed-up of the deletion vs retraining from scratch", f"{r['speedup_vs_sisa_retrain']}x",
         f"{r['speedup_vs_monolith_retrain']}x"),
        ("accuracy after forgetting", f"{r['sisa_accuracy_after_forget']:.4f}", ""),
        ("audit", "OK" if r["audit_ok"] else "VIOLATIONS", ""),
    ]


def run_demo(
    config: SisaConfig,
    dataset: str = "builtin:rotten_tomatoes",
    forget_count: int = 5,
    limit: int | None = None,
    workdir: str | Path | None = None,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Run the demo; returns every figure it measured (see `sisa demo`)."""
    train_rows, spec = resolve_source(dataset, None)
    test_rows, _ = resolve_source(f"{dataset}:test", None)
    train_rows = stable_subset(train_rows, spec.id_column, limit)
    test_rows = stable_subset(test_rows, spec.id_column, limit // 4 if limit else None)
    p = config.partition
    monolith_config = replace(config, partition=PartitionConfig(shards=1, slices=1, seed=p.seed))

    with tempfile.TemporaryDirectory(prefix="sisa-demo-") as tmp:
        root = Path(workdir) if workdir is not None else Path(tmp)
        started = time.perf_counter()
        sisa = Sisa.train(root / "sisa", train_rows, config, spec, progress=progress)
        sisa_seconds = time.perf_counter() - started
        report = sisa.training_report_
        sisa_eval = sisa.evaluate(test_rows)  # also caches the test texts' embeddings

        # The monolith reuses the cached embeddings: its time is training alone.
        started = time.perf_counter()
        mono = Sisa.train(root / "monolith", train_rows, monolith_config, spec, progress=progress,
                          embeddings_from=root / "sisa")
        mono_seconds = time.perf_counter() - started
        mono_eval = mono.evaluate(test_rows)

        live_ids = sorted(r.id for r in sisa.live_records())
        chosen = random.Random(p.seed).sample(live_ids, min(forget_count, len(live_ids)))
        started = time.perf_counter()
        receipt = sisa.forget(chosen)
        forget_seconds = time.perf_counter() - started
        after_eval = sisa.evaluate(test_rows)
        audit = sisa.audit()

        # Retraining the ensemble from scratch without those records (embeddings cached, as a
        # real retrain would have them). LoRA has no encoding step, so its full training time
        # already is that figure and the demo does not pay for it twice.
        remaining = [r for r in train_rows if str(r[spec.id_column]) not in set(chosen)]
        if config.training.backend == "lora":
            scratch_seconds, scratch_measured = sisa_seconds, False
        else:
            started = time.perf_counter()
            Sisa.train(root / "scratch", remaining, config, spec, progress=progress,
                       embeddings_from=root / "sisa").close()
            scratch_seconds, scratch_measured = time.perf_counter() - started, True
        sisa.close()
        mono.close()

    return {
        "dataset": dataset,
        "backend": config.training.backend,
        "model": getattr(config.training, "model", None),
        "shards": p.shards,
        "slices": p.slices,
        "epochs_per_slice": config.training.epochs_per_slice,
        "records": len(train_rows),
        "test_records": len(test_rows),
        "sisa_accuracy": sisa_eval.ensemble.accuracy,
        "sisa_macro_f1": sisa_eval.ensemble.macro_f1,
        "monolith_accuracy": mono_eval.ensemble.accuracy,
        "monolith_macro_f1": mono_eval.ensemble.macro_f1,
        "sisa_accuracy_after_forget": after_eval.ensemble.accuracy,
        "sisa_train_seconds": round(sisa_seconds, 3),
        "monolith_train_seconds": round(mono_seconds, 3),
        "sisa_train_samples": report.samples,
        "forgotten": chosen,
        "forget_seconds": round(forget_seconds, 3),
        "forget_samples": receipt.samples_retrained,
        "affected_shards": [a["shard"] for a in receipt.affected_shards],
        "scratch_retrain_seconds": round(scratch_seconds, 3),
        "scratch_retrain_measured": scratch_measured,
        "speedup_vs_sisa_retrain": round(scratch_seconds / forget_seconds, 2),
        "speedup_vs_monolith_retrain": round(mono_seconds / forget_seconds, 2),
        "samples_fraction": round(receipt.samples_retrained / report.samples, 4),
        "expected_fraction_one_deletion": round(expected_retrain_fraction(p.shards, p.slices), 4),
        "audit_ok": audit.ok,
    }


def run_lm_demo(
    config: SisaConfig,
    dataset: str = "builtin:chitchat",
    limit: int | None = 160,
    canaries: int = 5,
    never: int = 16,
    repeats: int = 12,
    workdir: str | Path | None = None,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Train a causal-LM store on chat turns plus canaries (one per chosen user), generate from
    it, then forget in one request every canary user of one shard (the shard holding the most
    canaries: with more canaries than shards, at least two, enough for the KS test against the
    never-inserted canaries to decide) and measure exposure and membership before and after.
    The choice depends on where the canaries were placed, never on what was measured."""
    train_rows, spec = resolve_source(dataset, None)
    train_rows = stable_subset(train_rows, spec.id_column, limit)
    if spec.group_column is None:
        raise ConfigError(f"{dataset} has no group column: the demo forgets a user")
    chosen = make_canaries([str(r[spec.group_column]) for r in train_rows], canaries, never,
                           repeats=repeats, seed=config.partition.seed)
    rows = train_rows + chosen.rows(spec)
    with tempfile.TemporaryDirectory(prefix="sisa-demo-") as tmp:
        root = Path(workdir) if workdir is not None else Path(tmp)
        started = time.perf_counter()
        sisa = Sisa.train(root / "sisa", rows, config, spec, progress=progress)
        train_seconds = time.perf_counter() - started
        report = sisa.training_report_
        test_rows, _ = resolve_source(f"{dataset}:test", None)
        # The opening words of held-out turns: a whole turn is followed by its end-of-text token.
        prompts = [" ".join(str(r["text"]).split()[:4]) for r in stable_subset(test_rows, spec.id_column, 2)]
        tick = progress(f"generating from {len(prompts)} prompts", len(prompts)) if progress else None
        generated = []
        for prompt in prompts:
            generated += sisa.generate([prompt], max_new_tokens=24, stop=["\n"])
            if tick is not None:
                tick(None)
        forget_users = users_of_one_shard(sisa, chosen)
        # In place: the demo's store really forgets (its receipt is what the audit checks); then
        # the retrained oracle, a scratch store on the records left, is compared with it.
        proof = prove(sisa, chosen, f"{dataset}:test", forget_users, holdout_limit=32,
                      retain_limit=32, progress=progress, in_place=True, oracle=True)
        audit = sisa.audit()
        sisa.close()
    return {
        "dataset": dataset,
        "backend": config.training.backend,
        "model": getattr(config.training, "model", None),
        "shards": config.partition.shards,
        "slices": config.partition.slices,
        "epochs_per_slice": config.training.epochs_per_slice,
        "top_k_layers": getattr(config.training, "top_k_layers", 0),
        "records": len(rows),
        "canary_records": len(rows) - len(train_rows),
        "train_seconds": round(train_seconds, 3),
        "train_samples": report.samples,
        "generated": [g.to_dict() for g in generated],
        "forgotten_users": forget_users,
        "proof": proof,
        "audit_ok": audit.ok,
    }


def users_of_one_shard(sisa: Sisa, canaries: CanarySet) -> list[str]:
    """The users of the inserted canaries on the shard that holds the most of them (the lowest
    such shard): forgetting them retrains that shard alone."""
    shard_of = canary_shards(sisa, canaries)
    inserted = [c for c in canaries.canaries if c.inserted]
    counts = Counter(shard_of[c.id] for c in inserted)
    shard = min(counts, key=lambda s: (-counts[s], s))
    return [c.group for c in inserted if shard_of[c.id] == shard]
