"""The benchmark suite's entry point.

    python -m benchmarks run --quick          # under 10 minutes on a 2-core CPU
    python -m benchmarks run                  # the full mode (200k-row synthetic data, all of RT)
    python -m benchmarks run --tiny --out DIR # seconds; every code path (the smoke test uses it)
    python -m benchmarks run --only retrain_cost,overhead

Writes results.json, one PNG per benchmark and summary.md (the table the README quotes) to --out.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks import accuracy, overhead, placement, retrain_cost, streams
from benchmarks.common import MODES, machine, warm_up, write_json

BENCHMARKS = {
    "retrain_cost": retrain_cost,
    "streams": streams,
    "accuracy": accuracy,
    "placement": placement,
    "overhead": overhead,
}


def _cell(result: dict[str, Any], shards: int, slices: int) -> dict[str, Any] | None:
    for c in result["cells"]:
        if c["shards"] == shards and c["slices"] == slices:
            return c
    return None


def _cost_and_accuracy(samples: int, train_samples: int, before: float, after: float) -> str:
    """A stream's retrain cost in full trainings, and accuracy before -> after."""
    return f"{samples / train_samples:.2f}; {before:.4f} -> {after:.4f}"


def summary(results: dict[str, Any]) -> str:
    """The markdown summary table of a run."""
    meta = results["meta"]
    lines = [f"Command: `{meta['command']}` ({meta['mode']} mode), {meta['seconds']:.0f} s on "
             f"{meta['machine']}.", "", "| benchmark | figure | value |", "| --- | --- | --- |"]
    add = lambda b, f, v: lines.append(f"| {b} | {f} | {v} |")  # noqa: E731
    r = results.get("retrain_cost")
    if r:
        for shards, slices in [(8, 4), (16, 8), (4, 4)]:
            c = _cell(r, shards, slices)
            if c:
                add("retrain cost", f"one deletion, S={shards} R={slices}: speed-up vs retraining "
                    "the ensemble, wall time, warm (measured / theory 3RS/(2R+1)); cold; in samples",
                    f"{c['speedup_time']}x / {c['theory']}x = {c['ratio_time_to_theory']}; "
                    f"{c['speedup_time_cold']}x / {c['theory']}x = "
                    f"{c['ratio_time_to_theory_cold']}; {c['speedup_samples']}x")
                add("retrain cost", f"S={shards} R={slices}: speed-up vs retraining a monolith",
                    f"{c['speedup_vs_monolith']}x")
    s = results.get("streams")
    if s:
        big = s["batches"][-1]
        add("batches", f"K={big['k']} deletions: samples in one request vs one at a time",
            f"{big['batched_samples']} vs {big['one_at_a_time_samples']}")
        add("batches", f"K={big['k']}: shards hit (measured vs S(1-(1-1/S)^K))",
            f"{big['shards_hit']} vs {big['expected_shards_hit']}")
        for stream in s["streams"]:
            last = stream["points"][-1]
            add("streams", f"{stream['name']}: {last['deletions']} requests, cumulative retrain / "
                "full training; accuracy before -> after",
                _cost_and_accuracy(last["samples"], stream["train_samples"],
                                   stream["points"][0]["accuracy"], last["accuracy"]))
    a = results.get("accuracy")
    if a:
        for curve in a["curves"]:
            pts = {p["shards"]: p for p in curve["points"]}
            mono = pts[min(pts)]
            rest = ", ".join(f"S={k}: {p['soft']:.4f}/{p['hard']:.4f}" for k, p in pts.items()
                             if k != min(pts))
            add("accuracy", f"{curve['data']}: monolith; ensemble soft/hard",
                f"{mono['soft']:.4f}; {rest}")
    p = results.get("placement")
    if p:
        for row in p["results"]:
            add("placement", f"{row['placement']}: retrain for the prior-drawn stream / full "
                "training; accuracy before -> after",
                _cost_and_accuracy(row["stream_samples"], row["train_samples"],
                                   row["accuracy_before"], row["accuracy_after"]))
    o = results.get("overhead")
    if o:
        for m in o["models"]:
            add("overhead", f"{m['model']}, S=1 R=1 training vs a plain torch loop "
                f"({m['optimizer_steps']} steps)",
                f"{m['ratio_training']}x (end to end, with ingestion: {m['ratio_end_to_end']}x)")
    return "\n".join(lines) + "\n"


def run(mode_name: str, only: list[str], out: Path, command: str) -> dict[str, Any]:
    mode = MODES[mode_name]
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="sisa-bench-"))
    results: dict[str, Any] = {}
    started = time.perf_counter()
    try:
        warm_up(work / "warm-up")  # the first training in a process pays torch's one-off costs
        for name in only:
            print(f"[{name}]", flush=True)
            bench_started = time.perf_counter()
            result = BENCHMARKS[name].run(mode, work / name)
            result["seconds"] = round(time.perf_counter() - bench_started, 1)
            result["plot"] = BENCHMARKS[name].plot(result, out).name
            results[name] = result
    finally:
        shutil.rmtree(work, ignore_errors=True)
    results["meta"] = {"mode": mode_name, "command": command, "machine": machine(),
                       "seconds": round(time.perf_counter() - started, 1), "benchmarks": only}
    write_json(out / "results.json", results)
    (out / "summary.md").write_text(summary(results))
    return results


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    run_parser = sub.add_parser("run", help="run the suite")
    size = run_parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="the under-10-minute configuration")
    size.add_argument("--tiny", action="store_true", help="seconds of work, for the smoke test")
    run_parser.add_argument("--only", default=",".join(BENCHMARKS),
                            help=f"comma-separated subset of {','.join(BENCHMARKS)}")
    run_parser.add_argument("--out", type=Path, default=Path("results"))
    args = parser.parse_args(argv)
    only = [n.strip() for n in args.only.split(",") if n.strip()]
    unknown = [n for n in only if n not in BENCHMARKS]
    if unknown:
        parser.error(f"unknown benchmark(s) {unknown}; choose from {list(BENCHMARKS)}")
    mode = "tiny" if args.tiny else "quick" if args.quick else "full"
    command = "python -m benchmarks " + " ".join(sys.argv[1:] if argv is None else argv)
    results = run(mode, only, args.out, command)
    print((args.out / "summary.md").read_text())
    print(f"results in {args.out}/ ({results['meta']['seconds']} s)")


if __name__ == "__main__":
    main()
