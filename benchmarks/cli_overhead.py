"""The command line's own cost around its work (issue 23), every command a fresh `sisa` process on a
Purchase-like CSV with a group column (50,000 x 600 by default), each against the issue's goal:
`sisa forget` at most 1.5 s of wall above its receipt's seconds, `sisa train` at most 1.3x its
training seconds, `sisa status` at most 0.8 s.

    python -m benchmarks.cli_overhead --out DIR [--rows 50000] [--features 600] [--epochs 8]
                                      [--forgets 3] [--status-runs 5] [--tiny]

Steps: `sisa train` S=8 R=4 once; `sisa forget ID --json` once per record (each on another shard,
the latest slices first: little retrains, and the start-up shows); as many more while a `sisa
serve` of the store runs, which the command hands them to (`sisa.handoff`); `sisa status --json` (the
median of its runs). Beside each wall, the process's CPU seconds (user + system), and the
machine's load average before and after: on a shared machine the wall swells with the others'
load. For scale: `python -c pass` and `python -c
"import torch"` (which a forget cannot do without). One more forget and status under
`-X importtime` name the heavy libraries each imports; and the JSON says whether sisa's own modules
were compiled bytecode already (with PYTHONDONTWRITEBYTECODE and an editable install, every
process compiles them anew).

Writes DIR/cli_overhead.json and DIR/cli_overhead.md, and prints the summary.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sqlite3
import statistics
import sys
from pathlib import Path
from typing import Any

from benchmarks.cli_kit import SISA, Serving, feature_flags, purchase_like, sisa, timed, write_table
from benchmarks.common import machine, write_json

ROOT = Path(__file__).resolve().parents[1]
FORGET_ABOVE_RECEIPT = 1.5  # seconds: a forget's wall minus its receipt's seconds, at most
TRAIN_OVER_TRAINING = 1.3  # train's wall over its training seconds, at most
STATUS_WALL = 0.8  # seconds of a `sisa status`, at most
HEAVY = ("torch", "torch._dynamo", "numpy", "pyarrow", "pandas", "transformers", "peft", "ray",
         "datasets", "sympy", "scipy", "sklearn")


def with_groups(columns: dict[str, Any], per_group: int = 10) -> dict[str, Any]:
    """The columns and a group column: `per_group` consecutive records share a group."""
    rows = len(columns["id"])
    return {**columns, "group": [f"g{i // per_group:06d}" for i in range(rows)]}


def pick_ids(store: Path, count: int) -> list[str]:
    """`count` live record ids, each from another shard where there are enough, from the latest
    slice index down (read from the store's database, read-only)."""
    conn = sqlite3.connect(f"file:{store / 'store.db'}?mode=ro", uri=True)
    try:
        rows = conn.execute("SELECT id, shard FROM records WHERE deleted_at IS NULL "
                            "ORDER BY slice DESC, order_key LIMIT 5000").fetchall()
    finally:
        conn.close()
    picked: list[str] = []
    shards: set[int] = set()
    for record_id, shard in rows:
        if shard not in shards:
            picked.append(record_id)
            shards.add(shard)
        if len(picked) == count:
            return picked
    return picked + [r for r, _ in rows if r not in picked][:count - len(picked)]


def heavy_imports(command: list[str]) -> list[str]:
    """Which of HEAVY the command imports (its `-X importtime` lines, one more run)."""
    traced = [command[0], "-X", "importtime", *command[1:]]
    names = {line.rpartition("|")[2].strip() for line in timed(traced, check=False).stderr.splitlines()
             if line.startswith("import time:")}
    return [h for h in HEAVY if any(n == h or n.startswith(h + ".") for n in names)]


def bytecode() -> dict[str, Any]:
    """Whether this run's `sisa` processes load sisa's modules compiled or compile them."""
    return {"PYTHONDONTWRITEBYTECODE": os.environ.get("PYTHONDONTWRITEBYTECODE"),
            "sisa_pycache": (ROOT / "sisa" / "__pycache__").is_dir()}


def baseline(command: list[str], runs: int) -> dict[str, float]:
    done = [timed(command) for _ in range(runs)]
    return {"wall": round(statistics.median(t.wall for t in done), 3),
            "cpu": round(statistics.median(t.cpu for t in done), 3)}


def run(out: Path, rows: int, features: int, epochs: int, forgets: int = 3, status_runs: int = 5,
        shards: int = 8, slices: int = 4, baseline_runs: int = 3) -> dict[str, Any]:
    out.mkdir(parents=True, exist_ok=True)
    train_cols, _ = purchase_like(rows, 0, features)
    csv = write_table(out / "train.csv", with_groups(train_cols))
    del train_cols
    store = out / "store"
    shutil.rmtree(store, ignore_errors=True)
    result: dict[str, Any] = {"machine": machine(), "rows": rows, "features": features,
                              "epochs": epochs, "shards": shards, "slices": slices,
                              "csv_mb": round(csv.stat().st_size / 2**20, 1), "bytecode": bytecode(),
                              "load_before": [round(x, 2) for x in os.getloadavg()]}
    try:
        train = sisa("train", "--store", str(store), "--data", str(csv), "--backend", "mlp",
                     "--shards", str(shards), "--slices", str(slices), "--epochs", str(epochs),
                     *feature_flags(features), "--group-column", "group", "--json", "--no-progress")
        seconds = train.output["seconds"]
        result["train"] = {"wall": round(train.wall, 3), "cpu": round(train.cpu, 2),
                           "seconds": seconds, "ingest_seconds": train.output["ingest_seconds"],
                           "wall_over_seconds": round(train.wall / seconds, 3),
                           "wall_minus_seconds": round(train.wall - seconds, 3),
                           "peak_mb": round(train.peak_mb)}

        ids = pick_ids(store, forgets + 1)  # the last one for the -X importtime run
        result["forget"] = forget_runs(store, ids[:forgets])

        others = [i for i in pick_ids(store, forgets + 1) if i != ids[-1]][:forgets]
        result["forget_handed_off"] = handed_off(store, out, others)

        status = [sisa("status", "--store", str(store), "--json") for _ in range(status_runs)]
        result["status"] = {"walls": [round(s.wall, 3) for s in status],
                            "median": round(statistics.median(s.wall for s in status), 3),
                            "cpu_median": round(statistics.median(s.cpu for s in status), 3)}

        result["baselines"] = {
            "python -c pass": baseline([sys.executable, "-c", "pass"], baseline_runs),
            "python -c 'import torch'": baseline([sys.executable, "-c", "import torch"], baseline_runs)}
        result["imports"] = {
            "sisa forget": heavy_imports([*SISA, "forget", "--store", str(store), ids[-1], "--json",
                                          "--no-progress"]),
            "sisa status": heavy_imports([*SISA, "status", "--store", str(store), "--json"])}
    finally:
        csv.unlink(missing_ok=True)
        shutil.rmtree(store, ignore_errors=True)
    result["load_after"] = [round(x, 2) for x in os.getloadavg()]
    result["goals"] = goals(result)
    write_json(out / "cli_overhead.json", result)
    (out / "cli_overhead.md").write_text(summary(result))
    return result


def handed_off(store: Path, out: Path, ids: list[str]) -> dict[str, Any]:
    """`sisa forget` while a `sisa serve` of the store runs (and SISA_SERVE_TOKEN holds its
    token): the command hands the deletion over (`sisa.handoff`) and prints the service's receipt."""
    token = "cli-overhead-token-0123456789abcdef"
    server = Serving(store, out / "serve.log", token, "--batch-window", "0")
    server.worker_ready()  # a service that already holds the store: its worker started too
    os.environ["SISA_SERVE_TOKEN"] = token
    try:
        return {**forget_runs(store, ids, served_by=server.url), "serve_startup": round(server.startup, 2)}
    finally:
        del os.environ["SISA_SERVE_TOKEN"]
        server.stop()


def forget_runs(store: Path, ids: list[str], served_by: str | None = None) -> dict[str, Any]:
    """`sisa forget ID --json` for each id, a fresh process each: wall and CPU against the
    receipt's seconds (with `served_by`: each must say that service applied it)."""
    runs = []
    for record_id in ids:
        done = sisa("forget", "--store", str(store), record_id, "--json", "--no-progress")
        receipt = done.output
        if receipt.get("served_by") != served_by:
            raise RuntimeError(f"sisa forget {record_id}: served by {receipt.get('served_by')}, "
                               f"expected {served_by}")
        runs.append({"id": record_id, "shard": receipt["affected_shards"][0]["shard"],
                     "start_slice": receipt["affected_shards"][0]["start_slice"],
                     "wall": round(done.wall, 3), "cpu": round(done.cpu, 3),
                     "receipt_seconds": receipt["seconds"],
                     "wall_minus_receipt": round(done.wall - receipt["seconds"], 3),
                     "peak_mb": round(done.peak_mb)})
    return {"runs": runs, "max_wall_minus_receipt": max(r["wall_minus_receipt"] for r in runs),
            "mean_wall_minus_receipt": round(statistics.mean(r["wall_minus_receipt"] for r in runs), 3)}


def goals(r: dict[str, Any]) -> list[dict[str, Any]]:
    t, f, s, h = r["train"], r["forget"], r["status"], r["forget_handed_off"]
    rows = [
        ("sisa forget: wall - receipt seconds (worst of the runs)",
         f"{f['max_wall_minus_receipt']:.2f} s (mean {f['mean_wall_minus_receipt']:.2f} s)",
         f["max_wall_minus_receipt"] <= FORGET_ABOVE_RECEIPT, f"<= {FORGET_ABOVE_RECEIPT} s"),
        ("sisa forget handed to a running sisa serve: wall - receipt seconds (worst)",
         f"{h['max_wall_minus_receipt']:.2f} s (mean {h['mean_wall_minus_receipt']:.2f} s)",
         h["max_wall_minus_receipt"] <= FORGET_ABOVE_RECEIPT, f"<= {FORGET_ABOVE_RECEIPT} s"),
        ("sisa train: wall / training seconds",
         f"{t['wall_over_seconds']:.3f}x ({t['wall']:.1f} s / {t['seconds']:.1f} s)",
         t["wall_over_seconds"] <= TRAIN_OVER_TRAINING, f"<= {TRAIN_OVER_TRAINING}x"),
        (f"sisa status: wall (median of {len(s['walls'])})", f"{s['median']:.3f} s",
         s["median"] <= STATUS_WALL, f"<= {STATUS_WALL} s"),
    ]
    return [{"goal": g, "target": target, "measured": m, "met": bool(ok)} for g, m, ok, target in rows]


def summary(r: dict[str, Any]) -> str:
    t, f, s = r["train"], r["forget"], r["status"]
    lines = [f"# The CLI's own cost: {r['rows']:,} x {r['features']} CSV ({r['csv_mb']} MB), "
             f"S={r['shards']} R={r['slices']}, {r['epochs']} epochs per slice", "",
             f"Machine: {r['machine']}. Fresh processes; sisa's bytecode: {r['bytecode']}; load "
             f"average (1, 5, 15 min) before {r['load_before']}, after {r['load_after']}.", "",
             "| goal | target | measured | met |", "| --- | --- | --- | --- |"]
    lines += [f"| {g['goal']} | {g['target']} | {g['measured']} | {'yes' if g['met'] else 'NO'} |"
              for g in r["goals"]]
    lines += ["", "| command (fresh process) | wall s | CPU s | its own seconds | wall - own s | "
              "peak MB |", "| --- | --- | --- | --- | --- | --- |",
              f"| train | {t['wall']} | {t['cpu']} | training {t['seconds']} (ingest "
              f"{t['ingest_seconds']}) | {t['wall_minus_seconds']} | {t['peak_mb']} |"]
    lines += [f"| forget {x['id']} (shard {x['shard']}, from slice {x['start_slice']}) | {x['wall']} | "
              f"{x['cpu']} | receipt {x['receipt_seconds']} | {x['wall_minus_receipt']} | "
              f"{x['peak_mb']} |" for x in f["runs"]]
    lines += [f"| forget {x['id']}, handed to sisa serve (shard {x['shard']}, from slice "
              f"{x['start_slice']}) | {x['wall']} | {x['cpu']} | receipt {x['receipt_seconds']} | "
              f"{x['wall_minus_receipt']} | {x['peak_mb']} |" for x in r["forget_handed_off"]["runs"]]
    lines += [f"| status (median of {len(s['walls'])}) | {s['median']} | {s['cpu_median']} | | | |"]
    lines += [f"| {name} (median) | {b['wall']} | {b['cpu']} | | | |"
              for name, b in r["baselines"].items()]
    lines += ["", "Heavy libraries imported: " + "; ".join(
        f"{name}: {', '.join(found) or 'none'}" for name, found in r["imports"].items()), ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.cli_overhead", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("results/cli_overhead"))
    parser.add_argument("--rows", type=int, default=50_000)
    parser.add_argument("--features", type=int, default=600)
    parser.add_argument("--epochs", type=int, default=8, help="epochs per slice (the README's "
                        "50,000 x 600 figures use 8)")
    parser.add_argument("--forgets", type=int, default=3, help="deletions, one record each")
    parser.add_argument("--status-runs", type=int, default=5)
    parser.add_argument("--tiny", action="store_true", help="seconds of work: checks the script")
    args = parser.parse_args(argv)
    extra = {}
    if args.tiny:
        args.rows, args.features, args.epochs, args.status_runs = 1_200, 12, 1, 2
        extra = {"baseline_runs": 1}
    result = run(args.out, args.rows, args.features, args.epochs, args.forgets, args.status_runs,
                 **extra)
    print(summary(result))


if __name__ == "__main__":
    main()
