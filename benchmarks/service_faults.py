"""The service under faults, each a fresh `sisa serve` process on loopback:

1. clients predict while a live checkpoint is substituted on disk (another shard's weights, the
   registration's sha256 updated without the key): every answer after it is checked for that
   checkpoint (an answer from an unverified checkpoint);
2. the service is killed with SIGKILL at a random time while it applies a stream of deletions,
   then started again (it recovers first): every deletion it acknowledged (`202`) must be
   applied, the audit clean, no file derived from a deleted record;
3. bad inputs: wrong types and widths, numbers beyond float32, NaN, unknown fields, bad JSON,
   bodies over the limit (declared and chunked), ids that quote SQL; none may be answered `200`,
   and no error body may quote the request.

    python -m benchmarks.service_faults --out DIR [--kills N] [--seed S] [--tiny]

Writes DIR/service_faults.json and prints the totals.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx

from benchmarks.cli_kit import Serving
from benchmarks.common import machine, write_json
from sisa import Sisa
from sisa.testing import SPEC, derived_from, make_rows, small_config
from sisa.testing.tamper import checkpoint, substitute_weights

TOKEN = "service-faults-token-0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def served(store: Path, log: Path) -> Serving:
    """`sisa serve` up (ready even with a shard sitting out), deletions polled every 0.2 s."""
    return Serving(store, log, TOKEN, "--batch-window", "0.05", "--poll-interval", "0.2",
                   ready=(200, 503), timeout=300)


def row_inputs(rows: list[dict[str, Any]]) -> list[list[float]]:
    return [[float(r[c]) for c in SPEC.feature_columns] for r in rows]


def substituted(store: Path, work: Path, seconds: float) -> dict[str, Any]:
    """Answers while shard 0's live checkpoint is substituted: none may come from it."""
    server = served(store, work / "substituted.log")
    inputs = row_inputs(make_rows(64, seed=3))
    answers: list[tuple[float, dict[str, str]]] = []
    stop = threading.Event()

    def predicting() -> None:
        with httpx.Client(base_url=server.url, timeout=60) as own:
            while not stop.is_set():
                sent = time.monotonic()
                r = own.post("/v1/predict", json={"inputs": [random.choice(inputs)]})
                if r.status_code == 200:
                    answers.append((sent, r.json()["model"]["shards"]))

    threads = [threading.Thread(target=predicting) for _ in range(2)]
    for t in threads:
        t.start()
    try:
        time.sleep(seconds / 2)
        other = (store / checkpoint(store, 1).path / "weights.safetensors").read_bytes()
        substitute_weights(store, 0, other)
        done = time.monotonic()
        forged = checkpoint(store, 0).sha256
        time.sleep(seconds / 2)
    finally:
        stop.set()
        for t in threads:
            t.join()
        server.stop()
    after = [a for a in answers if a[0] > done]
    return {"answers": len(answers), "answers_after": len(after),
            "from_the_unverified_checkpoint": sum(1 for _, shards in after if shards.get("0") == forged)}


def kill_trial(store: Path, work: Path, rng: random.Random, deletions: int) -> dict[str, Any]:
    """Deletions streamed in, the service killed at a random time meanwhile, then started again:
    every acknowledged deletion applied, the audit clean, nothing derived from a deleted record."""
    log = work / "kills.log"
    server = served(store, log)
    with Sisa.open(store, recover=False, read_only=True) as sisa:
        live = sorted(r.id for r in sisa.live_records())
    victims = rng.sample(live, deletions)
    acknowledged: list[str] = []
    stop = threading.Event()

    def deleting() -> None:
        with httpx.Client(base_url=server.url, timeout=30) as own:
            for victim in victims:
                if stop.is_set():
                    return
                try:
                    r = own.post("/v1/deletions", json={"ids": [victim]}, headers=AUTH)
                except httpx.TransportError:
                    return
                if r.status_code == 202:
                    acknowledged.append(victim)
                time.sleep(rng.uniform(0.0, 0.15))

    thread = threading.Thread(target=deleting)
    thread.start()
    time.sleep(rng.uniform(0.2, 1.5))
    server.kill()
    stop.set()
    thread.join()
    again = served(store, log)  # a writer: it recovers before it serves
    deadline = time.monotonic() + 120
    while again.client.get("/v1/deletions?status=pending", headers=AUTH).json()["deletions"]:
        if time.monotonic() > deadline:
            break
        time.sleep(0.1)
    again.stop()
    with Sisa.open(store, recover=False, read_only=True) as sisa:
        found = sisa.records(acknowledged)
        lost = [i for i in acknowledged if found[i].deleted_at is None]
        report = sisa.audit()
    return {"acknowledged": len(acknowledged), "lost": len(lost), "audit_ok": report.ok,
            "violations": [v.problem for v in report.violations][:3],
            "derived": derived_from(store, set(acknowledged))}


BAD: list[tuple[str, str, Any]] = [  # method, path, body (bytes are sent as they are)
    ("post", "/v1/predict", {"inputs": [[1e39, 0, 0, 0]]}),
    ("post", "/v1/predict", {"inputs": [[-1e39, 0, 0, 0]]}),
    ("post", "/v1/predict", {"inputs": [[3.5e38, 0, 0, 0]]}),
    ("post", "/v1/predict", b'{"inputs": [[NaN, 0, 0, 0]]}'),
    ("post", "/v1/predict", b'{"inputs": [[Infinity, 0, 0, 0]]}'),
    ("post", "/v1/predict", {"inputs": [[1, 2]]}),
    ("post", "/v1/predict", {"inputs": [["QUOTE-ME-1", 0, 0, 0]]}),
    ("post", "/v1/predict", {"inputs": ["QUOTE-ME-2"]}),
    ("post", "/v1/predict", {"inputs": [[0, 0, 0, 0]], "QUOTE-ME-3": 1}),
    ("post", "/v1/predict", {"inputs": []}),
    ("post", "/v1/predict", b"{QUOTE-ME-4"),
    ("post", "/v1/predict", {"inputs": [[0, 0, 0, 0]] * 300}),
    ("post", "/v1/predict", "huge"),
    ("post", "/v1/predict", "huge-chunked"),
    ("post", "/v1/generate", {"prompts": ["QUOTE-ME-5"]}),
    ("post", "/v1/score", {"texts": ["QUOTE-ME-6"]}),
    ("post", "/v1/deletions", {"ids": ["QUOTE-ME-7' OR 1=1--"]}),
    ("post", "/v1/deletions", {"group": "QUOTE-ME-8"}),
    ("post", "/v1/deletions", {"ids": "QUOTE-ME-9"}),
    ("post", "/v1/deletions", {"ids": ["r0001"], "group": "QUOTE-ME-10"}),
    ("get", "/v1/deletions/QUOTE-ME-11' OR 1=1--", None),
    ("get", "/v1/deletions?status=QUOTE-ME-12", None),
    ("get", "/v1/QUOTE-ME-13", None),
]


def bad_inputs(store: Path, work: Path) -> dict[str, Any]:
    server = served(store, work / "bad.log")
    answered_200: list[str] = []
    quoted: list[str] = []
    statuses: dict[str, int] = {}
    try:
        for method, path, body in BAD:
            kwargs: dict[str, Any] = {"headers": {**AUTH, "Content-Type": "application/json"}}
            if body == "huge":
                kwargs["content"] = b'{"inputs": [["' + b"x" * (2 << 20) + b'"]]}'
            elif body == "huge-chunked":
                big = b'{"inputs": [["' + b"x" * (2 << 20) + b'"]]}'
                kwargs["content"] = (big[i:i + 65536] for i in range(0, len(big), 65536))
            elif isinstance(body, bytes):
                kwargs["content"] = body
            elif body is not None:
                kwargs["json"] = body
            r = getattr(server.client, method)(path, **kwargs)
            statuses[f"{method} {path[:40]} {str(body)[:40]}"] = r.status_code
            if r.status_code == 200:
                answered_200.append(f"{method} {path}")
            if "QUOTE-ME" in r.text or "OR 1=1" in r.text:
                quoted.append(f"{method} {path}: {r.text[:200]}")
    finally:
        server.stop()
    return {"tried": len(BAD), "answered_200": answered_200, "quoted": quoted, "statuses": statuses}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.service_faults", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("results/service_faults"))
    parser.add_argument("--kills", type=int, default=10, help="kill trials")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tiny", action="store_true", help="one kill trial, short phases")
    args = parser.parse_args(argv)
    kills = 1 if args.tiny else args.kills
    started = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="sisa-service-faults-"))
    rng = random.Random(args.seed)
    try:
        base = work / "base"
        Sisa.train(base, make_rows(300), small_config(), SPEC).close()
        shutil.copytree(base, work / "substituted")
        substitution = substituted(work / "substituted", work, 2.0 if args.tiny else 6.0)
        trials = []
        for k in range(kills):
            shutil.rmtree(work / "killed", ignore_errors=True)
            shutil.copytree(base, work / "killed")
            trials.append(kill_trial(work / "killed", work, rng, 3 if args.tiny else 8))
            print(f"  kill trial {k}: {json.dumps(trials[-1])[:200]}", flush=True)
        shutil.copytree(base, work / "bad")
        bad = bad_inputs(work / "bad", work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    totals = {
        "answers_after_substitution": substitution["answers_after"],
        "answers_from_an_unverified_checkpoint": substitution["from_the_unverified_checkpoint"],
        "kill_trials": len(trials),
        "deletions_acknowledged": sum(t["acknowledged"] for t in trials),
        "acknowledged_deletions_lost": sum(t["lost"] for t in trials),
        "audits_failed": sum(not t["audit_ok"] for t in trials),
        "derived_left": sum(bool(t["derived"]) for t in trials),
        "bad_inputs_tried": bad["tried"],
        "bad_inputs_answered_200": len(bad["answered_200"]),
        "error_bodies_quoting_the_request": len(bad["quoted"]),
    }
    payload: dict[str, Any] = {"meta": {"command": "python -m benchmarks.service_faults "
                                   + " ".join(sys.argv[1:] if argv is None else argv),
                        "machine": machine(), "seconds": round(time.perf_counter() - started, 1)},
               "totals": totals, "substitution": substitution, "kill_trials": trials, "bad_inputs": bad}
    write_json(args.out / "service_faults.json", payload)
    for name, value in totals.items():
        print(f"{name}: {value}")
    print(f"wrote {args.out / 'service_faults.json'} ({time.perf_counter() - started:.1f} s)")


if __name__ == "__main__":
    main()
