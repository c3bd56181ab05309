"""Generation decoded side by side: every prompt's tokens are those `decode` gives it alone, greedy
or sampled, in any company; a prompt alone runs `decode`'s own passes; the service decodes
concurrent requests together on one thread, each caller getting its own answer or its own error,
scoring beside it untouched, and no answer from shards a deletion reached meanwhile."""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from fastapi.testclient import TestClient

from sisa import CausalLMConfig, PartitionConfig, Sisa, SisaConfig
from sisa.errors import ConfigError
from sisa.service import Service, ServiceConfig, create_app
from sisa.service.batching import GenerationBatcher
from sisa.service.model import Unavailable
from sisa.serving import generation
from sisa.serving.generation import SLOTS, Batch, DecodeRequest, decode, decode_batch, decode_requests

from .conftest import CHAT_SPEC, make_chat_rows

COMBINES = ["mean", "product", "merged"]
TOKEN = "t" * 32


def lm_config(model: str, top_k: int = 0) -> SisaConfig:
    return SisaConfig(partition=PartitionConfig(shards=3, slices=2, seed=3),
                      training=CausalLMConfig(model=model, epochs_per_slice=1, batch_size=4,
                                              learning_rate=1e-2, max_length=48, top_k_layers=top_k))


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory, tiny_lm: str) -> Path:
    root = tmp_path_factory.mktemp("batched") / "lm"
    Sisa.train(root, make_chat_rows(), lm_config(tiny_lm), CHAT_SPEC).close()
    return root


@pytest.fixture(scope="module")
def scorer(store: Path) -> Iterator[Any]:
    with Sisa.open(store, recover=False, read_only=True) as sisa:
        yield sisa.language_model()


def prompts(n: int, seed: int = 0) -> list[list[int]]:
    """Token ids of the tiny model's printable characters, 1 to 23 of them: every length differs
    from its neighbours', so no two prompts in a step line up."""
    rng = random.Random(seed)
    return [[rng.randrange(4, 99) for _ in range(1 + (7 * i) % 23)] for i in range(n)]


def run(batch: Batch) -> dict[Any, Any]:
    out: dict[Any, Any] = {}
    while batch.busy:
        out.update(batch.step())
    return out


@pytest.mark.parametrize("combine", COMBINES)
def test_each_prompt_decodes_as_it_does_alone(scorer: Any, combine: Any) -> None:
    asked = prompts(2 * SLOTS + 3)  # more than the slots: prompts join as others finish
    lengths = [5 + (3 * i) % 11 for i in range(len(asked))]
    together = decode_batch(scorer, asked, lengths, combine)
    alone = [decode(scorer, p, n, combine) for p, n in zip(asked, lengths, strict=True)]
    assert together == alone
    assert [len(t) for t in together] == lengths  # no stop token in the way: all ran to the end


@pytest.mark.parametrize("combine", COMBINES)
def test_prompts_stopping_early_leave_the_others_as_they_were(scorer: Any, combine: Any) -> None:
    asked = prompts(SLOTS, seed=1)
    full = [decode(scorer, p, 12, combine) for p in asked]
    # The first stops at a stop token (its 4th token, as it would come alone), the second by its
    # stopping rule after 2 tokens, the third at once; the last runs its 12.
    rules: list[Callable[[list[int]], bool] | None] = [None, lambda new: len(new) >= 2, None, None]
    stops = [(full[0][3],), (), (full[2][0],), ()]
    requests = [DecodeRequest(p, 12, stop=s, should_stop=r)
                for p, s, r in zip(asked, stops, rules, strict=True)]
    together = decode_requests(scorer, requests, combine)
    assert together == [full[0][:full[0].index(full[0][3])], full[1][:2], [], full[3]]
    assert together == [decode_requests(scorer, [r], combine)[0] for r in requests]


@pytest.mark.parametrize("combine", COMBINES)
def test_seeded_sampling_does_not_depend_on_the_company(scorer: Any, combine: Any) -> None:
    asked = prompts(SLOTS + 2, seed=2)
    seeds = list(range(10, 10 + len(asked)))
    together = decode_batch(scorer, asked, 10, combine, temperature=1.0, seeds=seeds)
    alone = [decode(scorer, p, 10, combine, temperature=1.0, seed=s)
             for p, s in zip(asked, seeds, strict=True)]
    assert together == alone
    reseeded = decode_batch(scorer, asked, 10, combine, temperature=1.0, seeds=[s + 1 for s in seeds])
    assert reseeded != together  # the seed matters, the company does not
    # Greedy and sampled prompts side by side: each as it is alone.
    mixed = decode_batch(scorer, asked, 10, combine, temperature=[0.0, 1.0] * (len(asked) // 2),
                         seeds=seeds)
    assert mixed[1::2] == together[1::2] and mixed[0] == decode(scorer, asked[0], 10, combine)


def test_decode_batch_refuses_mismatched_arguments(scorer: Any) -> None:
    with pytest.raises(ConfigError, match="2 seeds for 3 prompts"):
        decode_batch(scorer, prompts(3), 4, seeds=[1, 2])
    with pytest.raises(ConfigError, match="at least one token"):
        decode_batch(scorer, [[5], []], 4)
    assert decode_batch(scorer, prompts(2), 0) == [[], []]


@pytest.mark.parametrize("combine", ["mean", "merged"])
def test_a_prompt_alone_runs_the_passes_decode_runs(scorer: Any, combine: Any,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    rows: list[int] = []
    forward = type(scorer).forward

    def counting(self: Any, input_ids: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        rows.append(input_ids.shape[0])
        return forward(self, input_ids, *args, **kwargs)

    monkeypatch.setattr(type(scorer), "forward", counting)
    asked = prompts(3, seed=5)[2]
    alone = decode(scorer, asked, 7, combine)
    passes, rows[:] = list(rows), []
    batch = Batch(scorer, combine)
    batch.add(DecodeRequest(asked, 7), "only")
    assert run(batch) == {"only": alone}
    assert rows == passes  # the very passes: one row (merged) or one per shard, a pass a token
    assert batch.shared_steps == 0 and batch.solo_steps == len(passes)
    assert set(rows) == {1 if combine == "merged" else len(scorer.names)}


@pytest.mark.parametrize("combine", COMBINES)
def test_a_lone_prompt_joined_midway_keeps_its_tokens(scorer: Any, combine: Any) -> None:
    first, *others = prompts(4, seed=6)
    batch = Batch(scorer, combine)
    batch.add(DecodeRequest(first, 12, temperature=0.7, seed=4), "first")
    out: dict[Any, Any] = dict(batch.step() + batch.step() + batch.step())  # alone: three tokens
    assert batch.solo is not None and batch.shared_steps == 0
    for i, p in enumerate(others):
        batch.add(DecodeRequest(p, 9), i)
    out.update(run(batch))
    assert batch.shared_steps > 0 and batch.fullest == 4
    alone: dict[Any, list[int]] = {i: decode(scorer, p, 9, combine) for i, p in enumerate(others)}
    alone["first"] = decode(scorer, first, 12, combine, temperature=0.7, seed=4)
    assert out == alone


def test_a_prompt_unsure_in_its_prefill_is_decoded_alone(scorer: Any,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    asked = prompts(3, seed=7)
    alone = [decode(scorer, p, 6, "mean") for p in asked]
    monkeypatch.setattr(generation, "MARGIN", float("inf"))  # no shared pass is sure
    batch = Batch(scorer, "mean")
    for i, p in enumerate(asked):
        batch.add(DecodeRequest(p, 6), i)
    assert run(batch) == dict(enumerate(alone))
    # Three prefills in company (each unsure), then three decodings alone, never in company again.
    assert batch.shared_steps == 0
    assert batch.solo_steps == 3 + sum(len(a) for a in alone)


@pytest.mark.parametrize("combine", COMBINES)
def test_a_prompt_unsure_in_a_shared_step_is_decoded_again_then_rejoins(
        scorer: Any, combine: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    asked = prompts(3, seed=8)
    alone = [decode(scorer, p, 9, combine) for p in asked]
    pick = generation.Slots._pick
    ties: list[int] = []

    def tie(self: Any, slot: Any, logits: torch.Tensor) -> bool:  # a near tie at prompt 0's 3rd token
        if slot.tag == 0 and len(slot.new) == 2:
            ties.append(int(slot.rejoined))
            slot.unsure = True
            return True
        return pick(self, slot, logits)

    monkeypatch.setattr(generation.Slots, "_pick", tie)
    batch = Batch(scorer, combine)
    for i, p in enumerate(asked):
        batch.add(DecodeRequest(p, 9), i)
    assert run(batch) == dict(enumerate(alone))
    # Decoded again alone up to its third token (a prefill and two more), then in company again:
    # past its tie, so the tie is never met in a shared step again.
    assert ties == [0]
    assert batch.solo_steps == 3 + 3 and batch.fullest == 3


def test_a_prompt_unsure_twice_stays_alone(scorer: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    asked = prompts(3, seed=9)
    alone = [decode(scorer, p, 9, "mean") for p in asked]
    pick = generation.Slots._pick

    def ties(self: Any, slot: Any, logits: torch.Tensor) -> bool:  # prompt 0: a tie at 2, then 4
        if slot.tag == 0 and len(slot.new) in (2, 4):
            slot.unsure = True
            return True
        return pick(self, slot, logits)

    monkeypatch.setattr(generation.Slots, "_pick", ties)
    batch = Batch(scorer, "mean")
    for i, p in enumerate(asked):
        batch.add(DecodeRequest(p, 9), i)
    assert run(batch) == dict(enumerate(alone))
    # Two lone decodings of prompt 0: to its 3rd token, then (unsure again) all of it.
    assert batch.solo_steps == 3 + 3 + len(alone[0])


@pytest.fixture(scope="module")
def top_scorer(tmp_path_factory: pytest.TempPathFactory, tiny_lm: str) -> Iterator[Any]:
    """Adapters on the top layer only: the layer below computes the same for every shard."""
    root = tmp_path_factory.mktemp("batched-top") / "lm"
    Sisa.train(root, make_chat_rows(), lm_config(tiny_lm, top_k=1), CHAT_SPEC).close()
    with Sisa.open(root, recover=False, read_only=True) as sisa:
        yield sisa.language_model()


@pytest.mark.parametrize("combine", COMBINES)
def test_the_layers_below_the_adapters_run_once_per_prompt(top_scorer: Any, combine: Any) -> None:
    scorer = top_scorer
    assert scorer.split == 1 and len(scorer.names) == 3
    asked = prompts(SLOTS + 3, seed=10)[1:]  # (a prompt of one token would pass for a step)
    lengths = [4 + (5 * i) % 9 for i in range(len(asked))]
    alone = [decode(scorer, p, n, combine) for p, n in zip(asked, lengths, strict=True)]
    rows: list[tuple[int, int]] = []
    bottom = scorer.model.get_base_model().model.layers[0]
    hook = bottom.register_forward_hook(lambda _m, args, _out: rows.append(tuple(args[0].shape[:2])))
    try:
        together = decode_batch(scorer, asked, lengths, combine)
    finally:
        hook.remove()
    assert together == alone
    # Each prompt entering the company runs its prompt through the bottom layer once; a shared
    # step runs a row per slot there (not one per shard and slot).
    prefills = [r for r in rows if r[1] > 1]
    assert prefills[:SLOTS] == [(1, len(p)) for p in asked[:SLOTS]]
    steps = {r[0] for r in rows if r[1] == 1}
    assert SLOTS in steps and SLOTS * len(scorer.names) not in steps
    assert len(scorer.model.get_base_model().model.layers) == 2  # the views changed nothing


# -- the service's shared decoding ------------------------------------------------------------------


def hold(batcher: GenerationBatcher, scorer: Any) -> tuple[threading.Event, threading.Thread]:
    """Keep the decoding thread busy until the event is set (a prompt whose stopping rule waits
    for it), so requests sent meanwhile are taken up together."""
    gate, started = threading.Event(), threading.Event()

    def wait(_new: list[int]) -> bool:
        started.set()
        return gate.wait(60)

    blocker = threading.Thread(target=batcher.decode,
                               args=(scorer, [DecodeRequest([5, 6], 2, should_stop=wait)], "mean"))
    blocker.start()
    assert started.wait(60)
    return gate, blocker


def until(condition: Callable[[], bool], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_an_error_goes_to_its_caller_alone(scorer: Any) -> None:
    batcher = GenerationBatcher()
    try:
        gate, blocker = hold(batcher, scorer)
        results: dict[str, Any] = {}

        def ask(name: str, request: DecodeRequest) -> None:
            try:
                results[name] = batcher.decode(scorer, [request], "mean")
            except Exception as exc:
                results[name] = exc

        def broken(new: list[int]) -> bool:  # fails in a step shared with the others
            if len(new) >= 2:
                raise RuntimeError("this caller's stopping rule fails")
            return False

        asked = prompts(3, seed=4)
        calls = [threading.Thread(target=ask, args=args) for args in (
            ("broken", DecodeRequest(asked[0], 6, should_stop=broken)),
            ("empty", DecodeRequest([], 6)),
            ("fine", DecodeRequest(asked[1], 6)),
            ("also fine", DecodeRequest(asked[2], 6)))]
        for call in calls:
            call.start()
        until(lambda: batcher.pending == 4)
        gate.set()
        for thread in [blocker, *calls]:
            thread.join(60)
        assert isinstance(results["broken"], RuntimeError)
        assert isinstance(results["empty"], ConfigError)
        assert results["fine"] == [decode(scorer, asked[1], 6)]
        assert results["also fine"] == [decode(scorer, asked[2], 6)]
        assert batcher.fullest >= 3  # they ran side by side
        # It goes on serving; alone, a prompt decodes alone.
        steps = batcher.steps
        assert batcher.decode(scorer, [DecodeRequest(asked[0], 3)], "mean") == [decode(scorer, asked[0], 3)]
        assert batcher.steps == steps
    finally:
        batcher.close()
    assert not batcher.running


def test_close_fails_waiting_callers_and_leaves_no_thread(scorer: Any) -> None:
    batcher = GenerationBatcher()
    gate, blocker = hold(batcher, scorer)
    failed: list[BaseException] = []

    def ask() -> None:
        try:
            batcher.decode(scorer, [DecodeRequest([7, 8, 9], 4)], "mean")
        except Unavailable as exc:
            failed.append(exc)

    waiting = threading.Thread(target=ask)
    waiting.start()
    until(lambda: batcher.pending == 1)
    closing = threading.Thread(target=batcher.close)
    closing.start()
    gate.set()
    for thread in (closing, waiting, blocker):
        thread.join(60)
    assert len(failed) == 1 and "shutting down" in str(failed[0])
    assert not batcher.running
    assert not [t for t in threading.enumerate() if t.name == "sisa-generate"]
    with pytest.raises(Unavailable):
        batcher.decode(scorer, [DecodeRequest([7], 2)], "mean")


def test_the_service_decodes_concurrent_requests_together(store: Path) -> None:
    texts = ["hi ok", "sure", "tea cat sun", "go", "yes no fun hi"]
    with Sisa.open(store, recover=False, read_only=True) as sisa:
        expected = {t: sisa.generate([t], max_new_tokens=8)[0] for t in texts}
        pair = sisa.generate(texts[:2], max_new_tokens=8, temperature=1.0, seed=3, stop=["o"])
    service = Service(store, ServiceConfig(token=TOKEN, deletions=False), worker=False).start()
    try:
        client = TestClient(create_app(service))
        # Alone: no shared step.
        body = client.post("/v1/generate", json={"prompts": [texts[0]], "max_new_tokens": 8}).json()
        assert body["generations"][0]["text"] == expected[texts[0]].text
        assert service.generations.steps == 0 and service.generations.solo_steps > 0
        gate, blocker = hold(service.generations, service.model.refresh().scorer)
        answers: dict[str, Any] = {}

        def ask(text: str) -> None:
            answers[text] = client.post("/v1/generate", json={"prompts": [text], "max_new_tokens": 8})

        def ask_two() -> None:  # one request of two prompts, sampled, with a stop string
            answers["pair"] = client.post("/v1/generate", json={
                "prompts": texts[:2], "max_new_tokens": 8, "temperature": 1.0, "seed": 3,
                "stop": ["o"]})

        calls = [threading.Thread(target=ask, args=(t,)) for t in texts] + [threading.Thread(target=ask_two)]
        for call in calls:
            call.start()
        until(lambda: service.generations.pending == len(texts) + 2)
        steps = service.generations.steps
        gate.set()
        for thread in [blocker, *calls]:
            thread.join(60)
        for text in texts:
            body = answers[text].json()
            assert answers[text].status_code == 200, body
            assert body["generations"][0]["text"] == expected[text].text
            assert body["generations"][0]["tokens"] == expected[text].tokens
            assert body["model"]["version"] == expected[text].model_version
        assert [g["text"] for g in answers["pair"].json()["generations"]] == [g.text for g in pair]
        # Every slot filled, and the steps shared: 7 prompts of at most 8 tokens (the first from
        # the prefill) take two rounds of at most 7 steps, where one at a time would take 7 each.
        assert service.generations.fullest == SLOTS
        assert 0 < service.generations.steps - steps <= 2 * 7
    finally:
        service.close()
    assert not service.generations.running


def test_scoring_beside_generation_changes_neither(store: Path) -> None:
    """Scores and generations at once, on the one model: each answer is its answer alone (the
    scorer's lock keeps one pass's adapters out of another's)."""
    texts = ["hi ok", "tea cat sun", "yes no fun hi", "go"]
    service = Service(store, ServiceConfig(token=TOKEN, deletions=False), worker=False).start()
    try:
        client = TestClient(create_app(service))

        def generate(text: str, combine: str) -> Any:
            return client.post("/v1/generate", json={"prompts": [text], "max_new_tokens": 8,
                                                     "combine": combine}).json()["generations"]

        def score(text: str, combine: str) -> Any:
            return client.post("/v1/score", json={"texts": [text, text + " sure"], "prompts": ["hi", "ok"],
                                                  "combine": combine}).json()["records"]

        calls = [(f, t, c) for t in texts for c in ("mean", "merged") for f in (generate, score)]
        alone = {(f.__name__, t, c): f(t, c) for f, t, c in calls}
        got: dict[Any, list[Any]] = {key: [] for key in alone}

        def ask(f: Callable[[str, str], Any], text: str, combine: str) -> None:
            for _ in range(3):
                got[(f.__name__, text, combine)].append(f(text, combine))

        threads = [threading.Thread(target=ask, args=call) for call in calls]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(120)
        assert service.generations.steps > 0  # some generation shared its steps meanwhile
        for key, answer in alone.items():
            assert got[key] == [answer] * 3, key
    finally:
        service.close()


def test_no_answer_from_a_shard_a_deletion_reached_while_batched(tmp_path: Path, tiny_lm: str) -> None:
    """Requests decoding together when a deletion is acknowledged: each is computed again from
    the shards still servable, as a request alone would be."""
    root = tmp_path / "lm"
    Sisa.train(root, make_chat_rows(), lm_config(tiny_lm), CHAT_SPEC).close()
    texts = ["hi ok", "sure", "tea cat sun", "go"]
    service = Service(root, ServiceConfig(token=TOKEN), worker=False).start()
    try:
        client = TestClient(create_app(service))
        before = client.post("/v1/generate", json={"prompts": [texts[0]], "max_new_tokens": 8}).json()
        gate, blocker = hold(service.generations, service.model.refresh().scorer)
        answers: dict[str, Any] = {}

        def ask(text: str) -> None:
            answers[text] = client.post("/v1/generate", json={"prompts": [text], "max_new_tokens": 8}).json()

        calls = [threading.Thread(target=ask, args=(t,)) for t in texts]
        for call in calls:
            call.start()
        until(lambda: service.generations.pending == len(texts))  # bound to every shard
        request = service.acknowledge(None, "u3")
        assert request.shards
        gate.set()
        for thread in [blocker, *calls]:
            thread.join(60)
        with Sisa.open(root, recover=False, read_only=True) as fresh:  # the pending shards sit out
            expected = {t: fresh.generate([t], max_new_tokens=8)[0] for t in texts}
        for text in texts:
            model = answers[text]["model"]
            assert not set(model["shards"]) & {str(s) for s in request.shards}
            assert model["excluded_shards"] == request.shards
            assert model["version"] == expected[text].model_version != before["model"]["version"]
            assert answers[text]["generations"][0]["text"] == expected[text].text
        assert service.generations.steps > 0
    finally:
        service.close()
