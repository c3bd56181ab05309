"""The head backend's text encoding: each text alone (the definition) against `encode` (equal-length
texts batched), on Rotten Tomatoes snippets with the packaged all-MiniLM-L6-v2, in one process.

    python -m benchmarks.encoding --out DIR [--texts 2000] [--repeats 2]

Reports texts per second of both, their ratio (alternating runs, the best of each), and how many
embeddings differ bit for bit (the goal: none). Writes DIR/encoding.json.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import machine, write_json
from sisa import HeadConfig
from sisa.builtin import load_builtin
from sisa.training.encoder import BATCH, TextEncoder


def run(out: Path, count: int, repeats: int) -> dict[str, Any]:
    rows, _ = load_builtin("builtin:rotten_tomatoes:all")
    texts = [r["text"] for r in rows[:count]]
    encoder = TextEncoder(HeadConfig())
    encoder.tokens(texts[:2])  # loads the model: not timed
    alone_s, batched_s = [], []
    alone = batched = np.zeros(0)
    for _ in range(repeats):
        started = time.perf_counter()
        alone = encoder.encode_alone(texts)
        alone_s.append(time.perf_counter() - started)
        started = time.perf_counter()
        batched = encoder.encode(texts)
        batched_s.append(time.perf_counter() - started)
    differ = int(sum(not np.array_equal(a, b) for a, b in zip(alone, batched, strict=True)))
    result = {"machine": machine(), "texts": len(texts), "batch": BATCH, "threads": encoder.threads,
              "alone_texts_per_s": round(len(texts) / min(alone_s), 1),
              "batched_texts_per_s": round(len(texts) / min(batched_s), 1),
              "speedup": round(min(alone_s) / min(batched_s), 2), "embeddings_differing": differ,
              "alone_seconds": [round(s, 2) for s in alone_s],
              "batched_seconds": [round(s, 2) for s in batched_s]}
    write_json(out / "encoding.json", result)
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--texts", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args(argv)
    r = run(args.out, args.texts, args.repeats)
    print(f"{r['texts']} texts: alone {r['alone_texts_per_s']}/s, batched {r['batched_texts_per_s']}/s "
          f"= {r['speedup']}x; embeddings differing bit for bit: {r['embeddings_differing']}")


if __name__ == "__main__":
    main()
