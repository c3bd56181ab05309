"""A service under test: clients predicting on threads while deletions are acknowledged one by
one, each answer and deletion recorded as `sisa.service.staleness.check` reads them (shared by the
tests that serve on Ray, in this process or in a fresh one)."""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from typing import Any

import httpx


def delete_while_predicting(url: str, auth: dict[str, str], victims: Sequence[str],
                            inputs: list[list[float]], clients: int = 2, gap: float = 0.3,
                            settle: float = 0.5, timeout: float = 120) -> dict[str, Any]:
    """`clients` threads predicting `inputs` at `url` while each of `victims` is deleted in turn
    (`gap` seconds apart), until each is applied (or `timeout` passed), then `settle` seconds more.
    Returns the answers as [sent, shards], the deletions as [acknowledged, shards, receipt or
    None], the error bodies, and the seconds from the last acknowledgement to the last applied."""
    out: dict[str, Any] = {"answers": [], "errors": [], "deletions": []}
    stop = threading.Event()

    def predicting() -> None:
        with httpx.Client(base_url=url, timeout=60) as own:
            while not stop.is_set():
                sent = time.monotonic()
                r = own.post("/v1/predict", json={"inputs": inputs})
                if r.status_code != 200:
                    out["errors"].append(r.text)
                else:
                    out["answers"].append([sent, r.json()["model"]["shards"]])

    threads = [threading.Thread(target=predicting) for _ in range(clients)]
    for t in threads:
        t.start()
    try:
        with httpx.Client(base_url=url, timeout=60) as client:
            acks = []
            for victim in victims:
                r = client.post("/v1/deletions", json={"ids": [victim]}, headers=auth)
                assert r.status_code == 202, r.text
                acks.append((time.monotonic(), r.json()))
                time.sleep(gap)
            begun = time.monotonic()
            for at, body in acks:
                deadline = time.monotonic() + timeout
                while True:
                    state = client.get("/v1/deletions/" + body["request_id"], headers=auth).json()
                    if state["status"] == "applied" or time.monotonic() > deadline:
                        break
                    time.sleep(0.1)
                out["deletions"].append([at, body["shards"], state.get("receipt")])
            out["applied_seconds"] = time.monotonic() - begun
        time.sleep(settle)
    finally:
        stop.set()
        for t in threads:
            t.join()
    return out
