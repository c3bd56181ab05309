"""How much the shards of `benchmarks.llm_unlearning` memorise their canaries, before any
deletion: a pilot for sizing that benchmark (its verdict judges nothing unless the inserted
canaries' mean exposure on their own shard reaches the bar, 9.97 bits for 4 digits).

    python -m benchmarks.lm_memorisation --out DIR [--canaries 78 --per-user 3 --epochs 5 --lr 5e-3]
    python -m benchmarks.lm_memorisation --tiny --model DIR --out D   # seconds: every code path

Trains the SISA store of the benchmark's setting (with the canaries, per user and training given
here), measures the canaries' exposure (`prove` with nothing forgotten) and writes
memorisation.json: the mean exposure, the bar, the training seconds, held-out perplexity.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.common import machine, write_json
from benchmarks.llm_unlearning import FULL, TINY, Setting, _config
from sisa import Sisa
from sisa.api import resolve_source
from sisa.builtin import stable_subset
from sisa.workflows.proof import make_canaries, prove


def run(s: Setting, work: Path) -> dict[str, Any]:
    rows, spec = resolve_source("builtin:chitchat", None)
    rows = stable_subset(rows, spec.id_column, s.records)
    canaries = make_canaries([r["sender"] for r in rows], s.canaries, s.never, s.digits, s.repeats,
                             per_user=s.per_user)
    started = time.perf_counter()
    sisa = Sisa.train(work / "sisa", rows + canaries.rows(spec), _config(s, s.shards, s.slices, s.epochs),
                      spec)
    seconds = time.perf_counter() - started
    report = prove(sisa, canaries, "builtin:chitchat:test", [], 16, 16, references=100)
    return {"setting": dataclasses.asdict(s), "machine": machine(), "train_seconds": seconds,
            "mean_exposure": report.mean_exposure_before, "bar": report.memorised_bar,
            "memorised": report.memorised, "holdout_perplexity": report.before.perplexity.get("holdout")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--tiny", action="store_true", help="seconds of work: every code path")
    parser.add_argument("--model", help="causal LM directory (default: the packaged SmolLM2)")
    parser.add_argument("--canaries", type=int, default=78)
    parser.add_argument("--per-user", type=int, default=3)
    parser.add_argument("--never", type=int, default=4096)
    parser.add_argument("--epochs", type=int, default=5, help="per slice")
    parser.add_argument("--lr", type=float, default=FULL.learning_rate)
    args = parser.parse_args()
    s = TINY if args.tiny else dataclasses.replace(
        FULL, canaries=args.canaries, per_user=args.per_user, never=args.never, epochs=args.epochs,
        learning_rate=args.lr)
    if args.model:
        s = dataclasses.replace(s, model=args.model)
    if not s.model:
        parser.error("--tiny needs --model DIR (a small causal LM)")
    args.out.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    with tempfile.TemporaryDirectory(prefix="sisa-lm-memorisation-") as tmp:
        result = run(s, Path(tmp))
    write_json(args.out / "memorisation.json", result)
    print(json.dumps({k: result[k] for k in ("mean_exposure", "bar", "memorised", "train_seconds")}))


if __name__ == "__main__":
    main()
