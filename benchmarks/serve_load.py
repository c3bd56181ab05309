"""Load test of `sisa serve`: concurrent clients on loopback for a bounded time, first with no
deletion, then with a stream of deletion requests (one at a time: each is sent, applied, and after
a pause the next), against a fresh server process.

    python -m benchmarks.serve_load --out DIR                 # MLP and head stores, S=4
    python -m benchmarks.serve_load --out DIR --ray           # the same on Ray Serve, 2 replicas
    python -m benchmarks.serve_load --out DIR --tiny          # seconds: checks the script

Per phase it reports predictions per second, p50/p99 latency and errors; for the deletions, the
acknowledgement latency (request to 202), the time from acknowledgement to the retrained shard
going live (the receipt's, and the client's first answer from the new checkpoint), and every
answer checked against the deletion log (`sisa.service.staleness`): stale answers must be 0.
Writes serve_load.json and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from benchmarks.cli_kit import Serving, feature_flags, gaussian, sisa, write_table
from benchmarks.common import machine, write_json
from sisa.service.staleness import Answer, Deletion, check
from sisa.service.worker import ack_to_applied
from sisa.unlearning import DeletionReceipt

TOKEN = "load-test-token-0123456789abcdef"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def build_store(kind: str, root: Path, tiny: bool) -> tuple[Path, list[str], list[Any]]:
    """A store at S=4 (R=4) trained by a fresh `sisa train`; its record ids, and inputs to ask."""
    store = root / f"{kind}-store"
    if kind == "mlp":
        rows = 2_000 if tiny else 50_000
        cols = gaussian(rows, features=20, classes=10)
        data = write_table(root / "mlp.csv", cols)
        sisa("train", "--store", str(store), "--data", str(data), *feature_flags(20), "--shards", "4",
             "--slices", "4", "--epochs", "2", "--batch-size", "128", "--no-progress", "--json")
        x = np.stack([cols[f"f{j}"] for j in range(20)], axis=1)
        return store, list(cols["id"]), [list(map(float, row)) for row in x[:512]]
    # head: the packaged MiniLM encoder over Rotten Tomatoes' training split (400 with --tiny)
    import csv

    from sisa.builtin import load_builtin

    texts, _spec = load_builtin("builtin:rotten_tomatoes")
    texts = texts[:400] if tiny else texts
    data = root / "rt.csv"
    with open(data, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["id", "text", "label"])
        writer.writeheader()
        writer.writerows({"id": r["id"], "text": r["text"], "label": r["label"]} for r in texts)
    sisa("train", "--store", str(store), "--data", str(data), "--id-column", "id", "--text-column",
         "text", "--label-column", "label", "--backend", "head", "--shards", "4", "--slices", "4",
         "--epochs", "4", "--no-progress", "--json")
    # Ask about held-out snippets: the encoder runs for each (the store caches training texts only).
    held_out, _spec = load_builtin("builtin:rotten_tomatoes:test")
    return store, [r["id"] for r in texts], [r["text"] for r in held_out[:512]]


def served(store: Path, root: Path, ray: bool, replicas: int) -> Serving:
    """`sisa serve` up with every shard servable; under Ray, `replicas` replicas sharing one CPU."""
    options = ["--batch-window", "0.1", "--max-batch", "512"]
    if ray:
        options += ["--ray", "--replicas", str(replicas), "--replica-cpus", str(1 / replicas)]
    log = root / f"serve-{store.name}{'-ray' if ray else ''}.log"
    log.unlink(missing_ok=True)
    return Serving(store, log, TOKEN, *options)


def phase(server: Serving, inputs: list[Any], seconds: float, clients: int, batch: int,
          ids: list[str], deletion_gap: float | None, seed: int) -> dict[str, Any]:
    """Clients predicting for `seconds`; with `deletion_gap`, a stream of deletions meanwhile, one
    at a time: a random live record, acknowledged, applied, then `deletion_gap` seconds of pause."""
    stop = threading.Event()
    latencies: list[float] = []
    answers: list[Answer] = []
    errors: list[str] = []
    lock = threading.Lock()

    def client(k: int) -> None:
        rng = random.Random(seed * 100 + k)
        with httpx.Client(base_url=server.url, timeout=120) as own:
            while not stop.is_set():
                body = {"inputs": [inputs[rng.randrange(len(inputs))] for _ in range(batch)]}
                sent = time.monotonic()
                try:
                    r = own.post("/v1/predict", json=body)
                except httpx.TransportError as exc:
                    with lock:
                        errors.append(type(exc).__name__)
                    continue
                took = time.monotonic() - sent
                with lock:
                    if r.status_code == 200:
                        latencies.append(took)
                        answers.append(Answer(sent, r.json()["model"]["shards"]))
                    else:
                        errors.append(r.text[:200])

    threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
    began = time.monotonic()
    for t in threads:
        t.start()
    acks: list[tuple[float, float, dict[str, Any]]] = []  # (202 arrived, ack latency, body)
    deletions: list[Deletion] = []
    busy = 0.0  # seconds with a deletion acknowledged and not yet applied
    rng = random.Random(seed)
    while time.monotonic() - began < seconds:
        if deletion_gap is None:
            time.sleep(0.1)
            continue
        # One deletion of a random live record; wait until it is applied; pause; the next.
        record = ids.pop(rng.randrange(len(ids)))
        sent = time.monotonic()
        r = server.client.post("/v1/deletions", json={"ids": [record]}, headers=AUTH)
        arrived = time.monotonic()
        if r.status_code != 202:
            errors.append(f"deletion: {r.text[:200]}")
            continue
        acks.append((arrived, arrived - sent, r.json()))
        receipt = _applied(server, r.json()["request_id"])
        busy += time.monotonic() - sent
        deletions.append(Deletion(arrived, r.json()["shards"], receipt))
        time.sleep(deletion_gap)
    stop.set()
    for t in threads:
        t.join()
    elapsed = time.monotonic() - began
    stale = check(answers, deletions)
    lat = np.asarray(latencies) * 1000 if latencies else np.zeros(1)
    out: dict[str, Any] = {
        "seconds": round(elapsed, 2), "clients": clients, "batch": batch, "requests": len(latencies),
        "requests_per_s": round(len(latencies) / elapsed, 1),
        "predictions_per_s": round(len(latencies) * batch / elapsed, 1),
        "p50_ms": round(float(np.percentile(lat, 50)), 2), "p99_ms": round(float(np.percentile(lat, 99)), 2),
        "errors": len(errors), "error_examples": errors[:3], "stale_answers": stale.stale,
        "answers_checked": len(answers),
        "answers_with_a_shard_excluded": sum(len(a.shards) < 4 for a in answers),
    }
    if deletion_gap is not None:
        ack_ms = np.asarray([a[1] for a in acks]) * 1000
        live = [_first_live(answers, d) for d in deletions]
        applied = [ack_to_applied(DeletionReceipt.from_ledger(d.receipt)) if d.receipt else None
                   for d in deletions]
        out.update({
            "deletions": len(acks),
            "share_of_time_deleting": round(busy / elapsed, 3),
            "ack_p50_ms": round(float(np.percentile(ack_ms, 50)), 2) if len(ack_ms) else None,
            "ack_p99_ms": round(float(np.percentile(ack_ms, 99)), 2) if len(ack_ms) else None,
            "ack_to_applied_p50_s": _median(applied), "ack_to_applied_max_s": _max(applied),
            "ack_to_live_p50_s": _median(live), "ack_to_live_max_s": _max(live),
        })
    return out


def _applied(server: Serving, request_id: str, timeout: float = 600) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = server.client.get(f"/v1/deletions/{request_id}", headers=AUTH).json()
        if state["status"] == "applied":
            return dict(state["receipt"])
        time.sleep(0.05)
    raise RuntimeError(f"deletion {request_id} was not applied within {timeout} s")


def _first_live(answers: list[Answer], deletion: Deletion) -> float | None:
    """Seconds from the 202 to the first answer (sent after it) from every retrained checkpoint."""
    after = {s: c["after"] for s, c in (deletion.receipt or {}).get("checkpoints_changed", {}).items()}
    times = [a.sent for a in answers
             if a.sent > deletion.acknowledged and all(a.shards.get(s) == sha for s, sha in after.items())]
    return round(min(times) - deletion.acknowledged, 3) if times and after else None


def _median(values: list[float | None]) -> float | None:
    known = [v for v in values if v is not None]
    return round(float(np.median(known)), 3) if known else None


def _max(values: list[float | None]) -> float | None:
    known = [v for v in values if v is not None]
    return round(max(known), 3) if known else None


def table(results: dict[str, Any]) -> str:
    lines = ["| store | serving | phase | predictions/s | p50 ms | p99 ms | errors | stale | deletions "
             "| ack p50/p99 ms | ack->applied p50 s | ack->live p50/max s |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for run in results["runs"]:
        for name, p in (("steady", run["steady"]), ("deleting", run["deleting"])):
            dels = p.get("deletions", "")
            ack = f"{p['ack_p50_ms']} / {p['ack_p99_ms']}" if dels else ""
            live = f"{p['ack_to_live_p50_s']} / {p['ack_to_live_max_s']}" if dels else ""
            lines.append(f"| {run['store']} | {run['serving']} | {name} | {p['predictions_per_s']:,} | "
                         f"{p['p50_ms']} | {p['p99_ms']} | {p['errors']} | {p['stale_answers']} | {dels} | "
                         f"{ack} | {p.get('ack_to_applied_p50_s', '') if dels else ''} | {live} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--stores", default="mlp,head", help="mlp, head or both (comma-separated)")
    parser.add_argument("--ray", action="store_true", help="serve on Ray Serve (--replicas)")
    parser.add_argument("--replicas", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=20.0, help="length of each phase")
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--batch", type=int, default=1, help="inputs per prediction request")
    parser.add_argument("--deletion-gap", type=float, default=0.5,
                        help="seconds from one deletion applied to the next one sent")
    parser.add_argument("--tiny", action="store_true", help="seconds of work: checks the script")
    args = parser.parse_args(argv)
    if args.tiny:
        args.seconds, args.clients, args.deletion_gap = 3.0, 2, 0.2
    args.out.mkdir(parents=True, exist_ok=True)
    command = " ".join(["python -m benchmarks.serve_load", *(argv or sys.argv[1:])])
    results: dict[str, Any] = {"meta": {"command": command, "machine": machine(), "cpus": os.cpu_count()},
                               "runs": []}
    with tempfile.TemporaryDirectory(prefix="sisa-serve-load-") as tmp:
        root = Path(tmp)
        for kind in args.stores.split(","):
            store, ids, inputs = build_store(kind, root, args.tiny)
            server = served(store, root, args.ray, args.replicas)
            try:
                serving = f"ray serve, {args.replicas} replicas" if args.ray else "uvicorn"
                run: dict[str, Any] = {"store": kind, "shards": 4, "serving": serving,
                                       "startup_s": round(server.startup, 2)}
                run["steady"] = phase(server, inputs, args.seconds, args.clients, args.batch, ids, None, 1)
                run["deleting"] = phase(server, inputs, args.seconds, args.clients, args.batch, ids,
                                        args.deletion_gap, 2)
            finally:
                server.stop()
            results["runs"].append(run)
            print(json.dumps(run), flush=True)
    write_json(args.out / "serve_load.json", results)
    text = table(results)
    (args.out / "serve_load.md").write_text(text + "\n")
    print(text)
    if any(p["stale_answers"] for run in results["runs"] for p in (run["steady"], run["deleting"])):
        sys.exit("stale answers found: see serve_load.json")


if __name__ == "__main__":
    main()
