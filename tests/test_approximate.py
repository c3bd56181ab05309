"""The approximate unlearning baselines (sisa.workflows.approximate) on a tiny random two-layer
Llama: each method raises the forget set's NLL, the retain term is used, OpenUnlearning's schedule
(warm-up, decay, accumulation), determinism, the store left byte for byte, sweeps and selection."""

from __future__ import annotations

import inspect
import json
import math
from typing import Any

import pytest
import torch

from sisa import Sisa
from sisa.errors import ConfigError
from sisa.testing import store_snapshot
from sisa.training.causal_lm import LMInputs, make_example
from sisa.workflows.approximate import (
    DEFAULT_GRID,
    HYPERPARAMETERS,
    METHODS,
    RETAIN_METHODS,
    SCHEDULE_DEFAULTS,
    Method,
    Unlearned,
    lr_schedule,
    scorer_for,
    select,
    sweep,
    unlearn,
)

from .conftest import CHAT_SPEC, make_chat_rows
from .test_causal_lm import lm_config

ROWS = make_chat_rows()
FORGET_USER = "u4"  # six records
RETAIN = [r["id"] for r in ROWS if r["user"] != FORGET_USER][:10]
# Small, fast runs: 6 forget records in batches of 2, one pass an optimizer step (3 steps an epoch).
FAST: dict[str, Any] = {"epochs": 10, "batch_size": 2, "accumulation": 1}
# Rates large enough to move a tiny random model in 30 steps. SimNPO's defaults (delta 0, beta
# 4.5) saturate its sigmoid on a random model whose token NLL is ~4.4 (OpenUnlearning tunes them on
# memorised TOFU answers); delta 5 puts the margin where the gradient lives.
LARGE: dict[str, dict[str, Any]] = {
    "gradient_ascent": {"learning_rate": 5e-2},
    "gradient_difference": {"learning_rate": 5e-2},
    "npo": {"learning_rate": 5e-2},
    "simnpo": {"learning_rate": 5e-2, "delta": 5.0, "gamma": 1.0},
    "rmu": {"learning_rate": 1e-1, "steering_coeff": 20.0},  # RMU's class default (WMDP's)
}


@pytest.fixture(scope="module")
def mono(tmp_path_factory, tiny_lm: str) -> Sisa:
    """A monolithic store (every layer adapted); unlearning never changes it, so tests share it."""
    root = tmp_path_factory.mktemp("mono")
    return Sisa.train(root / "m", ROWS, lm_config(tiny_lm, shards=1, slices=1), CHAT_SPEC)


@pytest.fixture(scope="module")
def mono_top(tmp_path_factory, tiny_lm: str) -> Sisa:
    """The same with top-k adaptation: only layer 1 has an adapter, layer 0's output is cached."""
    root = tmp_path_factory.mktemp("mono-top")
    return Sisa.train(root / "m", ROWS, lm_config(tiny_lm, top_k=1, shards=1, slices=1), CHAT_SPEC)


def forget_ids(sisa: Sisa) -> list[str]:
    return sisa.group_ids(FORGET_USER)


def nll(sisa: Sisa, adapter: dict[str, torch.Tensor], forget: bool) -> float:
    """Mean token NLL of the forget user's records (or of the others') under `adapter`."""
    scorer = scorer_for(sisa, adapter)
    inputs = LMInputs([make_example(scorer.tokenizer, r["text"], r["prompt"] or None, 48)
                       for r in ROWS if (r["user"] == FORGET_USER) == forget])
    logps = [s.logp[0] for s in scorer.scores(inputs)]
    return -sum(float(p.sum()) for p in logps) / sum(len(p) for p in logps)


def trained(sisa: Sisa) -> dict[str, torch.Tensor]:
    return sisa.live_adapters()[0]


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("method", METHODS)
def test_every_method_raises_the_forget_nll(mono: Sisa, method: Method) -> None:
    before = nll(mono, trained(mono), forget=True)
    result = unlearn(mono, forget_ids(mono), RETAIN, method, **FAST, **LARGE[method])
    assert nll(mono, result.adapter, forget=True) > before + 0.05, method


def test_a_retain_term_is_used_and_keeps_the_retain_set_closer_than_gradient_ascent(mono: Sisa) -> None:
    ids = forget_ids(mono)
    before = nll(mono, trained(mono), forget=False)
    ascent = unlearn(mono, ids, RETAIN, "gradient_ascent", **FAST, learning_rate=5e-2)
    difference = unlearn(mono, ids, RETAIN, "gradient_difference", **FAST, learning_rate=5e-2)
    shift = {r.method: abs(nll(mono, r.adapter, forget=False) - before) for r in (ascent, difference)}
    assert shift["gradient_difference"] < shift["gradient_ascent"] - 0.1, shift
    # Without its retain term gradient difference is gradient ascent, to the bit (the retain
    # draws come from their own generator and leave the forget order alone) ...
    alone = unlearn(mono, ids, RETAIN, "gradient_difference", **FAST, learning_rate=5e-2, alpha=0.0)
    assert same(alone.adapter, ascent.adapter)
    # ... and every method's retain term changes what it learns.
    for method in sorted(RETAIN_METHODS):
        settings = {**FAST, **LARGE[method], "epochs": 2}
        with_retain = unlearn(mono, ids, RETAIN, method, **settings)
        without = unlearn(mono, ids, RETAIN, method, **{**settings, "alpha": 0.0})
        assert not same(with_retain.adapter, without.adapter), method


def test_the_store_is_byte_identical_after_every_method(mono: Sisa) -> None:
    before = store_snapshot(mono.root)
    adapter = {k: v.clone() for k, v in trained(mono).items()}
    for method in METHODS:
        unlearn(mono, forget_ids(mono), RETAIN, method, epochs=1, batch_size=2, accumulation=1,
                learning_rate=5e-2)
    assert store_snapshot(mono.root) == before
    assert same(trained(mono), adapter)
    assert mono.audit().ok


@pytest.mark.parametrize("method", METHODS)
def test_a_seed_fixes_the_result(mono: Sisa, method: Method) -> None:
    settings = {**FAST, **LARGE[method], "epochs": 2}
    one = unlearn(mono, forget_ids(mono), RETAIN, method, **settings)
    two = unlearn(mono, forget_ids(mono), RETAIN, method, **settings)
    other = unlearn(mono, forget_ids(mono), RETAIN, method, **settings, seed=1)
    assert same(one.adapter, two.adapter) and one.learning_rates == two.learning_rates
    assert not same(one.adapter, other.adapter)


def test_the_rate_warms_up_from_zero_then_decays(mono: Sisa) -> None:
    ids = forget_ids(mono)
    # 3 steps an epoch, 2 epochs, 1 warm-up epoch: 0, lr/3, 2lr/3, then lr falling linearly.
    run = unlearn(mono, ids, RETAIN, "gradient_ascent", epochs=2, learning_rate=0.3, batch_size=2,
                  accumulation=1)
    assert run.steps == 6
    assert run.learning_rates == pytest.approx((0.0, 0.1, 0.2, 0.3, 0.2, 0.1))
    flat = unlearn(mono, ids, RETAIN, "gradient_ascent", epochs=2, learning_rate=0.3, batch_size=2,
                   accumulation=1, schedule="constant")
    assert flat.learning_rates == pytest.approx((0.0, 0.1, 0.2, 0.3, 0.3, 0.3))
    # The first step's rate is 0 (transformers' warm-up): the optimizer really used it.
    first = unlearn(mono, ids, RETAIN, "gradient_ascent", learning_rate=0.3, max_steps=1)
    assert first.learning_rates == (0.0,) and same(first.adapter, trained(mono))
    assert lr_schedule(4, 0, 1.0, "linear") == pytest.approx([1.0, 0.75, 0.5, 0.25])
    assert lr_schedule(3, 2, 1.0, "constant") == pytest.approx([0.0, 0.5, 1.0])


def test_the_run_reports_its_settings_steps_and_samples(mono: Sisa) -> None:
    ids = forget_ids(mono)
    # 6 records, batches of 2 accumulated in pairs: 3 passes, 2 steps an epoch (the second of one).
    runs = {m: unlearn(mono, ids, RETAIN, m, epochs=3, batch_size=2, accumulation=2, learning_rate=1e-3)
            for m in ("gradient_ascent", "gradient_difference", "npo", "rmu")}
    for run in runs.values():
        assert run.steps == 6 and run.forget_samples == 18 and run.seconds > 0
        assert run.epochs == 3 and run.learning_rate == 1e-3
    assert runs["gradient_ascent"].retain_samples == 0
    assert runs["gradient_difference"].retain_samples == 18
    assert runs["npo"].reference_samples == 6  # the forget set through the model once
    assert 0 < runs["rmu"].reference_samples <= len(RETAIN)  # the retain records drawn, once each
    npo = runs["npo"].hyperparameters
    assert npo == {**SCHEDULE_DEFAULTS, "epochs": 3, "batch_size": 2, "accumulation": 2,
                   "learning_rate": 1e-3, "beta": 0.1, "gamma": 1.0, "alpha": 1.0}
    assert runs["rmu"].hyperparameters["layer"] == 0  # every layer is adapted: the lowest
    summary = runs["npo"].summary()
    assert "adapter" not in summary and json.loads(json.dumps(summary))["steps"] == 6


def test_rmu_steers_the_lowest_adapted_layer_through_cached_activations(mono_top: Sisa) -> None:
    ids = forget_ids(mono_top)
    before, kept = nll(mono_top, trained(mono_top), forget=True), store_snapshot(mono_top.root)
    run = unlearn(mono_top, ids, RETAIN, "rmu", **FAST, **LARGE["rmu"])
    assert run.hyperparameters["layer"] == 1  # layer 0 runs once, frozen, from the cache
    assert nll(mono_top, run.adapter, forget=True) > before + 0.05
    assert store_snapshot(mono_top.root) == kept  # the cache was read, not written
    with pytest.raises(ConfigError, match=r"adapter changes \(1\.\.1.*layer=0"):
        unlearn(mono_top, ids, RETAIN, "rmu", layer=0)


def test_sweep_runs_each_point_from_the_trained_model(mono: Sisa) -> None:
    for method in METHODS:
        grid = DEFAULT_GRID[method]
        assert {"epochs": 10, "learning_rate": 1e-5} in grid  # OpenUnlearning's default point
        assert {p["learning_rate"] for p in grid} >= {1e-5, 5e-5, 1e-4, 5e-4}
        assert {p["epochs"] for p in grid} >= {2, 5, 10}
    ids = forget_ids(mono)
    points = [{"learning_rate": 5e-2}, {"learning_rate": 1e-2, "epochs": 1}]
    swept = sweep(mono, ids, RETAIN, "npo", points, epochs=2, batch_size=2, accumulation=1)
    alone = [unlearn(mono, ids, RETAIN, "npo", epochs=2, batch_size=2, accumulation=1, learning_rate=5e-2),
             unlearn(mono, ids, RETAIN, "npo", epochs=1, batch_size=2, accumulation=1, learning_rate=1e-2)]
    assert [s.hyperparameters for s in swept] == [a.hyperparameters for a in alone]
    assert all(same(s.adapter, a.adapter) for s, a in zip(swept, alone, strict=True))
    with pytest.raises(ConfigError, match="learning_rate"):  # every point checked before any runs
        sweep(mono, ids, RETAIN, "npo", [{"learning_rate": 1e-3}, {"learning_rate": -1.0}])


def test_select_picks_the_most_forgetting_point_under_the_gate() -> None:
    points = [
        {"name": "gentle", "perplexity": 10.1, "forgetting": 0.5},
        {"name": "strong", "perplexity": 10.4, "forgetting": 2.0},
        {"name": "broken", "perplexity": 30.0, "forgetting": 9.0},  # forgets most, fails the gate
        {"name": "unmeasured", "perplexity": math.nan, "forgetting": 5.0},
        {"name": "tie", "perplexity": 10.2, "forgetting": 2.0},  # ties with strong, lower perplexity
    ]
    assert select(points, utility=10.0, gate=1.05)["name"] == "tie"  # type: ignore[index]
    assert select(points[:2], utility=10.0, gate=1.05)["name"] == "strong"  # type: ignore[index]
    assert select(points[:2], utility=10.0, gate=1.02)["name"] == "gentle"  # type: ignore[index]
    assert select(points, utility=9.0, gate=1.05) is None  # none within 9.45
    assert select([], utility=10.0) is None
    # Figures by function (lower exposure forgets more) or by attribute.
    nested: list[dict[str, Any]] = [{"ppl": {"holdout": 10.0}, "exposure": 3.0},
                                    {"ppl": {"holdout": 10.3}, "exposure": 1.0}]
    assert select(nested, 10.0, perplexity=lambda p: p["ppl"]["holdout"],
                  forgetting=lambda p: -p["exposure"]) is nested[1]
    run = Unlearned("npo", {}, 1, 1, 1, 0, 0.1, (0.0,), {})
    assert select([run], 10.0, perplexity=lambda _: 10.0, forgetting="steps") is run
    for utility, gate in ((0.0, 1.05), (10.0, math.inf), (math.nan, 1.05)):
        with pytest.raises(ConfigError):
            select(points, utility, gate)


def test_bad_settings_are_config_errors_that_name_them(mono: Sisa) -> None:
    ids = forget_ids(mono)
    with pytest.raises(ConfigError, match=r"method must be one of.*'gradient_ascent'.*'rmu'.*'ga'"):
        unlearn(mono, ids, RETAIN, "ga")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="method must be one of"):
        sweep(mono, ids, RETAIN, "ga")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="gradient_ascent takes no 'beta'"):
        unlearn(mono, ids, RETAIN, "gradient_ascent", beta=0.1)
    with pytest.raises(ConfigError, match=r"epochs must be .* got 0.*learning_rate .* got -1"):
        unlearn(mono, ids, RETAIN, "npo", epochs=0, learning_rate=-1.0)
    with pytest.raises(ConfigError, match="schedule must be one of"):
        unlearn(mono, ids, RETAIN, "npo", schedule="cosine")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="nothing to unlearn"):
        unlearn(mono, ["no-such-id"], RETAIN, "gradient_ascent")
    with pytest.raises(ConfigError, match="retain term"):
        unlearn(mono, ids, [], "npo")
    # unlearn's defaults are the documented ones, and the methods' are OpenUnlearning's.
    params = inspect.signature(unlearn).parameters
    assert {k: params[k].default for k in SCHEDULE_DEFAULTS} == SCHEDULE_DEFAULTS
    assert HYPERPARAMETERS["npo"]["beta"] == 0.1 and HYPERPARAMETERS["simnpo"]["beta"] == 4.5

