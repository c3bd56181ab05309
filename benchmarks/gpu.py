"""The prepared GPU run: one command for a machine with a GPU, within about ten minutes.

    python -m benchmarks.gpu --out DIR [--budget 540] [--tiny]

Steps, each a subprocess with its own time limit, in this order (what is cheap and decisive
first), until the budget is spent:
1. the device: `nvidia-smi` and what torch sees;
2. the `gpu` tests (`pytest -m gpu`): exactness on the GPU (a deletion's retrain bit-identical to
   training from scratch on the GPU);
3. the LoRA text benchmark (`benchmarks.text_accuracy`, shards on the GPU): accuracy, training
   seconds and the S=4 LoRA ensemble's throughput against one model;
4. the causal-LM benchmark (`benchmarks.llm_unlearning`, shards on the GPU): exposure, perplexity,
   decoding latency, retrain cost.
Shards train on the GPU through SISA_BENCH_GPUS_PER_SHARD (a quarter of it each). Each step's
output goes to DIR/logs/, its figures to DIR/<step>/; DIR/gpu.json says what ran, how long, and
how it ended. `--tiny` runs the same steps at toy sizes (on a CPU machine the gpu tests skip):
it checks the script.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks.common import GPU_ENV, write_json

ROOT = Path(__file__).resolve().parents[1]


def steps(out: Path, tiny: bool) -> list[tuple[str, list[str], int]]:
    """(name, argv, time limit in seconds)."""
    py = sys.executable
    text = [py, "-m", "benchmarks.text_accuracy", "--out", str(out / "text_accuracy")]
    llm = [py, "-m", "benchmarks.llm_unlearning", "--out", str(out / "llm_unlearning")]
    if tiny:
        text += ["--lora-limit", "40", "--lora-epochs", "1"]
        llm += ["--tiny"]
    return [
        ("device", ["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv"], 30),
        ("torch", [py, "-c", "import torch, json; print(json.dumps({'cuda': torch.cuda.is_available(), "
                   "'devices': [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())], "
                   "'torch': torch.__version__}))"], 60),
        ("gpu_tests", [py, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider"], 240),
        ("text_accuracy", text, 300 if not tiny else 600),
        ("llm_unlearning", llm, 300 if not tiny else 600),
    ]


def run(out: Path, budget: float, tiny: bool) -> dict[str, Any]:
    (out / "logs").mkdir(parents=True, exist_ok=True)
    env = {**os.environ, GPU_ENV: "0.25"}
    started = time.monotonic()
    results: list[dict[str, Any]] = []
    for name, argv, limit in steps(out, tiny):
        left = budget - (time.monotonic() - started)
        if left < 20:
            results.append({"step": name, "outcome": "skipped: budget spent"})
            continue
        log = out / "logs" / f"{name}.log"
        begun = time.monotonic()
        try:
            with log.open("w") as sink:
                code = subprocess.run(argv, cwd=ROOT, env=env, stdout=sink, stderr=subprocess.STDOUT,
                                      timeout=min(limit, left), check=False).returncode
            outcome = "ok" if code == 0 else f"exit {code}"
        except subprocess.TimeoutExpired:
            outcome = "timed out"
        except FileNotFoundError as exc:  # no nvidia-smi: not a GPU machine
            outcome = f"not found: {exc.filename}"
        tail = log.read_text()[-1500:] if log.exists() else ""
        results.append({"step": name, "outcome": outcome, "seconds": round(time.monotonic() - begun, 1),
                        "tail": tail})
        print(f"{name}: {outcome} ({results[-1]['seconds']} s)", flush=True)
    summary: dict[str, Any] = {"budget_s": budget, "tiny": tiny, "steps": results,
                               "seconds": round(time.monotonic() - started, 1)}
    for name in ("text_accuracy", "llm_unlearning"):  # what the benchmarks wrote
        for found in sorted((out / name).glob("*.json")) if (out / name).exists() else []:
            summary.setdefault("figures", {})[f"{name}/{found.name}"] = json.loads(found.read_text())
    write_json(out / "gpu.json", summary)
    return summary


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--budget", type=float, default=540.0, help="seconds for all the steps")
    parser.add_argument("--tiny", action="store_true", help="toy sizes: checks the script")
    args = parser.parse_args(argv)
    done = run(args.out, args.budget, args.tiny)
    failed = [s["step"] for s in done["steps"] if s["outcome"] not in ("ok",) and s["step"] != "device"]
    print(f"wrote {args.out / 'gpu.json'}; steps not ok: {failed or 'none'}")


if __name__ == "__main__":
    main()
