"""Held-out accuracy of the text backends on Rotten Tomatoes (fresh vs rotten), and the LoRA
ensemble's prediction throughput against a single model, all measured in one run.

    python -m benchmarks.text_accuracy [--lora-limit N] [--out results/]

Runs: monolithic `head`; SISA `head` at S=4 and S=8 (R=4); monolithic `lora`; SISA `lora` at S=4
(R=4). Throughput: texts per second of the S=4 LoRA ensemble (one base, four named adapters,
mixed-adapter batches) against the monolithic LoRA model, on the same texts.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.accuracy import text_config
from sisa import HeadConfig, LoraConfig, Sisa
from sisa.api import resolve_source
from sisa.builtin import stable_subset

DATASET = "builtin:rotten_tomatoes"


def _throughput(sisa: Sisa, texts: list[str], repeats: int = 2) -> float:
    ensemble = sisa.ensemble()
    ensemble.shard_proba(texts[:32])  # warm-up
    started = time.perf_counter()
    for _ in range(repeats):
        ensemble.shard_proba(texts)
    return repeats * len(texts) / (time.perf_counter() - started)


def run(lora_limit: int | None, lora_epochs: int, out: Path) -> dict[str, Any]:
    train, spec = resolve_source(DATASET, None)
    test, _ = resolve_source(f"{DATASET}:test", None)
    work = Path(tempfile.mkdtemp(prefix="sisa-text-bench-"))
    runs: list[dict[str, Any]] = []
    try:
        seed_store = work / "embeddings"
        started = time.perf_counter()
        first = Sisa.train(seed_store, train, text_config(1, 1, HeadConfig()), spec)
        first.evaluate(test)  # caches the test embeddings too
        encode_seconds = time.perf_counter() - started
        first.close()
        for shards, slices in [(1, 1), (4, 4), (8, 4)]:
            started = time.perf_counter()
            sisa = Sisa.train(work / f"head-{shards}", train, text_config(shards, slices, HeadConfig()),
                              spec, embeddings_from=seed_store)
            seconds = time.perf_counter() - started
            result = sisa.evaluate(test)
            runs.append({"backend": "head", "shards": shards, "slices": slices,
                         "train_seconds": round(seconds, 2), "samples": sisa.training_report_.samples,
                         "accuracy": result.ensemble.accuracy,
                         "accuracy_hard": result.ensemble_hard.accuracy,
                         "macro_f1": result.ensemble.macro_f1})
            print(runs[-1], flush=True)
            sisa.close()

        lora_train = stable_subset(train, spec.id_column, lora_limit)
        lora_stores: dict[int, Sisa] = {}
        for shards, slices, epochs in [(1, 1, lora_epochs), (4, 4, max(1, lora_epochs // 2))]:
            config = text_config(shards, slices, LoraConfig(epochs_per_slice=epochs))
            started = time.perf_counter()
            sisa = Sisa.train(work / f"lora-{shards}", lora_train, config, spec)
            seconds = time.perf_counter() - started
            result = sisa.evaluate(test)
            runs.append({"backend": "lora", "shards": shards, "slices": slices,
                         "epochs_per_slice": epochs, "train_seconds": round(seconds, 2),
                         "samples": sisa.training_report_.samples, "accuracy": result.ensemble.accuracy,
                         "accuracy_hard": result.ensemble_hard.accuracy,
                         "macro_f1": result.ensemble.macro_f1})
            print(runs[-1], flush=True)
            lora_stores[shards] = sisa

        column = spec.text_column or "text"  # the built-in data set names its text column
        texts = [r[column] for r in test[:256]]
        single = _throughput(lora_stores[1], texts)
        ensemble = _throughput(lora_stores[4], texts)
        for s in lora_stores.values():
            s.close()
    finally:
        shutil.rmtree(work, ignore_errors=True)

    summary = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}",
        "dataset": f"{DATASET} (train {len(train)}, test {len(test)})",
        "lora_train_records": len(lora_train),
        "encode_seconds_train_and_test": round(encode_seconds, 1),
        "head_config": HeadConfig().to_dict(), "lora_config": LoraConfig().to_dict(),
        "runs": runs,
        "throughput": {
            "texts": len(texts),
            "single_lora_texts_per_second": round(single, 1),
            "ensemble_s4_texts_per_second": round(ensemble, 1),
            "ratio_to_single_over_s": round(ensemble / (single / 4), 3),
        },
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "text_accuracy.json").write_text(json.dumps(summary, indent=2))
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--lora-limit", type=int, default=None, help="LoRA training records (all)")
    parser.add_argument("--lora-epochs", type=int, default=2,
                        help="monolith epochs; SISA gets half per slice")
    parser.add_argument("--out", type=Path, default=Path("results"))
    args = parser.parse_args()
    print(json.dumps(run(args.lora_limit, args.lora_epochs, args.out), indent=2))


if __name__ == "__main__":
    main()
