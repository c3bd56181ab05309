"""How long the commands that run no model take, as fresh processes (what a user waits for): `sisa
--help`, `status`, `audit`, `receipts verify`, `receipts show` on a small MLP store with one
deletion applied, beside `python -c pass` (the interpreter alone) and a `sisa predict` of 4 rows
(which loads the models, and torch). Each is also run once under `-X importtime`, to name the
heavy libraries it imports.

    python -m benchmarks.quick_commands --out DIR [--repeats N] [--tiny]

The runs are interleaved (round r runs every command once), and the median is reported: the
machine may be shared, so compare commands measured in one run.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

from benchmarks.cli_kit import SISA, feature_flags, gaussian, sisa, timed, write_table
from benchmarks.common import machine, write_json

FEATURES = 20
HEAVY = ("torch", "transformers", "peft", "ray", "datasets", "pandas", "pyarrow", "sklearn", "scipy")


def build_store(work: Path, rows: int) -> tuple[Path, Path, str]:
    """A small MLP store (S=4, R=2) with one deletion applied; a 4-row input to predict on; the
    deletion's request id (its receipt's name)."""
    data = write_table(work / "train.csv", gaussian(rows, FEATURES, seed=1, prefix="r"))
    store = work / "store"
    sisa("train", "--store", str(store), "--data", str(data), *feature_flags(FEATURES),
         "--shards", "4", "--slices", "2", "--epochs", "2", "--no-progress")
    receipt = sisa("forget", "--store", str(store), "r00000003", "--no-progress", "--json").output
    ask = write_table(work / "ask.csv", gaussian(4, FEATURES, seed=2, prefix="q"))
    return store, ask, receipt["request_id"]


def commands(store: Path, ask: Path, request_id: str) -> dict[str, list[str]]:
    """Name -> the command line, each a fresh process."""
    at = ["--store", str(store)]
    return {
        "python -c pass": [sys.executable, "-c", "pass"],
        "sisa --help": [*SISA, "--help"],
        "sisa status": [*SISA, "status", *at],
        "sisa audit": [*SISA, "audit", *at],
        "sisa receipts verify": [*SISA, "receipts", "verify", *at],
        "sisa receipts show ID": [*SISA, "receipts", "show", *at, request_id],
        "sisa predict (4 rows)": [*SISA, "predict", *at, "--data", str(ask), "--json"],
    }


def heavy_imports(command: list[str]) -> list[str]:
    """Which of HEAVY the command imports (read from `-X importtime`, run once more)."""
    traced = [command[0], "-X", "importtime", *command[1:]]
    stderr = timed(traced).stderr
    tops = {line.rpartition("|")[2].strip().partition(".")[0] for line in stderr.splitlines()
            if line.startswith("import time:")}  # a package may log its submodules only
    return [m for m in HEAVY if m in tops]


def run(rows: int, repeats: int) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix="sisa-quick-"))
    try:
        store, ask, request_id = build_store(work, rows)
        todo = commands(store, ask, request_id)
        for command in todo.values():  # warm: the files in the page cache, bytecode compiled
            timed(command)
        walls: dict[str, list[float]] = {name: [] for name in todo}
        for _ in range(repeats):
            for name, command in todo.items():
                walls[name].append(timed(command).wall)
        imports = {name: heavy_imports(command) for name, command in todo.items()}
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return {
        "machine": machine(), "rows": rows, "features": FEATURES, "shards": 4, "slices": 2,
        "repeats": repeats,
        "commands": [{"command": name, "median_seconds": round(statistics.median(w), 3),
                      "min_seconds": round(min(w), 3), "max_seconds": round(max(w), 3),
                      "runs": [round(x, 3) for x in w], "heavy_imports": imports[name]}
                     for name, w in walls.items()],
    }


def table(result: dict[str, Any]) -> str:
    lines = [f"{result['repeats']} interleaved runs each, fresh processes, on {result['machine']}.",
             "", "| command | median s | min s | max s | heavy imports |", "| --- | --- | --- | --- | --- |"]
    for c in result["commands"]:
        lines.append(f"| {c['command']} | {c['median_seconds']:.3f} | {c['min_seconds']:.3f} | "
                     f"{c['max_seconds']:.3f} | {', '.join(c['heavy_imports']) or '-'} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.quick_commands", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("results/quick_commands"))
    parser.add_argument("--repeats", type=int, default=5, help="timed runs of each command")
    parser.add_argument("--rows", type=int, default=1_000, help="records in the store")
    parser.add_argument("--tiny", action="store_true", help="one run of each, 200 records")
    args = parser.parse_args(argv)
    rows, repeats = (200, 1) if args.tiny else (args.rows, args.repeats)
    result = run(rows, repeats)
    write_json(args.out / "quick_commands.json", result)
    (args.out / "quick_commands.md").write_text(table(result))
    print(table(result))


if __name__ == "__main__":
    main()
