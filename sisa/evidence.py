"""Evidence of forgetting, as pure functions of log-probabilities.

- Canaries (Carlini et al., "The Secret Sharer", USENIX Security 2019): a secret of d random digits
  in a fixed template. Exposure = log2(|candidates|) - log2(rank of the true secret among all
  candidates by likelihood); estimated from random reference secrets (the interpolation estimate)
  and by extrapolating a skew-normal fit of their log-perplexities.
- Membership inference with OpenUnlearning's scores: LOSS (mean token NLL), zlib (NLL over the zlib
  entropy of the text), Min-K% and Min-K%++ (the mean of the k lowest token scores, k = 0.4); the
  AUC of a forget set against a never-trained holdout set (0.5: indistinguishable).

`sisa.workflows.proof` computes the log-probabilities from a store and reports them.
"""

from __future__ import annotations

import math
import random
import zlib
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

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


def membership_scores(logp: np.ndarray, mu: np.ndarray, sigma: np.ndarray, text: str) -> dict[str, float]:
    """Scores oriented so that higher means "more likely trained on"."""
    return {"loss": -loss_score(logp), "zlib": -zlib_score(logp, text), "min_k": min_k(logp),
            "min_k_plus_plus": min_k_plus_plus(logp, mu, sigma)}


def auc(members: Sequence[float], non_members: Sequence[float]) -> float:
    """ROC AUC of telling members from non-members by the score (0.5: no better than chance)."""
    from sklearn.metrics import roc_auc_score

    if not members or not non_members:
        return math.nan
    labels = [1] * len(members) + [0] * len(non_members)
    return float(roc_auc_score(labels, list(members) + list(non_members)))


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
