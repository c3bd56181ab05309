"""The statistics a reviewer of an unlearning claim asks for (sisa.evidence): bootstrap intervals
of a mean, an AUC and a difference of AUCs, PrivLeak, the TOST equivalence test with its power and
sample size, calibrated exposure and the reference attack; and the gradient-norm attack
(sisa.workflows.attacks) on a tiny random two-layer Llama store."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from sisa import Sisa
from sisa import evidence as ev
from sisa.errors import ConfigError
from sisa.workflows.approximate import monolith_model
from sisa.workflows.attacks import gradient_norm_scores, gradient_norms

from .conftest import CHAT_SPEC, make_chat_rows
from .test_causal_lm import lm_config


def normal(mean: float, sd: float, size: int, seed: int) -> list[float]:
    return list(np.random.default_rng(seed).normal(mean, sd, size))


# -- bootstrap intervals -----------------------------------------------------------------------


def test_bootstrap_ci_covers_the_mean_shrinks_with_data_and_repeats_per_seed() -> None:
    small, large = normal(3.0, 1.0, 30, 1), normal(3.0, 1.0, 3000, 2)
    low, high = ev.bootstrap_ci(small)
    assert low < np.mean(small) < high
    # about 2 * 1.96 / sqrt(30) = 0.72 wide, and 10x narrower with 100x the data
    assert 0.5 < high - low < 0.95
    big_low, big_high = ev.bootstrap_ci(large)
    assert big_low < 3.0 < big_high and big_high - big_low < (high - low) / 5
    assert ev.bootstrap_ci(small, seed=7) == ev.bootstrap_ci(small, seed=7)
    assert ev.bootstrap_ci(small, seed=7) != ev.bootstrap_ci(small, seed=8)
    # a higher level gives a wider interval; another statistic works
    low99, high99 = ev.bootstrap_ci(small, level=0.99)
    assert low99 < low and high < high99
    med_low, med_high = ev.bootstrap_ci(small, statistic=np.median)
    assert med_low < np.median(small) < med_high


def test_bootstrap_ci_of_nothing_and_of_one_value() -> None:
    assert all(math.isnan(x) for x in ev.bootstrap_ci([]))
    assert ev.bootstrap_ci([2.5]) == (2.5, 2.5)
    with pytest.raises(ConfigError, match=r"1\.5"):
        ev.bootstrap_ci([1.0, 2.0], level=1.5)


def test_auc_ci_brackets_the_auc() -> None:
    members, non = normal(0.5, 1.0, 80, 3), normal(0.0, 1.0, 60, 4)
    value = ev.auc(members, non)
    low, high = ev.auc_ci(members, non)
    assert 0 <= low < value < high <= 1
    assert 0.1 < high - low < 0.4  # about 2 * 1.96 * 0.05
    assert ev.auc_ci(members, non, seed=5) == ev.auc_ci(members, non, seed=5)
    assert all(math.isnan(x) for x in ev.auc_ci([], non))
    # ties count half, as in `auc`: identical constant groups give exactly 0.5
    assert ev.auc_ci([1.0] * 5, [1.0] * 7) == (0.5, 0.5)


def test_auc_difference_ci_finds_no_difference_between_alike_models_and_one_between_unlike() -> None:
    same = ev.auc_difference_ci(normal(0.3, 1, 100, 1), normal(0, 1, 100, 2),
                                normal(0.3, 1, 100, 3), normal(0, 1, 100, 4))
    assert same[0] < 0 < same[1] and same[1] - same[0] < 0.4
    # a model that still tells its forget set apart (AUC near 1) against an oracle at chance
    apart = ev.auc_difference_ci(normal(3, 1, 50, 5), normal(0, 1, 50, 6),
                                 normal(0, 1, 50, 7), normal(0, 1, 50, 8))
    assert 0.3 < apart[0] < apart[1] < 0.7
    assert all(math.isnan(x) for x in ev.auc_difference_ci([1.0], [], [1.0], [2.0]))


def test_privleak_follows_muse_and_openunlearning() -> None:
    assert ev.privleak(0.7, 0.7) == 0.0
    # (1 - 0.8) - (1 - 0.5) over (1 - 0.5): an under-unlearned model is negative, at -60%
    assert ev.privleak(0.8, 0.5) == pytest.approx(-60.0)
    assert ev.privleak(0.4, 0.5) == pytest.approx(20.0)


# -- equivalence -------------------------------------------------------------------------------


def test_tost_finds_alike_samples_equivalent_and_shifted_ones_not() -> None:
    a, b = normal(0.0, 1.0, 400, 1), normal(0.0, 1.0, 400, 2)
    same = ev.tost(a, b, margin=0.5)
    assert same.equivalent and same.p_value < 1e-6
    assert -0.5 < same.ci[0] < same.difference < same.ci[1] < 0.5
    assert (same.n, same.m, same.margin) == (400, 400, 0.5)
    shifted = ev.tost([x + 1.0 for x in a], b, margin=0.5)  # twice the margin apart
    assert not shifted.equivalent and shifted.p_value > 0.99
    assert shifted.difference == pytest.approx(same.difference + 1.0)


def test_tost_matches_the_welch_one_sided_tests() -> None:
    from scipy import stats

    a, b = normal(0.1, 1.0, 25, 3), normal(0.0, 2.0, 40, 4)
    test = ev.tost(a, b, margin=0.8)
    lower = stats.ttest_ind([x + 0.8 for x in a], b, equal_var=False, alternative="greater").pvalue
    upper = stats.ttest_ind([x - 0.8 for x in a], b, equal_var=False, alternative="less").pvalue
    assert test.p_value == pytest.approx(max(lower, upper), rel=1e-9)
    # the 90% interval is inside the margin exactly when p < 0.05
    assert test.equivalent == (-0.8 < test.ci[0] < test.ci[1] < 0.8)


def test_tost_cannot_decide_on_tiny_samples_and_decides_exactly_without_spread() -> None:
    tiny = ev.tost([0.0, 1.0], [0.0, 1.0], margin=0.5)  # the same two values, too few to tell
    assert tiny.difference == 0 and not tiny.equivalent and tiny.p_value > 0.25
    one = ev.tost([0.0], [0.0, 0.1, 0.2], margin=1.0)
    assert one.p_value == 1.0 and not one.equivalent and one.difference == pytest.approx(-0.1)
    inside = ev.tost([1.0] * 5, [1.2] * 4, margin=0.5)
    assert (inside.p_value, inside.equivalent, inside.n, inside.m) == (0.0, True, 5, 4)
    assert inside.ci == (inside.difference, inside.difference) and inside.difference == pytest.approx(-0.2)
    outside = ev.tost([1.0] * 5, [2.0] * 4, margin=0.5)
    assert outside.p_value == 1.0 and not outside.equivalent
    with pytest.raises(ConfigError, match="-1"):
        ev.tost([1.0, 2.0], [1.0, 2.0], margin=-1)


def test_tost_power_rises_with_n_sits_at_alpha_on_the_margin_and_matches_simulation() -> None:
    powers = [ev.tost_power(n, 30, 1.0, 0.8) for n in (5, 10, 20, 40, 80)]
    assert powers == sorted(powers) and powers[0] < 0.5 < powers[-1]
    # the true difference on the margin: equivalence is declared about alpha of the time
    assert ev.tost_power(300, 300, 1.0, 0.5, true_difference=0.5) == pytest.approx(0.05, abs=0.01)
    assert ev.tost_power(10, 10, 0.01, 0.5) == pytest.approx(1.0)
    assert ev.tost_power(10, 10, 0.0, 0.5) == 1.0 and ev.tost_power(10, 10, 0.0, 0.5, true_difference=1) == 0
    assert ev.tost_power(1, 10, 1.0, 0.5) == 0.0 and math.isnan(ev.tost_power(5, 5, math.nan, 0.5))
    # against running `tost` on 2000 simulated pairs of samples
    rng = np.random.default_rng(9)
    found = np.mean([ev.tost(rng.normal(0.3, 1.0, 12), rng.normal(0.0, 1.0, 15), 1.0).equivalent
                     for _ in range(2000)])
    assert ev.tost_power(12, 15, 1.0, 1.0, true_difference=0.3) == pytest.approx(found, abs=0.03)


def test_samples_for_power_is_the_first_n_that_reaches_it() -> None:
    n = ev.samples_for_power(30, 1.0, 0.8)
    assert n is not None and 20 < n < 80
    assert ev.tost_power(n, 30, 1.0, 0.8) >= 0.9 > ev.tost_power(n - 1, 30, 1.0, 0.8)
    # five noisy values in the other group: no n makes up for them
    assert ev.samples_for_power(5, 1.0, 0.3) is None
    assert ev.samples_for_power(1, 1.0, 0.3) is None


# -- calibration and the reference attack -------------------------------------------------------


def test_calibrated_exposure_is_the_gain_over_the_base_model() -> None:
    assert ev.calibrated_exposure(9.5, 7.0) == 2.5
    assert ev.calibrated_exposure(3.0, 7.0) == -4.0


def test_reference_score_is_member_like_when_the_model_beats_the_base() -> None:
    base = np.array([-3.0, -2.0, -4.0])
    assert ev.reference_score(np.array([-1.0, -1.0, -1.0]), base) == pytest.approx(2.0)
    assert ev.reference_score(np.array([-4.0, -4.0, -4.0]), base) == pytest.approx(-1.0)
    assert math.isnan(ev.reference_score(np.array([]), np.array([])))
    with pytest.raises(ConfigError, match="shapes"):
        ev.reference_score(np.array([-1.0]), base)
    # members the model learned beyond the base score higher: AUC 1
    members = [ev.reference_score(base + 2, base), ev.reference_score(base + 1, base)]
    non = [ev.reference_score(base, base), ev.reference_score(base - 1, base)]
    assert ev.auc(members, non) == 1.0


def test_membership_scores_add_reference_only_given_the_base() -> None:
    logp, mu, sigma = np.array([-1.0, -2.0, -0.5]), np.zeros(3), np.ones(3)
    plain = ev.membership_scores(logp, mu, sigma, "abc")
    assert set(plain) == {"loss", "zlib", "min_k", "min_k_plus_plus"}
    both = ev.membership_scores(logp, mu, sigma, "abc", base_logp=logp - 1)
    assert both["reference"] == pytest.approx(1.0)
    assert {k: v for k, v in both.items() if k != "reference"} == plain


# -- the gradient-norm attack --------------------------------------------------------------------


ROWS = make_chat_rows()
MEMBERS = ROWS[:32]  # the store trains on these; ROWS[32:] it never sees


@pytest.fixture(scope="module", params=[0, 1], ids=["all-layers", "top-1"])
def mono(request: Any, tmp_path_factory: Any, tiny_lm: str) -> Sisa:
    root: Path = tmp_path_factory.mktemp("mono")
    config = lm_config(tiny_lm, top_k=request.param, shards=1, slices=1)
    return Sisa.train(root / "m", MEMBERS, config, CHAT_SPEC)


def test_gradient_norms_score_each_text_and_leave_the_model_as_it_was(mono: Sisa) -> None:
    model = monolith_model(mono)
    model.model.train()
    lora = next(m for name, m in model.model.named_modules() if name.endswith("lora_A"))
    lora.eval()  # a mixed state, to see each module's own mode restored
    modes = {name: m.training for name, m in model.model.named_modules()}
    before = {k: v.clone() for k, v in model.adapter().items()}
    texts = [r["text"] for r in ROWS[:6] + ROWS[-6:]]
    prompts = [r["prompt"] or None for r in ROWS[:6] + ROWS[-6:]]
    inputs = mono.model_inputs(texts, prompts)
    norms = gradient_norms(model, inputs)
    assert norms.shape == (12,) and np.all(np.isfinite(norms)) and np.all(norms > 0)
    assert len(set(norms.tolist())) == 12  # each text its own gradient
    after = model.adapter()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert all(p.grad is None for p in model.model.parameters())
    assert {name: m.training for name, m in model.model.named_modules()} == modes
    # batched: the same norms (padding is masked); scores are the negative norms; deterministic
    np.testing.assert_allclose(gradient_norms(model, inputs, batch_size=5), norms, rtol=1e-4)
    np.testing.assert_array_equal(gradient_norm_scores(model, inputs), -norms)
    inf = gradient_norms(model, inputs, p=math.inf)
    assert np.all(inf < norms)  # the largest entry of each tensor is below its L2 norm
    with pytest.raises(ConfigError, match="3"):
        gradient_norms(model, inputs, p=3)


def test_gradient_norms_are_openunlearnings_mean_of_per_tensor_norms(mono: Sisa) -> None:
    """Checked by hand for one text: backward on its mean token NLL, then the mean over the
    adapter's tensors of each gradient's L2 norm (not the norm of all of them together)."""
    model = monolith_model(mono)
    model.model.eval()
    row = MEMBERS[3]
    inputs = mono.model_inputs([row["text"]], [row["prompt"] or None])
    logp, counts = model.sequence_logprobs(inputs, [0])
    (-logp[0] / counts[0]).backward()
    grads = [p.grad for p in model.model.parameters() if p.requires_grad]
    by_hand = float(torch.stack([g.norm() for g in grads if g is not None]).mean())
    together = float(torch.cat([g.flatten() for g in grads if g is not None]).norm())
    model.model.zero_grad(set_to_none=True)
    found = float(gradient_norms(model, inputs)[0])
    assert found == pytest.approx(by_hand, rel=1e-5) and found != pytest.approx(together, rel=1e-2)
