"""Scaling to a million records: every step a fresh `sisa` process, plotted against N.

    python -m benchmarks.scaling --out DIR [--sizes 10000,100000,1000000] [--shards 16]
                                 [--slices 4] [--epochs 2] [--batch-size 128] [--tiny]

Data: 20 float features (4 decimals) around 10 Gaussian centres, as CSV. For each N, at S=16 R=4
(MLP): `sisa train` (ingestion seconds, training seconds, wall, peak memory), one deletion (a
fresh `sisa forget` per slice index, the mean: a deletion's cost depends on its slice), 100
deletions in one request (`--ids-file`), and `sisa predict` on a 10,000-row file (rows per
second). A second series holds N/S fixed (5,000 records a shard: N=10k S=2, 100k S=20, 1M S=200):
there a deletion's cost should not grow with N. Writes DIR/scaling.json, DIR/scaling.png and
DIR/summary.md.
"""

from __future__ import annotations

import argparse
import random
import shutil
import statistics
from pathlib import Path
from typing import Any

from benchmarks.cli_kit import feature_flags, gaussian, pick_per_slice, sisa, write_table
from benchmarks.common import machine, save_figure, write_json

FEATURES = 20


def write_data(path: Path, rows: int, seed: int, prefix: str) -> Path:
    return write_table(path, gaussian(rows, FEATURES, seed=seed, prefix=prefix))


def one_size(work: Path, data: Path, test: Path, rows: int, shards: int, slices: int,
             epochs: int, batch: int, test_rows: int, full: bool) -> dict[str, Any]:
    store = work / f"store-{rows}-{shards}"
    flags = [*feature_flags(FEATURES), "--epochs", str(epochs), "--batch-size", str(batch), "--json",
             "--no-progress"]
    train = sisa("train", "--store", str(store), "--data", str(data), "--shards", str(shards),
                 "--slices", str(slices), *flags)
    out: dict[str, Any] = {"rows": rows, "shards": shards, "records_per_shard": rows // shards,
                           "train_wall": round(train.wall, 2), "train_seconds": train.output["seconds"],
                           "ingest_seconds": train.output["ingest_seconds"],
                           "train_peak_mb": round(train.peak_mb)}
    singles = []
    for record_id in pick_per_slice(store, per_slice=1, slices=slices):
        done = sisa("forget", "--store", str(store), record_id, "--json", "--no-progress")
        singles.append({"wall": done.wall, "seconds": done.output["seconds"], "peak_mb": done.peak_mb})
    out["one_deletion_seconds"] = round(statistics.mean(s["seconds"] for s in singles), 4)
    out["one_deletion_wall"] = round(statistics.mean(s["wall"] for s in singles), 3)
    out["one_deletion_peak_mb"] = round(max(s["peak_mb"] for s in singles))
    if full:
        ids = [f"r{i:08d}" for i in random.Random(rows).sample(range(rows), 100)]
        ids_file = work / "ids.txt"
        ids_file.write_text("\n".join(ids) + "\n")
        batch_forget = sisa("forget", "--store", str(store), "--ids-file", str(ids_file), "--json",
                            "--no-progress")
        receipt = batch_forget.output
        out["hundred_deletions_seconds"] = receipt["seconds"]
        out["hundred_deletions_wall"] = round(batch_forget.wall, 2)
        out["hundred_deletions_shards"] = len(receipt["affected_shards"])
        predict = sisa("predict", "--store", str(store), "--data", str(test), "--output",
                       str(work / "predictions.jsonl"))
        out["predict_rows_per_second"] = round(test_rows / predict.wall)
        out["predict_wall"] = round(predict.wall, 2)
        out["predict_peak_mb"] = round(predict.peak_mb)
    shutil.rmtree(store)
    return out


def run(out: Path, sizes: list[int], shards: int, slices: int, epochs: int, batch: int,
        per_shard: int, test_rows: int) -> dict[str, Any]:
    work = out / "work"
    work.mkdir(parents=True, exist_ok=True)
    test = write_data(work / "test.csv", test_rows, seed=1, prefix="q")
    result: dict[str, Any] = {"machine": machine(), "features": FEATURES, "shards": shards,
                              "slices": slices, "epochs": epochs, "batch_size": batch,
                              "fixed_records_per_shard": per_shard, "series": [], "fixed": []}
    for rows in sizes:
        data = write_data(work / f"data-{rows}.csv", rows, seed=0, prefix="r")
        result["series"].append(one_size(work, data, test, rows, shards, slices, epochs, batch,
                                         test_rows, full=True))
        fixed_shards = max(1, rows // per_shard)
        result["fixed"].append(one_size(work, data, test, rows, fixed_shards, slices, epochs, batch,
                                        test_rows, full=False))
        data.unlink()
        write_json(out / "scaling.json", result)
    shutil.rmtree(work)
    write_json(out / "scaling.json", result)
    plot(result, out)
    (out / "summary.md").write_text(summary(result))
    return result


def plot(r: dict[str, Any], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s, f = r["series"], r["fixed"]
    n = [x["rows"] for x in s]
    fig, axes = plt.subplots(2, 2, figsize=(10, 7.5))
    ax = axes[0][0]
    ax.loglog(n, [x["ingest_seconds"] for x in s], "o-", label="ingestion (train's ingest_seconds)")
    ax.loglog(n, [x["train_seconds"] for x in s], "s-", label="training")
    ax.loglog(n, [x["train_wall"] for x in s], "^-", label="sisa train wall")
    ax.set(xlabel="records N", ylabel="seconds", title=f"Training, S={r['shards']} R={r['slices']}")
    ax.legend()
    ax = axes[0][1]
    ax.loglog(n, [x["train_peak_mb"] for x in s], "o-", label="sisa train")
    ax.loglog(n, [x["one_deletion_peak_mb"] for x in s], "s-", label="sisa forget")
    ax.axhline(4096, color="grey", ls="--", label="4 GB")
    ax.set(xlabel="records N", ylabel="peak resident MB", title="Peak memory (fresh processes)")
    ax.legend()
    ax = axes[1][0]
    ax.loglog(n, [x["one_deletion_seconds"] for x in s], "o-", label=f"1 deletion, S={r['shards']}")
    ax.loglog(n, [x["hundred_deletions_seconds"] for x in s], "s-", label=f"100 deletions, S={r['shards']}")
    ax.loglog([x["rows"] for x in f], [x["one_deletion_seconds"] for x in f], "^-",
              label=f"1 deletion, N/S = {r['fixed_records_per_shard']:,}")
    ax.set(xlabel="records N", ylabel="receipt seconds", title="Deletion cost")
    ax.legend()
    ax = axes[1][1]
    ax.semilogx(n, [x["predict_rows_per_second"] for x in s], "o-")
    ax.set(xlabel="records N", ylabel="rows / s (sisa predict wall)", title="Prediction throughput")
    save_figure(fig, out, "scaling.png")


def summary(r: dict[str, Any]) -> str:
    lines = [f"# Scaling: {r['features']} features, MLP, R={r['slices']}, {r['epochs']} epochs per slice, "
             f"batch {r['batch_size']}", "", f"Machine: {r['machine']}.", "",
             f"S={r['shards']}:", "",
             "| N | ingest s | train s | train wall s | train peak MB | 1 deletion s (wall) | "
             "100 deletions s (shards) | predict rows/s |", "|" + " --- |" * 8]
    for x in r["series"]:
        lines.append(f"| {x['rows']:,} | {x['ingest_seconds']} | {x['train_seconds']} | {x['train_wall']} | "
                     f"{x['train_peak_mb']} | {x['one_deletion_seconds']} ({x['one_deletion_wall']}) | "
                     f"{x['hundred_deletions_seconds']} ({x['hundred_deletions_shards']}) | "
                     f"{x['predict_rows_per_second']} |")
    lines += ["", f"N/S fixed at {r['fixed_records_per_shard']:,}:", "",
              "| N | S | 1 deletion s (wall) | train s |", "| --- | --- | --- | --- |"]
    lines += [f"| {x['rows']:,} | {x['shards']} | {x['one_deletion_seconds']} ({x['one_deletion_wall']}) | "
              f"{x['train_seconds']} |" for x in r["fixed"]]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--sizes", default="10000,100000,1000000")
    parser.add_argument("--shards", type=int, default=16)
    parser.add_argument("--slices", type=int, default=4)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--per-shard", type=int, default=5000)
    parser.add_argument("--test-rows", type=int, default=10_000)
    parser.add_argument("--tiny", action="store_true", help="seconds of work: checks the script")
    args = parser.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",")]
    if args.tiny:
        sizes, args.shards, args.per_shard, args.test_rows = [800], 4, 200, 100
    r = run(args.out, sizes, args.shards, args.slices, args.epochs, args.batch_size, args.per_shard,
            args.test_rows)
    print(summary(r))


if __name__ == "__main__":
    main()
