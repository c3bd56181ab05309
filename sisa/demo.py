"""The end-to-end demonstration behind `sisa demo`: SISA ensemble against a monolith, then a deletion.

Trains both on a built-in data set, evaluates them on its held-out split, forgets a few random
records, and measures what the deletion cost against retraining from scratch.
"""

from __future__ import annotations

import random
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from sisa.api import Sisa
from sisa.config import PartitionConfig, SisaConfig
from sisa.unlearning import Progress, expected_retrain_fraction


def run_demo(
    config: SisaConfig,
    dataset: str = "builtin:digits",
    forget_count: int = 5,
    workdir: str | Path | None = None,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Run the demo; returns every figure it measured (see `sisa demo`)."""
    with tempfile.TemporaryDirectory(prefix="sisa-demo-") as tmp:
        root = Path(workdir) if workdir is not None else Path(tmp)
        monolith_config = replace(
            config, partition=PartitionConfig(shards=1, slices=1, seed=config.partition.seed)
        )
        started = time.perf_counter()
        sisa, report = Sisa.train(root / "sisa", dataset, config, progress=progress)
        sisa_seconds = time.perf_counter() - started
        started = time.perf_counter()
        mono, _ = Sisa.train(root / "monolith", dataset, monolith_config, progress=progress)
        mono_seconds = time.perf_counter() - started

        test = f"{dataset}:test"
        sisa_eval = sisa.evaluate(test)
        mono_eval = mono.evaluate(test)

        live_ids = sorted(r.id for r in sisa.store.live_records())
        chosen = random.Random(config.partition.seed).sample(live_ids, min(forget_count, len(live_ids)))
        receipt = sisa.forget(chosen)
        after_eval = sisa.evaluate(test)
        audit = sisa.audit()
        sisa.close()
        mono.close()

    p = config.partition
    return {
        "dataset": dataset,
        "backend": config.training.backend,
        "shards": p.shards,
        "slices": p.slices,
        "records": len(live_ids),
        "sisa_accuracy": sisa_eval["ensemble"]["accuracy"],
        "monolith_accuracy": mono_eval["ensemble"]["accuracy"],
        "sisa_accuracy_after_forget": after_eval["ensemble"]["accuracy"],
        "sisa_train_seconds": round(sisa_seconds, 3),
        "monolith_train_seconds": round(mono_seconds, 3),
        "sisa_train_samples": report.samples,
        "forgotten": chosen,
        "forget_seconds": receipt.seconds,
        "forget_samples": receipt.samples_retrained,
        "affected_shards": [a["shard"] for a in receipt.affected_shards],
        "speedup_vs_sisa_retrain": round(sisa_seconds / receipt.seconds, 2) if receipt.seconds else None,
        "speedup_vs_monolith_retrain": (
            round(mono_seconds / receipt.seconds, 2) if receipt.seconds else None
        ),
        "samples_fraction": round(receipt.samples_retrained / report.samples, 4),
        "expected_fraction_one_deletion": round(expected_retrain_fraction(p.slices, p.shards), 4),
        "audit_ok": audit["ok"],
    }
