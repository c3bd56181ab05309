"""Evidence of forgetting, as pure functions of log-probabilities and of the scores made from them.

- Canaries (Carlini et al., "The Secret Sharer", USENIX Security 2019): a secret of d random digits
  in a fixed template. Exposure = log2(|candidates|) - log2(rank of the true secret among all
  candidates by likelihood); estimated from random reference secrets (the interpolation estimate)
  and by extrapolating a skew-normal fit of their log-perplexities; calibrated against the base
  model (the exposure gained over it).
- Membership inference with OpenUnlearning's scores: LOSS (mean token NLL), zlib (NLL over the zlib
  entropy of the text), Min-K% and Min-K%++ (the mean of the k lowest token scores, k = 0.4), and,
  given the base model's log-probabilities, the reference attack; the AUC of a forget set against a
  never-trained holdout set (0.5: indistinguishable) and MUSE's PrivLeak against the oracle's AUC.
- What a reviewer asks of those numbers: percentile bootstrap intervals (of a mean, of an AUC, of
  the difference of two AUCs), and an equivalence test within a stated margin (TOST, Welch), with
  its power and the sample size that reaches a given power.

`sisa.workflows.proof` computes the log-probabilities from a store and reports them;
`sisa.workflows.attacks` holds the attacks that need the model itself (gradient norms)."""

from __future__ import annotations

import math
import random
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from sisa.errors import ConfigError

Values = Sequence[float] | np.ndarray  # a sample of scores, exposures, ...

TEMPLATE = "my secret number is {secret}"
MIN_K = 0.4


def random_secret(rng: random.Random, digits: int) -> str:
    return "".join(rng.choice("0123456789") for _ in range(digits))


def all_secrets(digits: int) -> list[str]:
    return [f"{i:0{digits}d}" for i in range(10 ** digits)]


@dataclass(frozen=True)
class Exposure:
    exact: float  # from the true rank among every candidate
    rank: int  # 1 = the most likely candidate
    estimate: float  # interpolation from the reference secrets
    extrapolated: float  # skew-normal fit of the references' log-perplexities
    references: int


def exposure(logp: np.ndarray, true_index: int, references: np.ndarray) -> Exposure:
    """`logp`: log-likelihood of every candidate secret; `references`: indices of the random
    reference secrets (not the true one). Ties count against the canary."""
    space = len(logp)
    mine = logp[true_index]
    rank = 1 + int(np.sum(np.delete(logp, true_index) >= mine))
    refs = logp[references]
    better = int(np.sum(refs >= mine))
    estimate = -math.log2((better + 1) / (len(refs) + 1))
    return Exposure(
        exact=math.log2(space) - math.log2(rank),
        rank=rank,
        estimate=estimate,
        extrapolated=_skewnorm_exposure(-refs, -mine),
        references=len(refs),
    )


def _skewnorm_exposure(ref_ppl: np.ndarray, canary_ppl: float) -> float:
    """-log2 of the fitted share of secrets at least as likely as the canary (Carlini et al.'s
    extrapolation: log-perplexities of random secrets are close to skew-normal)."""
    from scipy import stats

    a, loc, scale = stats.skewnorm.fit(ref_ppl)
    share = float(stats.skewnorm.cdf(canary_ppl, a, loc, scale))
    return -math.log2(max(share, 1e-300))


def reference_indices(space: int, true_index: int, count: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    pool = np.delete(np.arange(space), true_index)
    return np.sort(rng.choice(pool, size=min(count, len(pool)), replace=False))


def calibrated_exposure(model_bits: float, base_bits: float) -> float:
    """The exposure a canary gained over the frozen base model (bits; model - base). Raw exposure
    overstates memorisation: a patterned secret ("1234", "0000") ranks high under any language
    model, trained on it or not, so part of its exposure is the base model's prior, not the
    canary's records. The gain is what training (and only training) put there; a forgotten canary
    should gain no more than one never inserted."""
    return float(model_bits - base_bits)


# -- membership inference ------------------------------------------------------------------------


def loss_score(logp: np.ndarray) -> float:
    """Mean token NLL (lower: more likely a member)."""
    return float(-np.mean(logp)) if len(logp) else math.nan


def zlib_score(logp: np.ndarray, text: str) -> float:
    return loss_score(logp) / len(zlib.compress(text.encode("utf-8")))


def min_k(logp: np.ndarray, k: float = MIN_K) -> float:
    """Mean of the lowest k share of token log-probabilities (higher: more likely a member)."""
    if not len(logp):
        return math.nan
    n = max(1, int(len(logp) * k))
    return float(np.mean(np.sort(logp)[:n]))


def min_k_plus_plus(logp: np.ndarray, mu: np.ndarray, sigma: np.ndarray, k: float = MIN_K) -> float:
    """Min-K%++: each token's log-probability standardised by the mean and spread of the
    log-probability under the model's own next-token distribution, then Min-K%."""
    z = (logp - mu) / np.maximum(sigma, 1e-8)
    return min_k(z, k)


def reference_score(model_logp: np.ndarray, base_logp: np.ndarray) -> float:
    """The reference attack (Carlini et al., "Extracting Training Data from Large Language Models",
    USENIX Security 2021; Mireshghallah et al. 2022's likelihood ratio): the mean token
    log-probability of one text's learned tokens under the model minus that under the frozen base
    model (higher: more likely a member). The base model calibrates away how likely the text is
    anyway; what is left is what training added. OpenUnlearning's `mia_reference` scores the same
    difference of mean losses, with the opposite sign (its AUC labels the holdout set 1)."""
    model_logp, base_logp = np.asarray(model_logp, dtype=float), np.asarray(base_logp, dtype=float)
    if model_logp.shape != base_logp.shape:
        raise ConfigError(f"the model's and the base model's log-probabilities must be of the same "
                          f"tokens: got shapes {model_logp.shape} and {base_logp.shape}")
    if not len(model_logp):
        return math.nan
    return float(np.mean(model_logp) - np.mean(base_logp))


def membership_scores(logp: np.ndarray, mu: np.ndarray, sigma: np.ndarray, text: str,
                      base_logp: np.ndarray | None = None) -> dict[str, float]:
    """Scores oriented so that higher means "more likely trained on" (as `auc` reads them: members
    first); with `base_logp` (the same tokens under the frozen base model), also "reference"."""
    scores = {"loss": -loss_score(logp), "zlib": -zlib_score(logp, text), "min_k": min_k(logp),
              "min_k_plus_plus": min_k_plus_plus(logp, mu, sigma)}
    if base_logp is not None:
        scores["reference"] = reference_score(logp, base_logp)
    return scores


def auc(members: Sequence[float], non_members: Sequence[float]) -> float:
    """ROC AUC of telling members from non-members by the score (0.5: no better than chance)."""
    from sklearn.metrics import roc_auc_score

    if not members or not non_members:
        return math.nan
    labels = [1] * len(members) + [0] * len(non_members)
    return float(roc_auc_score(labels, list(members) + list(non_members)))


def privleak(auc: float, oracle_auc: float) -> float:
    """MUSE's PrivLeak (Shi et al. 2024), as OpenUnlearning computes it (src/evals/metrics/privacy.py,
    `privleak`, at d3d7cf9): (AUC' - oracle AUC') / (oracle AUC' + 1e-10) * 100 with AUC' = 1 - AUC,
    i.e. (oracle_auc - auc) / (1 - oracle_auc + 1e-10) * 100. MUSE reports AUCs flipped (1 - x),
    hence the flip; `auc` and `oracle_auc` here are `auc`'s (and OpenUnlearning's own): 1 when the
    forget set is far more likely than the holdout. `oracle_auc`: the retrained model's AUC on the
    same sets (OpenUnlearning falls back to 0.5 without one). 0: leaks as much as the oracle;
    negative: under-unlearned (the forget set still looks like members); positive: over-unlearned."""
    return float(((1 - auc) - (1 - oracle_auc)) / ((1 - oracle_auc) + 1e-10) * 100)


def ks_pvalue(a: Sequence[float], b: Sequence[float]) -> float:
    """Two-sample Kolmogorov-Smirnov p-value (high: no evidence the samples differ)."""
    from scipy import stats

    if not a or not b:
        return math.nan
    return float(stats.ks_2samp(list(a), list(b)).pvalue)


def ks_min_pvalue(n: int, m: int) -> float:
    """The smallest p-value the two-sample KS test can give for samples of sizes n and m (when
    they do not overlap at all): above the test's level, no outcome can show the samples differ."""
    return ks_pvalue([float(m + i) for i in range(n)], [float(i) for i in range(m)])


def chance_of_exposure(bits: float) -> float:
    """The probability that a canary the model never saw has at least this exposure: its secret
    is a uniform draw, so its rank among the candidates is uniform and P(rank <= r) = r / N,
    which is 2 ** -exposure (ties, ranked against it, only make this larger)."""
    return float(2.0 ** -bits)


# -- what a reviewer asks of the numbers: intervals, equivalence, power --------------------------


def _check_interval(level: float, resamples: int) -> None:
    if not 0 < level < 1:
        raise ConfigError(f"level must be in (0, 1), got {level!r}")
    if resamples < 1:
        raise ConfigError(f"resamples must be at least 1, got {resamples!r}")


def _percentiles(draws: np.ndarray, level: float) -> tuple[float, float]:
    tail = (1 - level) / 2
    low, high = np.quantile(draws, [tail, 1 - tail])
    return float(low), float(high)


def bootstrap_ci(values: Values, statistic: Callable[[np.ndarray], float] = np.mean,
                 level: float = 0.95, resamples: int = 2000, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of `statistic` (Efron): the statistic of `resamples` draws
    with replacement of `values`, its (1 - level) / 2 and (1 + level) / 2 quantiles. Deterministic
    for a seed. No values: (nan, nan); one value v: (v, v) for the mean (every draw is [v])."""
    _check_interval(level, resamples)
    data = np.asarray(values, dtype=float)
    if not len(data):
        return math.nan, math.nan
    rng = np.random.default_rng(seed)
    draws = data[rng.integers(0, len(data), size=(resamples, len(data)))]
    return _percentiles(np.array([statistic(row) for row in draws], dtype=float), level)


def _resampled_aucs(rng: np.random.Generator, members: np.ndarray, non_members: np.ndarray,
                    resamples: int) -> np.ndarray:
    """`auc` of each of `resamples` stratified bootstrap draws (each group resampled on its own,
    so every draw keeps both groups' sizes), all at once: the Mann-Whitney U over the ranks, ties
    counted half, which is what `roc_auc_score` computes."""
    from scipy import stats

    n, m = len(members), len(non_members)
    mine = members[rng.integers(0, n, size=(resamples, n))]
    theirs = non_members[rng.integers(0, m, size=(resamples, m))]
    ranks = stats.rankdata(np.concatenate([mine, theirs], axis=1), axis=1)
    return np.asarray((ranks[:, :n].sum(axis=1) - n * (n + 1) / 2) / (n * m))


def auc_ci(members: Values, non_members: Values, level: float = 0.95,
           resamples: int = 2000, seed: int = 0) -> tuple[float, float]:
    """Percentile interval of `auc` by the stratified bootstrap (members and non-members resampled
    separately). Deterministic for a seed; (nan, nan) when a group is empty."""
    _check_interval(level, resamples)
    a, b = np.asarray(members, dtype=float), np.asarray(non_members, dtype=float)
    if not len(a) or not len(b):
        return math.nan, math.nan
    return _percentiles(_resampled_aucs(np.random.default_rng(seed), a, b, resamples), level)


def auc_difference_ci(members_a: Values, non_members_a: Values,
                      members_b: Values, non_members_b: Values,
                      level: float = 0.95, resamples: int = 2000, seed: int = 0) -> tuple[float, float]:
    """Percentile interval of AUC_a - AUC_b (say a model's forget-vs-holdout AUC minus the
    retrained oracle's), each of the four groups resampled independently (the two models' scores
    treated as independent samples: conservative where they share texts). An interval that holds
    0 finds no difference; (nan, nan) when a group is empty."""
    _check_interval(level, resamples)
    groups = [np.asarray(g, dtype=float) for g in (members_a, non_members_a, members_b, non_members_b)]
    if any(not len(g) for g in groups):
        return math.nan, math.nan
    rng = np.random.default_rng(seed)
    first = _resampled_aucs(rng, groups[0], groups[1], resamples)
    second = _resampled_aucs(rng, groups[2], groups[3], resamples)
    return _percentiles(first - second, level)


@dataclass(frozen=True)
class Tost:
    """Two one-sided tests (Schuirmann 1987) of |mean(a) - mean(b)| < margin, each a Welch t-test."""

    p_value: float  # the larger of the two one-sided p-values (1: cannot decide)
    difference: float  # mean(a) - mean(b)
    ci: tuple[float, float]  # the (1 - 2 alpha) interval of the difference (Welch)
    equivalent: bool  # p_value < alpha: the interval lies strictly inside (-margin, margin)
    margin: float
    n: int  # len(a)
    m: int  # len(b)


def _check_margin(margin: float, alpha: float) -> None:
    if not (math.isfinite(margin) and margin > 0):
        raise ConfigError(f"the equivalence margin must be a positive number, got {margin!r}")
    if not 0 < alpha < 0.5:
        raise ConfigError(f"alpha must be in (0, 0.5), got {alpha!r}")


def tost(a: Values, b: Values, margin: float, alpha: float = 0.05) -> Tost:
    """Are the means of `a` and `b` equivalent within `margin`? H0: |difference| >= margin,
    rejected (equivalent) when both one-sided Welch t-tests reject at `alpha`, i.e. when the
    (1 - 2 alpha) interval lies inside (-margin, margin). Fewer than two values in a group: no
    variance to test with, p = 1. Both groups without spread (all values equal in each): the
    difference is known exactly, so p = 0 when it is strictly inside the margin, else 1."""
    _check_margin(margin, alpha)
    from scipy import stats

    x, y = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    n, m = len(x), len(y)
    difference = float(np.mean(x) - np.mean(y)) if n and m else math.nan
    if n < 2 or m < 2:
        return Tost(1.0, difference, (math.nan, math.nan), False, margin, n, m)
    va, vb = float(np.var(x, ddof=1)) / n, float(np.var(y, ddof=1)) / m
    se = math.sqrt(va + vb)
    if se == 0:
        p = 0.0 if abs(difference) < margin else 1.0
        return Tost(p, difference, (difference, difference), p < alpha, margin, n, m)
    df = (va + vb) ** 2 / (va ** 2 / (n - 1) + vb ** 2 / (m - 1))  # Welch-Satterthwaite
    above = float(stats.t.sf((difference + margin) / se, df))  # H0: difference <= -margin
    below = float(stats.t.cdf((difference - margin) / se, df))  # H0: difference >= margin
    p = max(above, below)
    half = float(stats.t.ppf(1 - alpha, df)) * se
    return Tost(p, difference, (difference - half, difference + half), p < alpha, margin, n, m)


def tost_power(n: int, m: int, sd: float, margin: float, alpha: float = 0.05,
               true_difference: float = 0.0, simulations: int = 4000, seed: int = 0) -> float:
    """The probability that `tost` finds two normal samples (sizes n and m, both of standard
    deviation `sd`, means `true_difference` apart) equivalent within `margin`. Semi-analytic:
    the two sample variances are drawn (`simulations` seeded draws, by the chi-square's inverse
    CDF from the same uniforms for every n, so the power is smooth in n); given them, the test
    accepts when the difference of the means, normal and independent of the variances, falls in
    (-margin + t se, margin - t se), a probability computed exactly. Exact where sd = 0; 0 where
    a group has fewer than two values (`tost` cannot decide); nan where sd is not a number."""
    _check_margin(margin, alpha)
    if n < 2 or m < 2:
        return 0.0
    if not math.isfinite(sd) or sd < 0:
        return math.nan
    if sd == 0:
        return 1.0 if abs(true_difference) < margin else 0.0
    from scipy import stats

    u = np.clip(np.random.default_rng(seed).random((simulations, 2)), 1e-12, 1 - 1e-12)
    va = sd ** 2 * stats.chi2.ppf(u[:, 0], n - 1) / (n - 1) / n  # variance of mean(a), estimated
    vb = sd ** 2 * stats.chi2.ppf(u[:, 1], m - 1) / (m - 1) / m
    df = (va + vb) ** 2 / (va ** 2 / (n - 1) + vb ** 2 / (m - 1))
    half = margin - stats.t.ppf(1 - alpha, df) * np.sqrt(va + vb)  # accept |d| < half
    spread = sd * math.sqrt(1 / n + 1 / m)  # the true sd of the difference of the means
    accept = (stats.norm.cdf((half - true_difference) / spread)
              - stats.norm.cdf((-half - true_difference) / spread))
    return float(np.mean(np.where(half > 0, accept, 0.0)))


def samples_for_power(m: int, sd: float, margin: float, power: float = 0.9, alpha: float = 0.05,
                      most: int = 4096, *, true_difference: float = 0.0, simulations: int = 4000,
                      seed: int = 0) -> int | None:
    """The smallest n (the other group fixed at m values) at which `tost_power` reaches `power`,
    by bisection over [2, most] (the power rises with n): the n returned reaches it and n - 1 does
    not. None where `most` does not reach it (with m fixed the power levels off: the other
    group's own noise remains), or where m < 2 or sd is not a number."""
    if not 0 < power < 1:
        raise ConfigError(f"power must be in (0, 1), got {power!r}")
    if most < 2:
        raise ConfigError(f"most must be at least 2, got {most!r}")

    def reaches(n: int) -> bool:
        return tost_power(n, m, sd, margin, alpha, true_difference, simulations, seed) >= power

    if not reaches(most):
        return None
    low, high = 1, most  # tost never decides at n = 1: low never reaches, high does
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (low, middle) if reaches(middle) else (middle, high)
    return high
