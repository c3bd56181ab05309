"""Generation under concurrent load: tokens per second of `/v1/generate` from one client, then from
four at once, against `sisa serve` as a fresh process (its continuous batching decodes concurrent
requests side by side); every answer is checked against `Sisa.generate` of its prompt alone, which
it must equal. Also a lone request's latency against the unbatched path: `Sisa.generate` in this
process, and (with --baseline-src) a server run from another source tree, one without batching.

    python -m benchmarks.generation_load --out DIR                    # SmolLM2-135M on chitchat
    python -m benchmarks.generation_load --tiny --model DIR --out D   # seconds: checks the script
    ... --baseline-src /tmp/main-before                               # + the unbatched server

The store: SmolLM2-135M-Instruct with top-2-layer adapters, S=4, trained on a few hundred chitchat
turns. Each client sends its prompts one request at a time (greedy), the next as soon as the last
is answered. Writes generation_load.json and prints a markdown table.
"""

from __future__ import annotations

import dataclasses
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx

from benchmarks.common import lm_benchmark_main, machine, write_json
from sisa import CausalLMConfig, PartitionConfig, Sisa, SisaConfig
from sisa.api import resolve_source
from sisa.builtin import stable_subset
from sisa.config import Combine
from sisa.testing import free_port

TOKEN = "generation-load-token-0123456789ab"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@dataclasses.dataclass(frozen=True)
class Setting:
    model: str
    records: int  # chitchat turns the store is trained on
    shards: int
    top_k_layers: int
    max_new_tokens: int  # per request
    requests: int  # per client and phase
    clients: tuple[int, ...]  # concurrent clients of each phase
    combines: tuple[Combine, ...]


FULL = Setting("SmolLM2-135M-Instruct", 240, 4, 2, 32, 6, (1, 4), ("mean", "merged"))
TINY = Setting("", 48, 2, 0, 8, 4, (1, 4), ("mean", "merged"))
# Openings of texts, which the store continues for all its tokens (a chat turn's few words would
# end within a few tokens, and time the prefill and the HTTP round trip rather than the decoding).
PROMPTS = ["Once upon a time, in a small village by the sea, there lived",
           "The three most important things to know about Python are",
           "My favourite recipe for pancakes starts with", "1, 2, 3, 4, 5,",
           "Here is a list of fruits: apple, banana,", "The history of the bicycle began",
           "To plant a tree, first you", "Dear diary, today I went to the market and"]


def build_store(s: Setting, root: Path) -> Path:
    rows, spec = resolve_source("builtin:chitchat", None)
    rows = stable_subset(rows, spec.id_column, s.records)
    training = CausalLMConfig(model=s.model, epochs_per_slice=1, batch_size=8, max_length=64,
                              top_k_layers=s.top_k_layers)
    config = SisaConfig(partition=PartitionConfig(shards=s.shards, slices=1, seed=0), training=training)
    Sisa.train(root / "store", rows, config, spec).close()
    return root / "store"


class Server:
    """`sisa serve` as a fresh process, from `src` (a source tree; default: this one's), on the
    store; ready once /readyz answers 200."""

    def __init__(self, store: Path, log: Path, src: Path | None = None, timeout: float = 600) -> None:
        self.url = f"http://127.0.0.1:{free_port()}"
        argv = [sys.executable, "-m", "sisa.cli", "serve", "--store", str(store), "--port",
                self.url.rsplit(":", 1)[1], "--log-level", "warning"]
        started = time.perf_counter()
        with open(log, "ab") as out:  # `-m` puts the working directory first on the path
            self.proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, cwd=src,
                                         env={**os.environ, "SISA_SERVE_TOKEN": TOKEN})
        with httpx.Client(base_url=self.url, timeout=10) as client:
            while True:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"sisa serve exited: {log.read_text()[-3000:]}")
                if time.perf_counter() - started > timeout:
                    self.stop()
                    raise RuntimeError(f"sisa serve did not start in {timeout:.0f} s")
                try:
                    if client.get("/readyz").status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                time.sleep(0.1)
        self.startup = time.perf_counter() - started

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def phase(url: str, clients: int, s: Setting, combine: Combine, expected: dict[str, str]) -> dict[str, Any]:
    """`clients` threads, each sending `s.requests` requests of one prompt, one after another."""
    latencies: list[float] = []
    tokens = [0]
    mismatches = [0]
    errors: list[str] = []
    lock = threading.Lock()

    def run(who: int) -> None:
        with httpx.Client(base_url=url, timeout=600, headers=AUTH) as client:
            for i in range(s.requests):
                prompt = PROMPTS[(who * s.requests + i) % len(PROMPTS)]
                started = time.perf_counter()
                answer = client.post("/v1/generate", json={
                    "prompts": [prompt], "combine": combine, "max_new_tokens": s.max_new_tokens})
                seconds = time.perf_counter() - started
                with lock:
                    if answer.status_code != 200:
                        errors.append(f"{answer.status_code}: {answer.text[:200]}")
                        continue
                    made = answer.json()["generations"][0]
                    latencies.append(seconds)
                    tokens[0] += made["tokens"]
                    mismatches[0] += made["text"] != expected[prompt]

    threads = [threading.Thread(target=run, args=(who,)) for who in range(clients)]
    started = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - started
    return {"combine": combine, "clients": clients, "requests": len(latencies), "tokens": tokens[0],
            "seconds": round(wall, 3), "tokens_per_second": round(tokens[0] / wall, 2),
            "p50_seconds": round(statistics.median(latencies), 4) if latencies else None,
            "mismatches": mismatches[0], "errors": errors}


def warm(url: str, combine: Combine) -> None:
    with httpx.Client(base_url=url, timeout=600, headers=AUTH) as client:
        client.post("/v1/generate", json={"prompts": ["warm up"], "combine": combine, "max_new_tokens": 2})


def lone(servers: dict[str, Server], s: Setting, combine: Combine,
         expected: dict[str, str]) -> dict[str, Any]:
    """One request at a time, to each server in turn (so both see the machine alike): the p50
    latency of each, and how many answers differ from `Sisa.generate`'s."""
    latencies: dict[str, list[float]] = {name: [] for name in servers}
    mismatches = 0
    clients = {name: httpx.Client(base_url=server.url, timeout=600, headers=AUTH)
               for name, server in servers.items()}
    try:
        for i in range(2 * s.requests):
            prompt = PROMPTS[i % len(PROMPTS)]
            for name, client in clients.items():
                started = time.perf_counter()
                answer = client.post("/v1/generate", json={
                    "prompts": [prompt], "combine": combine, "max_new_tokens": s.max_new_tokens})
                latencies[name].append(time.perf_counter() - started)
                mismatches += answer.status_code != 200 or \
                    answer.json()["generations"][0]["text"] != expected[prompt]
    finally:
        for client in clients.values():
            client.close()
    out: dict[str, Any] = {f"{name}_p50": round(statistics.median(t), 4) for name, t in latencies.items()}
    if "unbatched_p50" in out:
        out["batched_over_unbatched"] = round(out["batched_p50"] / out["unbatched_p50"], 3)
    return {**out, "requests": 2 * s.requests, "mismatches": mismatches}


def run(s: Setting, out: Path, work: Path, baseline: Path | None = None) -> dict[str, Any]:
    from sisa.training.shard_trainer import setup_process

    started = time.perf_counter()
    store = build_store(s, work)
    train_seconds = time.perf_counter() - started
    expected: dict[str, dict[str, str]] = {}
    alone: dict[str, float] = {}  # p50 seconds of one prompt by `Sisa.generate`, in this process
    with Sisa.open(store, recover=False, read_only=True) as sisa:  # the answers, one at a time
        setup_process(sisa.config.training.torch_threads, "cpu")  # as the server sets torch up
        for c in s.combines:
            sisa.generate(["warm up"], 2, combine=c)
            times, expected[c] = [], {}
            for p in PROMPTS:
                begun = time.perf_counter()
                expected[c][p] = sisa.generate([p], s.max_new_tokens, combine=c)[0].text
                times.append(time.perf_counter() - begun)
            alone[c] = statistics.median(times)
    phases: list[dict[str, Any]] = []
    alone_here: dict[str, dict[str, Any]] = {}
    servers = {"batched": Server(store, out / "serve.log")}
    try:
        if baseline is not None:  # the unbatched server, for lone requests only (one at a time)
            servers["unbatched"] = Server(store, out / "baseline-serve.log", src=baseline)
        for combine in s.combines:
            for server in servers.values():
                warm(server.url, combine)
            alone_here[combine] = lone(servers, s, combine, expected[combine])
            print({"combine": combine, "lone": alone_here[combine]}, flush=True)
            for clients in s.clients:
                phases.append(phase(servers["batched"].url, clients, s, combine, expected[combine]))
                print(phases[-1], flush=True)
    finally:
        for server in servers.values():
            server.stop()
    speedup = {}
    for combine in s.combines:
        rates = {p["clients"]: p["tokens_per_second"] for p in phases if p["combine"] == combine}
        one, most = rates.get(1), rates.get(max(s.clients))
        speedup[combine] = round(most / one, 3) if one and most else None
        alone_here[combine]["in_process_generate_p50"] = round(alone[combine], 4)
    result = {"setting": dataclasses.asdict(s), "machine": machine(),
              "train_seconds": round(train_seconds, 1), "phases": phases, "speedup": speedup,
              "lone": alone_here, "baseline_src": str(baseline) if baseline else None,
              "mismatches": sum(p["mismatches"] for p in [*phases, *alone_here.values()]),
              "errors": sum(len(p["errors"]) for p in phases)}
    write_json(out / "generation_load.json", result)
    return result


def summary(result: dict[str, Any]) -> str:
    s = result["setting"]
    lines = [f"Setting: {s['model']}, S={s['shards']}, top-{s['top_k_layers']} adapters, "
             f"{s['records']} chitchat turns; {s['max_new_tokens']} new tokens a request, "
             f"{s['requests']} requests per client. {result['machine']}.", "",
             "| combine | clients | tokens/s | p50 latency (s) | answers unlike alone | errors |",
             "| --- | --- | --- | --- | --- | --- |"]
    for p in result["phases"]:
        lines.append(f"| {p['combine']} | {p['clients']} | {p['tokens_per_second']} | "
                     f"{p['p50_seconds']} | {p['mismatches']} | {len(p['errors'])} |")
    lines += ["", "Tokens/s with the most clients over one client: " +
              ", ".join(f"{c} {r}x" for c, r in result["speedup"].items()), "",
              "Lone requests, one at a time to each server in turn:", "",
              "| combine | p50 (s): batched server | unbatched server | batched / unbatched | "
              "`Sisa.generate` in process |", "| --- | --- | --- | --- | --- |"]
    for c, one in result["lone"].items():
        lines.append(f"| {c} | {one['batched_p50']} | {one.get('unbatched_p50')} | "
                     f"{one.get('batched_over_unbatched')} | {one['in_process_generate_p50']} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    baseline = None
    if "--baseline-src" in sys.argv:  # ours; the rest of the command line is the LM benchmarks'
        at = sys.argv.index("--baseline-src")
        baseline = Path(sys.argv[at + 1]).resolve()
        del sys.argv[at:at + 2]
    lm_benchmark_main(__doc__, FULL, TINY,
                      lambda s, out, work: run(s, out, work, baseline),
                      summary, "sisa-generation-load-")


if __name__ == "__main__":
    main()
