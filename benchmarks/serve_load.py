"""Load test of `sisa serve`: concurrent clients on loopback for a bounded time, first with no
deletion, then with a stream of deletion requests (one at a time: each is sent, applied, and after
a pause the next), against a fresh server process.

    python -m benchmarks.serve_load --out DIR                 # MLP and head stores, S=4
    python -m benchmarks.serve_load --out DIR --ray           # the same on Ray Serve, 2 replicas
    python -m benchmarks.serve_load --out DIR --tiny          # seconds: checks the script
    python -m benchmarks.serve_load --out DIR --generation    # + the generation load (SmolLM2)

Per phase it reports predictions per second, p50/p99 latency and errors; for the deletions, the
acknowledgement latency (request to 202), the time from acknowledgement to the retrained shard
going live (the receipt's, and the client's first answer from the new checkpoint), and every
answer checked against the deletion log (`sisa.service.staleness`): stale answers must be 0.
Between the two phases, the same clients ask a bare baseline in turn with the server, at each
`--compare-batches` size: a plain FastAPI app in its own uvicorn process computing the same shard
models' answer from the same weights (loaded once at start through sisa's loader, then never
checked); the ratios are sisa's over the bare app's. Writes serve_load.json and prints markdown
tables.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from pydantic import BaseModel

from benchmarks.cli_kit import Serving, feature_flags, gaussian, sisa, write_table
from benchmarks.common import machine, write_json
from sisa.service.staleness import Answer, Deletion, check
from sisa.service.worker import ack_to_applied
from sisa.testing import free_port
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


@dataclass
class Load:
    """What the clients saw: each 200's latency (seconds) and the shards that answered it, the
    errors, and the seconds they ran."""

    batch: int
    latencies: list[float] = field(default_factory=list)
    answers: list[Answer] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    elapsed: float = 0.0

    def add(self, other: Load) -> None:
        self.latencies += other.latencies
        self.answers += other.answers
        self.errors += other.errors
        self.elapsed += other.elapsed

    def summary(self) -> dict[str, Any]:
        lat = np.asarray(self.latencies) * 1000 if self.latencies else np.zeros(1)
        return {"seconds": round(self.elapsed, 2), "batch": self.batch, "requests": len(self.latencies),
                "requests_per_s": round(len(self.latencies) / self.elapsed, 1),
                "predictions_per_s": round(len(self.latencies) * self.batch / self.elapsed, 1),
                "p50_ms": round(float(np.percentile(lat, 50)), 2),
                "p99_ms": round(float(np.percentile(lat, 99)), 2),
                "errors": len(self.errors), "error_examples": self.errors[:3]}


@contextmanager
def predicting(url: str, inputs: list[Any], clients: int, batch: int, seed: int) -> Iterator[Load]:
    """`clients` threads asking `url` for predictions of `batch` random inputs, one request after
    another, for as long as the block runs."""
    load = Load(batch)
    stop = threading.Event()
    lock = threading.Lock()

    def client(k: int) -> None:
        rng = random.Random(seed * 100 + k)
        with httpx.Client(base_url=url, timeout=120) as own:
            while not stop.is_set():
                body = {"inputs": [inputs[rng.randrange(len(inputs))] for _ in range(batch)]}
                sent = time.monotonic()
                try:
                    r = own.post("/v1/predict", json=body)
                except httpx.TransportError as exc:
                    with lock:
                        load.errors.append(type(exc).__name__)
                    continue
                took = time.monotonic() - sent
                with lock:
                    if r.status_code == 200:
                        load.latencies.append(took)
                        load.answers.append(Answer(sent, r.json()["model"]["shards"]))
                    else:
                        load.errors.append(r.text[:200])

    threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
    began = time.monotonic()
    for t in threads:
        t.start()
    try:
        yield load
    finally:
        stop.set()
        for t in threads:
            t.join()
        load.elapsed = time.monotonic() - began


def phase(server: Serving, inputs: list[Any], seconds: float, clients: int, batch: int,
          ids: list[str], deletion_gap: float | None, seed: int) -> dict[str, Any]:
    """Clients predicting for `seconds`; with `deletion_gap`, a stream of deletions meanwhile, one
    at a time: a random live record, acknowledged, applied, then `deletion_gap` seconds of pause."""
    acks: list[tuple[float, float, dict[str, Any]]] = []  # (202 arrived, ack latency, body)
    deletions: list[Deletion] = []
    errors: list[str] = []
    busy = 0.0  # seconds with a deletion acknowledged and not yet applied
    rng = random.Random(seed)
    with predicting(server.url, inputs, clients, batch, seed) as load:
        began = time.monotonic()
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
    load.errors += errors
    stale = check(load.answers, deletions)
    out: dict[str, Any] = {
        **load.summary(), "clients": clients, "stale_answers": stale.stale,
        "answers_checked": len(load.answers),
        "answers_with_a_shard_excluded": sum(len(a.shards) < 4 for a in load.answers),
    }
    if deletion_gap is not None:
        ack_ms = np.asarray([a[1] for a in acks]) * 1000
        live = [_first_live(load.answers, d) for d in deletions]
        applied = [ack_to_applied(DeletionReceipt.from_ledger(d.receipt)) if d.receipt else None
                   for d in deletions]
        # The retrain's own seconds (the receipt's), and the service's time around it: the
        # issue's goal is acknowledgement to live within 1.5x of them.
        retrain = [float(d.receipt["seconds"]) if d.receipt else None for d in deletions]
        over = [t / r if t is not None and r else None for t, r in zip(live, retrain, strict=True)]
        out.update({
            "receipt_seconds_p50": _median(retrain),
            "ack_to_live_over_receipt_p50": _median(over),
            "ack_to_live_over_receipt_max": _max(over),
            "deletions": len(acks),
            "share_of_time_deleting": round(busy / load.elapsed, 3),
            "ack_p50_ms": round(float(np.percentile(ack_ms, 50)), 2) if len(ack_ms) else None,
            "ack_p99_ms": round(float(np.percentile(ack_ms, 99)), 2) if len(ack_ms) else None,
            "ack_to_applied_p50_s": _median(applied), "ack_to_applied_max_s": _max(applied),
            "ack_to_live_p50_s": _median(live), "ack_to_live_max_s": _max(live),
        })
    return out


# -- the bare baseline ---------------------------------------------------------------------------


class BarePredictIn(BaseModel):
    """The bare app's request: rows of numbers, or texts."""

    inputs: list[list[float]] | list[str]


def bare_app(store: Path) -> Any:
    """A plain FastAPI app answering `/v1/predict` as `sisa serve` does (the same shard models,
    loaded once through sisa's loader, combined by the store's voting), with no look at the store
    afterwards: what serving costs without the staleness guarantee, the metrics and the checks."""
    from fastapi import FastAPI

    from sisa import Sisa
    from sisa.tasks import ClassificationTask
    from sisa.training.shard_trainer import setup_process

    reader = Sisa.open(store, recover=False, read_only=True)
    task, voting = reader.task, reader.config.voting
    if not isinstance(task, ClassificationTask):
        raise SystemExit("the bare app answers classifiers' predictions only")
    setup_process(reader.config.training.torch_threads, reader.config.execution.device)
    ensemble = reader.ensemble()
    classes = list(task.classes)
    features = reader.data_spec.kind == "features"
    shards = {str(s): sha for s, sha in ensemble.shas.items()}
    app = FastAPI()

    @app.post("/v1/predict")
    def predict(body: BarePredictIn) -> dict[str, Any]:
        batch = np.asarray(body.inputs, dtype=np.float32) if features else list(body.inputs)
        combined = task.predict_proba(ensemble.shard_proba(batch), voting)
        return {"predictions": [classes[i] for i in combined.argmax(axis=-1)], "classes": classes,
                "model": {"shards": shards}}

    @app.get("/healthz")
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    return app


def serve_bare(store: Path, port: int) -> None:
    """Run `bare_app` with uvicorn as `sisa serve` runs its app (no access log), until SIGINT."""
    import uvicorn

    uvicorn.run(bare_app(store), host="127.0.0.1", port=port, log_level="warning",
                access_log=False, server_header=False, timeout_graceful_shutdown=5)


class Bare:
    """The bare app as a fresh process (`--bare-app`), its output appended to `log`; `ready()`
    waits until it answers."""

    def __init__(self, store: Path, log: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.started = time.perf_counter()
        with open(log, "ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "benchmarks.serve_load", "--bare-app", str(store),
                 "--port", str(self.port)], stdout=out, stderr=subprocess.STDOUT)
        self.log = log
        self.client = httpx.Client(base_url=self.url, timeout=120)
        self.startup = 0.0

    def ready(self, timeout: float = 600) -> Bare:
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the bare app exited: {self.log.read_text()[-3000:]}")
            if time.perf_counter() - self.started > timeout:
                self.stop()
                raise RuntimeError(f"the bare app did not start in {timeout:.0f} s")
            try:
                if self.client.get("/healthz").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        self.startup = time.perf_counter() - self.started
        return self

    def stop(self) -> None:
        self.client.close()
        self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def versus_bare(server: Serving, bare: Bare, inputs: list[Any], seconds: float, clients: int,
                batch: int, seed: int) -> dict[str, Any]:
    """The same client load on `sisa serve` and on the bare app, `seconds` each, in the order sisa,
    bare, bare, sisa (half the time each), so a drift in the machine's load falls on both alike;
    ratios are sisa's over the bare app's."""
    urls = {"sisa": server.url, "bare": bare.url}
    loads = {name: Load(batch) for name in urls}
    for name in urls:  # a few requests each first: nothing measured pays a first call's costs
        with httpx.Client(base_url=urls[name], timeout=120) as warm:
            for _ in range(5):
                r = warm.post("/v1/predict", json={"inputs": inputs[:batch]})
                if r.status_code != 200:
                    raise RuntimeError(f"{name} answered {r.status_code}: {r.text[:300]}")
    for i, name in enumerate(("sisa", "bare", "bare", "sisa")):
        with predicting(urls[name], inputs, clients, batch, seed * 10 + i) as load:
            time.sleep(seconds / 2)
        loads[name].add(load)
    sides = {name: load.summary() for name, load in loads.items()}
    if not (sides["sisa"]["requests"] and sides["bare"]["requests"]):
        return {"batch": batch, "clients": clients, **sides, "ratio_predictions_per_s": None,
                "ratio_p99": None, "goal_met": False}
    pps = sides["sisa"]["predictions_per_s"] / sides["bare"]["predictions_per_s"]
    p99 = sides["sisa"]["p99_ms"] / sides["bare"]["p99_ms"]
    return {"batch": batch, "clients": clients, **sides,
            "ratio_predictions_per_s": round(pps, 3), "ratio_p99": round(p99, 3),
            # the goal: at least 0.8x the bare app's predictions/s, p99 within 1.5x
            "goal_met": bool(pps >= 0.8 and p99 <= 1.5)}


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
             "| ack p50/p99 ms | ack->applied p50 s | ack->live p50/max s | retrain (receipt) p50 s "
             "| ack->live / receipt p50 |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for run in results["runs"]:
        for name, p in (("steady", run["steady"]), ("deleting", run["deleting"])):
            dels = p.get("deletions", "")
            ack = f"{p['ack_p50_ms']} / {p['ack_p99_ms']}" if dels else ""
            live = f"{p['ack_to_live_p50_s']} / {p['ack_to_live_max_s']}" if dels else ""
            if name == "deleting":
                name += f" ({run['deleting_over_steady']}x steady)"
            lines.append(f"| {run['store']} | {run['serving']} | {name} | {p['predictions_per_s']:,} | "
                         f"{p['p50_ms']} | {p['p99_ms']} | {p['errors']} | {p['stale_answers']} | {dels} | "
                         f"{ack} | {p.get('ack_to_applied_p50_s', '') if dels else ''} | {live} | "
                         f"{p.get('receipt_seconds_p50', '') if dels else ''} | "
                         f"{p.get('ack_to_live_over_receipt_p50', '') if dels else ''} |")
    versus = [(run, v) for run in results["runs"] for v in run.get("versus_bare", [])]
    if versus:
        lines += ["", "| store | serving | batch | sisa predictions/s | bare predictions/s | ratio | "
                  "sisa p50 / p99 ms | bare p50 / p99 ms | p99 ratio | goal met |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
        for run, v in versus:
            sisa_, bare = v["sisa"], v["bare"]
            lines.append(f"| {run['store']} | {run['serving']} | {v['batch']} | "
                         f"{sisa_['predictions_per_s']:,} | {bare['predictions_per_s']:,} | "
                         f"{v['ratio_predictions_per_s']} | {sisa_['p50_ms']} / {sisa_['p99_ms']} | "
                         f"{bare['p50_ms']} / {bare['p99_ms']} | {v['ratio_p99']} | {v['goal_met']} |")
    generation = results.get("generation")
    if generation:
        lines += ["", "| generation (combine) | tokens/s, 1 client | tokens/s, 4 clients | ratio | "
                  "answers unlike decoding alone |", "| --- | --- | --- | --- | --- |"]
        for combine, ratio in generation["speedup"].items():
            phases = {p["clients"]: p for p in generation["phases"] if p["combine"] == combine}
            one, most = phases[min(phases)], phases[max(phases)]
            lines.append(f"| {combine} | {one['tokens_per_second']} | {most['tokens_per_second']} | "
                         f"{ratio} | {sum(p['mismatches'] for p in phases.values())} |")
    return "\n".join(lines)


def generation_load(out: Path, tiny: bool, model: str | None) -> dict[str, Any]:
    """`benchmarks.generation_load` as a fresh process (it starts its own `sisa serve`): tokens/s
    of one client and of four, and each answer against decoding it alone."""
    command = [sys.executable, "-m", "benchmarks.generation_load", "--out", str(out),
               *(["--tiny"] if tiny else []), *(["--model", model] if model else [])]
    subprocess.run(command, check=True)
    found = json.loads((out / "generation_load.json").read_text())
    return {"command": " ".join(["python", *command[1:]]), "speedup": found["speedup"],
            "phases": [{k: p[k] for k in ("combine", "clients", "tokens_per_second", "p50_seconds",
                                          "mismatches")} for p in found["phases"]]}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path)
    parser.add_argument("--stores", default="mlp,head", help="mlp, head or both (comma-separated)")
    parser.add_argument("--ray", action="store_true", help="serve on Ray Serve (--replicas)")
    parser.add_argument("--replicas", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=20.0, help="length of each phase")
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--batch", type=int, default=1, help="inputs per prediction request")
    parser.add_argument("--deletion-gap", type=float, default=0.5,
                        help="seconds from one deletion applied to the next one sent")
    parser.add_argument("--compare-batches", default="1,32",
                        help="batch sizes at which to compare with the bare app ('' for none)")
    parser.add_argument("--generation", action="store_true",
                        help="also the generation load (benchmarks.generation_load: tokens/s of 1 "
                             "and 4 clients of a causal-LM store, every answer against decoding "
                             "alone), written to DIR/generation")
    parser.add_argument("--generation-model", help="the generation load's model (with --tiny: a "
                                                   "small local model directory)")
    parser.add_argument("--tiny", action="store_true", help="seconds of work: checks the script")
    parser.add_argument("--bare-app", type=Path, help="(internal) serve this store's bare app")
    parser.add_argument("--port", type=int, help="(internal) the bare app's port")
    args = parser.parse_args(argv)
    if args.bare_app is not None:
        serve_bare(args.bare_app, args.port)
        return
    if args.out is None:
        parser.error("--out is required")
    batches = [int(b) for b in args.compare_batches.split(",") if b.strip()]
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
            # Both start at once (each imports torch and loads the models); the bare app stops
            # before any deletion, so both serve the very same weights.
            bare = Bare(store, root / f"bare-{store.name}.log") if batches else None
            try:
                server = served(store, root, args.ray, args.replicas)
            except BaseException:
                if bare is not None:
                    bare.stop()
                raise
            try:
                serving = f"ray serve, {args.replicas} replicas" if args.ray else "uvicorn"
                run: dict[str, Any] = {"store": kind, "shards": 4, "serving": serving,
                                       "startup_s": round(server.startup, 2)}
                run["steady"] = phase(server, inputs, args.seconds, args.clients, args.batch, ids, None, 1)
                if bare is not None:
                    bare.ready()
                    run["bare_startup_s"] = round(bare.startup, 2)
                    run["versus_bare"] = [versus_bare(server, bare, inputs, args.seconds, args.clients,
                                                      b, 3 + i) for i, b in enumerate(batches)]
                    bare.stop()
                    bare = None
                run["deleting"] = phase(server, inputs, args.seconds, args.clients, args.batch, ids,
                                        args.deletion_gap, 2)
                # the goal: at least 0.8x the steady predictions/s while deletions stream in
                run["deleting_over_steady"] = round(run["deleting"]["predictions_per_s"]
                                                    / run["steady"]["predictions_per_s"], 3)
            finally:
                server.stop()
                if bare is not None:
                    bare.stop()
            results["runs"].append(run)
            print(json.dumps(run), flush=True)
    if args.generation:
        results["generation"] = generation_load(args.out / "generation", args.tiny, args.generation_model)
    write_json(args.out / "serve_load.json", results)
    text = table(results)
    (args.out / "serve_load.md").write_text(text + "\n")
    print(text)
    if any(p["stale_answers"] for run in results["runs"] for p in (run["steady"], run["deleting"])):
        sys.exit("stale answers found: see serve_load.json")


if __name__ == "__main__":
    main()
