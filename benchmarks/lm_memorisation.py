"""How much the shards of `benchmarks.llm_unlearning` memorise their canaries, before any
deletion: a pilot for sizing that benchmark (its verdict judges nothing unless the inserted
canaries' mean exposure on their own shard reaches the bar, 9.97 bits for 4 digits).

    python -m benchmarks.lm_memorisation --out DIR [--canaries 84 --shards 8 --epochs 5 ...]
    python -m benchmarks.lm_memorisation --tiny --model DIR --out D   # seconds: every code path

Trains the SISA store of the benchmark's setting (`FULL`: 84 canaries, 3 per user, 4,096
never-inserted, S=8, 5 epochs per slice, unless told otherwise; `--shards 1 --slices 1`: its
monolith), measures the canaries' exposure (`prove` with nothing
forgotten) and writes memorisation.json: the mean exposure, the bar, the training seconds,
held-out perplexity.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Any

from benchmarks.common import lm_benchmark_main, machine, write_json
from benchmarks.llm_unlearning import FULL, TINY, Setting, _config, training_data
from sisa import Sisa
from sisa.workflows.proof import prove

OPTIONS = ("canaries", "per_user", "never", "repeats", "epochs", "learning_rate", "shards", "slices",
           "top_k")


def run(s: Setting, out: Path, work: Path) -> dict[str, Any]:
    train, spec, canaries = training_data(s)
    started = time.perf_counter()
    sisa = Sisa.train(work / "sisa", train, _config(s, s.shards, s.slices, s.epochs), spec)
    seconds = time.perf_counter() - started
    report = prove(sisa, canaries, "builtin:chitchat:test", [], 16, 16, references=100)
    result = {"setting": dataclasses.asdict(s), "machine": machine(), "train_seconds": seconds,
              "mean_exposure": report.mean_exposure_before, "bar": report.memorised_bar,
              "memorised": report.memorised,
              "holdout_perplexity": report.before.perplexity.get("holdout")}
    write_json(out / "memorisation.json", result)
    return result


def summary(result: dict[str, Any]) -> str:
    return json.dumps({k: result[k] for k in ("mean_exposure", "bar", "memorised", "train_seconds")})


if __name__ == "__main__":
    lm_benchmark_main(__doc__, FULL, TINY, run, summary, "sisa-lm-memorisation-", options=OPTIONS)
