"""The head backend's batched encoding is bit-identical to encoding each text alone, whatever its
batch companions: proven on this machine by comparing every text encoded alone with the same text
inside many different batches (shuffled, subsets, duplicates, different companions)."""

from __future__ import annotations

import numpy as np
import pytest

from sisa import HeadConfig
from sisa.builtin import load_builtin
from sisa.training.encoder import TextEncoder


def batched(encoder: TextEncoder, texts: list[str]) -> int:
    """How many texts `encode` runs together with others (texts of the same token count)."""
    lengths: dict[int, int] = {}
    for ids in encoder.tokens(texts)["input_ids"]:
        lengths[len(ids)] = lengths.get(len(ids), 0) + 1
    return sum(n for n in lengths.values() if n > 1)


def assert_batch_invariant(encoder: TextEncoder, texts: list[str], rounds: int) -> None:
    alone = encoder.encode_alone(texts)
    rng = np.random.default_rng(0)
    for r in range(rounds):
        order = rng.permutation(len(texts))
        # Different subsets each round: a text meets other companions, at other places in a batch.
        picked = order[: len(texts) - r * (len(texts) // (2 * rounds))]
        picked = np.concatenate([picked, picked[:3]])  # duplicates too
        got = encoder.encode([texts[i] for i in picked])
        different = [int(i) for i, v in zip(picked, got, strict=True) if not np.array_equal(v, alone[i])]
        assert not different, f"round {r}: texts {different[:10]} differ from their encoding alone"


def test_batched_encoding_equals_each_text_alone_on_a_tiny_model(tiny_model):
    encoder = TextEncoder(HeadConfig(model=tiny_model, max_length=32))
    words = ["good", "bad", "film", "plot", "actor", "scene", "great", "dull"]
    rng = np.random.default_rng(1)
    # Four lengths with many texts each (full batches, a short last one) and a few stragglers.
    texts = list(dict.fromkeys(" ".join(rng.choice(words, size=n)) for n in [3] * 90 + [5] * 70
                               + [7] * 20 + [9] * 12 + [2, 4, 11]))
    assert batched(encoder, texts) >= 100 and max(len(t.split()) for t in texts) >= 9  # batches of many sizes
    assert_batch_invariant(encoder, texts, rounds=6)


@pytest.mark.timeout(600)
def test_batched_encoding_equals_each_text_alone_with_the_default_model():
    """The packaged all-MiniLM-L6-v2 on Rotten Tomatoes snippets: real lengths, real kernels."""
    rows, _ = load_builtin("builtin:rotten_tomatoes")
    texts = [r["text"] for r in rows[:300]]
    encoder = TextEncoder(HeadConfig())
    assert batched(encoder, texts) >= 250
    assert_batch_invariant(encoder, texts, rounds=2)
