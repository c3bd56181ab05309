"""Proof of forgetting on a causal-LM store: canary exposure and membership inference, measured
before and after a deletion (`sisa prove`).

The evidence counts only if the model memorised first: the report states the inserted canaries'
exposure on their own shard before forgetting and says plainly when it is below the bar. After an
exact deletion the forgotten canaries should look like canaries that were never inserted.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import random
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from sisa import evidence
from sisa.api import Sisa, resolve_source
from sisa.builtin import stable_subset
from sisa.config import Combine, DataSpec
from sisa.errors import ConfigError, InputKindError, RecordError, name_some
from sisa.features import Progress, counter
from sisa.partition import place
from sisa.records import records_from_rows
from sisa.reports import _Dict
from sisa.serving.scorers import perplexity as scored_perplexity

MEMORISED_BITS = 10.0  # the bar: inserted canaries' mean exposure on their own shard, before
# ... or, for secrets too short to reach it, this share of the largest exposure there is.
MEMORISED_SHARE = 0.75
KS_LEVEL = 0.05  # forgotten vs never-inserted canaries: below this p-value, they differ
# A forgotten canary keeps memorisation if a never-inserted canary reaches its exposure with a
# probability below this (shared among the forgotten canaries, Bonferroni).
RESIDUAL_LEVEL = 0.01
# The equivalence test (TOST) of forgotten against never-inserted canaries' exposures gained over
# the base model: equivalent within this margin, in bits, at level TOST_LEVEL; decided only with
# at least POWER_NEEDED power at the run's sample sizes (else "inconclusive").
TOST_MARGIN = 0.5
TOST_LEVEL = 0.05
POWER_NEEDED = 0.9
NEVER_SUGGESTED = 512  # never-inserted canaries suggested where too few limit the power
# The utility gate: held-out perplexity after forgetting at most this multiple of before.
UTILITY_GATE = 1.05


@dataclass(frozen=True)
class Canary(_Dict):
    id: str  # record id (with repeats: the ids are `<id>#<r>`)
    group: str
    secret: str
    inserted: bool


@dataclass(frozen=True)
class CanarySet(_Dict):
    template: str
    digits: int
    repeats: int  # copies of each inserted canary in the training data
    canaries: list[Canary]

    def record_ids(self, canary: Canary) -> list[str]:
        return [canary.id] if self.repeats == 1 else [f"{canary.id}#{r}" for r in range(self.repeats)]

    def with_template(self, template: str) -> CanarySet:
        """The same canaries read with another template (`prove` checks it against the store)."""
        check_template(template)
        return dataclasses.replace(self, template=template)

    def text(self, canary: Canary) -> str:
        return self.template.format(secret=canary.secret)

    def rows(self, spec: DataSpec) -> list[dict[str, Any]]:
        """Training rows of the inserted canaries, in the data's columns."""
        if spec.text_column is None:
            raise InputKindError("canaries are texts: the data needs a text column")
        rows = []
        for c in self.canaries:
            if not c.inserted:
                continue
            for record_id in self.record_ids(c):
                row: dict[str, Any] = {spec.id_column: record_id, spec.text_column: self.text(c)}
                if spec.group_column:
                    row[spec.group_column] = c.group
                if spec.prompt_column:
                    row[spec.prompt_column] = ""
                rows.append(row)
        return rows

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> CanarySet:
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
            found = cls(data["template"], int(data["digits"]), int(data["repeats"]),
                        [Canary(**c) for c in data["canaries"]])
            bad = [c.id for c in found.canaries
                   if len(c.secret) != found.digits or not c.secret.isdigit()]
            if bad or not found.canaries or "{secret}" not in found.template:
                raise ValueError(f"secrets that are not {found.digits} digits: {bad[:5]}")
            return found
        except FileNotFoundError:
            raise RecordError(f"canary file {str(path)!r} does not exist") from None
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise RecordError(f"canary file {str(path)!r} is not a canary set: "
                              f"{type(exc).__name__}: {exc}") from None


def check_template(template: str) -> None:
    """A canary template: text, then {secret} at its end (where the candidates are scored)."""
    if not template.endswith("{secret}") or template.count("{secret}") != 1:
        raise ConfigError(f"the canary template must end with {{secret}}, got {template!r}")
    if not template[:-len("{secret}")]:
        raise ConfigError("the canary template needs text before {secret}")


def make_canaries(groups: Sequence[str], inserted: int = 8, never: int = 8, digits: int = 4,
                  repeats: int = 1, seed: int = 0, template: str = evidence.TEMPLATE,
                  per_user: int = 1) -> CanarySet:
    """`inserted` canaries, `per_user` for each user chosen from `groups` (stably, by a hash keyed
    with `seed`; the last user may hold fewer), and `never` canaries of made-up users that are
    never trained on. Each canary has a secret of its own: several canaries per user give the
    verdict's statistics more secrets from fewer users (and fewer of their other records)."""
    check_template(template)
    if not 1 <= digits <= 5:
        raise ConfigError(f"digits must be in 1..5 (every candidate secret is scored), got {digits}")
    if inserted < 1 or never < 1 or repeats < 1 or per_user < 1:
        raise ConfigError(f"inserted, never, repeats and per_user must be >= 1, got {inserted}, "
                          f"{never}, {repeats}, {per_user}")
    if inserted + never > 10 ** digits:
        raise ConfigError(f"{inserted + never} canaries need as many distinct secrets; {digits} "
                          f"digits have {10 ** digits}")
    unique = sorted(set(groups), key=lambda g: hashlib.blake2b(f"{seed}/{g}".encode(),
                                                               digest_size=8).digest())
    users = -(-inserted // per_user)
    if len(unique) < users:
        raise ConfigError(f"{inserted} canaries, {per_user} per user, need {users} users; the data "
                          f"has {len(unique)}")
    rng = random.Random(f"canaries/{seed}")
    secrets: set[str] = set()
    canaries = []
    for i in range(inserted + never):
        secret = evidence.random_secret(rng, digits)
        while secret in secrets:
            secret = evidence.random_secret(rng, digits)
        secrets.add(secret)
        if i < inserted:
            canaries.append(Canary(f"canary-{i}", unique[i // per_user], secret, True))
        else:
            canaries.append(Canary(f"canary-never-{i - inserted}", f"never-user-{i - inserted}",
                                   secret, False))
    return CanarySet(template, digits, repeats, canaries)


def insert_canaries(sisa: Sisa, inserted: int = 8, never: int = 8, digits: int = 4, repeats: int = 8,
                    seed: int = 0, template: str = evidence.TEMPLATE,
                    per_user: int = 1) -> tuple[CanarySet, Any]:
    """Make canaries for users of a causal-LM store and add the inserted ones as their records
    (the affected shards retrain from the canaries' slices). Returns the set and the report."""
    sisa.require_language_model()
    groups = sisa.groups()
    if not groups:
        raise RecordError("the store's records have no groups (users): train with a group column")
    canaries = make_canaries(groups, inserted, never, digits, repeats, seed, template, per_user)
    candidate_tokens(sisa.tokenizer, canaries)  # refused before any retraining, if it cannot rank
    return canaries, sisa.add(canaries.rows(sisa.data_spec))


@dataclass(frozen=True)
class CanaryEvidence(_Dict):
    id: str
    group: str
    inserted: bool
    shard: int
    exposure_shard: float | None  # exact, under its own shard's adapter (None: shard not serving)
    exposure_ensemble: float
    estimate_shard: float | None  # from the reference secrets
    extrapolated_shard: float | None
    rank_shard: int | None
    greedy_shard: bool | None  # greedy decoding from the prefix reproduces the secret
    greedy_ensemble: bool
    # Under the frozen base model alone: how likely the secret is with no training at all (a
    # patterned secret such as "1234" ranks high there). Calibrated: exposure gained over it.
    exposure_base: float | None = None
    calibrated_shard: float | None = None
    calibrated_ensemble: float | None = None


@dataclass(frozen=True)
class Evidence(_Dict):
    canaries: list[CanaryEvidence]
    membership_auc: dict[str, dict[str, float]]  # view -> score -> AUC of forget vs holdout
    perplexity: dict[str, float]  # retain / holdout / forget, under the ensemble
    candidates: int
    references: int
    model_version: str = ""
    # view -> score -> [low, high]: the AUC's 95% bootstrap interval (forget and holdout resampled)
    membership_ci: dict[str, dict[str, list[float]]] = field(default_factory=dict)
    # Under the ensemble: each text's membership scores, "forget" and "holdout" -> score -> values
    # (in the order of the texts given), for comparisons with another model (e.g. the oracle).
    member_scores: dict[str, dict[str, list[float]]] = field(default_factory=dict)


@dataclass(frozen=True)
class OracleCheck(_Dict):
    """The store after the deletion against the retrained oracle: a scratch store trained on the
    same live records with the same config and seed. Exact unlearning means every live shard's
    weights are the same bytes."""

    identical: bool
    shards: dict[str, dict[str, str | None]]  # shard -> {"store": sha256, "oracle": sha256}
    records: int  # live records the oracle was trained on
    seconds: float  # training the oracle


@dataclass(frozen=True)
class ProofReport(_Dict):
    before: Evidence
    after: Evidence | None
    forgotten_groups: list[str]
    forgotten_records: int
    deletion_seconds: float | None
    memorised: bool  # before: inserted canaries' mean exposure on their shard >= MEMORISED_BITS
    mean_exposure_before: float
    forgotten_mean_exposure: float | None  # after, forgotten canaries (own shard)
    never_mean_exposure: float | None  # after, never-inserted canaries (own shard)
    ks_pvalue: float | None  # forgotten vs never-inserted exposures, after
    forgotten_like_never: bool | None  # the verdict, where it is decided (see `judge`)
    notes: list[str] = field(default_factory=list)
    verdict: str | None = None  # "yes", "no" or "inconclusive" (None: nothing was forgotten)
    verdict_reason: str = ""  # why, in a sentence: what decided it, or what was too weak to
    memorised_bar: float = MEMORISED_BITS  # the mean exposure before that counts as memorised
    in_place: bool = False  # the store itself forgot (else a copy did, and was removed)
    oracle: OracleCheck | None = None  # with `oracle=True`: the store after against a scratch store
    tost: dict[str, Any] | None = None  # the equivalence test, its power and what would decide it
    template: str = ""  # the canaries' text, {secret} at its end, as measured


@dataclass(frozen=True)
class Verdict(_Dict):
    """Do the forgotten canaries look like canaries never inserted? Decided only where the
    evidence can decide it; else "inconclusive", saying why."""

    answer: str  # "yes", "no" or "inconclusive"
    reason: str
    tost: dict[str, Any] | None = None  # the equivalence test, where it ran (see `equivalence`)


def equivalence(forgotten: Sequence[float], never: Sequence[float],
                margin: float = TOST_MARGIN) -> dict[str, Any]:
    """TOST of forgotten against never-inserted canaries' exposures (bits): equivalent within
    `margin`? With its power at these sample sizes, for no true difference and the spread the
    never-inserted canaries show, and the forgotten canaries that would give POWER_NEEDED."""
    n, m = len(forgotten), len(never)
    test = evidence.tost(list(forgotten), list(never), margin, TOST_LEVEL)
    sd = float(np.std(list(never), ddof=1)) if m > 1 else math.nan
    power = evidence.tost_power(n, m, sd, margin, TOST_LEVEL) if n > 1 and m > 1 else 0.0
    needed = evidence.samples_for_power(m, sd, margin, POWER_NEEDED, TOST_LEVEL) if m > 1 else None
    # Never-inserted canaries cost nothing (every candidate secret is scored anyway): with more
    # of them, fewer forgotten ones reach the power.
    more = max(m, NEVER_SUGGESTED)
    with_more = (evidence.samples_for_power(more, sd, margin, POWER_NEEDED, TOST_LEVEL)
                 if needed is None and math.isfinite(sd) else None)
    return {"margin": margin, "level": TOST_LEVEL, "n": n, "m": m, "difference": test.difference,
            "ci": list(test.ci), "p_value": test.p_value, "equivalent": test.equivalent,
            "sd_never": sd, "power": power, "power_needed": POWER_NEEDED,
            "forgotten_needed": needed,
            "with_more_never": {"never": more, "forgotten_needed": with_more} if with_more else None}


def judge(memorised: bool, mean_before: float, bar: float,
          forgotten: Sequence[tuple[str, float, float]], never: Sequence[float], *,
          calibrated: tuple[Sequence[float], Sequence[float]] | None = None,
          utility: tuple[float, float] | None = None, oracle: bool | None = None,
          margin: float = TOST_MARGIN) -> Verdict:
    """The verdict on a deletion, from the forgotten canaries' (id, exposure before, exposure
    after) on their own shard and the never-inserted canaries' exposures after, in bits.
    `calibrated`: the same two groups' exposures gained over the base model (every test below
    reads these where given: a patterned secret ranks high under any model); `utility`: held-out
    perplexity (before, after); `oracle`: whether the model after equals the retrained oracle,
    where that was checked.

    In order: "inconclusive" where there was nothing to forget (not memorised). "no" where a
    forgotten canary keeps an exposure that a never-inserted canary reaches with a probability
    below RESIDUAL_LEVEL / n (exact: `evidence.chance_of_exposure`); where held-out perplexity
    rose above UTILITY_GATE times before (the utility gate); where the KS test tells the groups
    apart (p <= KS_LEVEL); or where the model differs from the retrained oracle. "yes" where it
    is the oracle, byte for byte (every measure of it is the oracle's). Otherwise the TOST
    decides, within `margin` bits: "inconclusive" below POWER_NEEDED power at these sample sizes
    (saying how many forgotten canaries would reach it), else "yes" if equivalent, "no" if not."""
    n, m = len(forgotten), len(never)
    if not n:
        return Verdict("inconclusive", "no forgotten canary was measured on its own shard")
    if not memorised:
        return Verdict("inconclusive", f"the canaries were not memorised before the deletion "
                       f"(mean exposure {mean_before:.2f} bits on their own shard, below "
                       f"{bar:.1f}): forgetting them shows nothing")
    level = RESIDUAL_LEVEL / n
    # Patterned secrets rank high under any language model: where the base model's exposures are
    # known, every test reads the exposure gained over it.
    gone, base = calibrated if calibrated is not None else ([a for _, _, a in forgotten], never)
    what = "exposure gained over the base model" if calibrated is not None else "exposure"
    for (name, before, after), kept in zip(forgotten, gone, strict=True):
        chance = evidence.chance_of_exposure(kept)
        if chance < level:
            return Verdict("no", f"{name} keeps {kept:.2f} bits of {what} ({after:.2f} bits, "
                                 f"{before:.2f} before): a never-inserted canary reaches that "
                                 f"with probability {chance:.2g}, below {level:.2g}")
    if utility is not None and utility[1] > UTILITY_GATE * utility[0]:
        return Verdict("no", f"held-out perplexity rose from {utility[0]:.3g} to {utility[1]:.3g}, "
                             f"above {UTILITY_GATE:g}x: forgetting damaged the model (the utility "
                             "gate)")
    if m and evidence.ks_min_pvalue(n, m) <= KS_LEVEL:
        p = evidence.ks_pvalue(list(gone), list(base))
        if p <= KS_LEVEL:
            return Verdict("no", f"the forgotten canaries' {what} differs from the never-inserted "
                                 f"ones' (KS p = {p:.3f}, at most {KS_LEVEL})")
    # The equivalence test is stated even where the oracle decides.
    test = equivalence(gone, base, margin) if m else None
    if oracle is False:
        return Verdict("no", "the model after the deletion differs from the retrained oracle (a "
                             "scratch store on the records left, same config and seed)", test)
    if oracle:
        return Verdict("yes", "the model after the deletion is the retrained oracle byte for byte "
                              "(every shard's weights equal a scratch store's on the records left, "
                              "sha256): whatever is measured of it is what retraining gives", test)
    if test is None:
        return Verdict("inconclusive", "no never-inserted canary to compare the forgotten ones with")
    if test["power"] < POWER_NEEDED:
        needed, alt = test["forgotten_needed"], test["with_more_never"]
        if needed is not None:
            more = (f"forget at least {needed} canaries in one request (their users'; `sisa "
                    "canaries --per-user` gives each user several)")
        elif alt is not None:
            more = (f"make {alt['never']} never-inserted canaries (they cost nothing) and forget "
                    f"at least {alt['forgotten_needed']} canaries in one request")
        else:
            more = (f"no size within reach gives it at this spread: widen the margin past "
                    f"{margin:g} bit")
        return Verdict("inconclusive", f"the equivalence test (TOST, margin {margin:g} bit, on "
                       f"{what}) has {test['power']:.1%} power with {n} forgotten and {m} "
                       f"never-inserted canaries (sd {test['sd_never']:.2f} bits), below "
                       f"{POWER_NEEDED:.0%}: {more}, or check against the retrained oracle "
                       "(--oracle)", test)
    if test["equivalent"]:
        return Verdict("yes", f"forgotten and never-inserted canaries' {what} are equivalent within "
                              f"{margin:g} bit (TOST p = {test['p_value']:.3f}, difference "
                              f"{test['difference']:+.2f}, power {test['power']:.1%})", test)
    return Verdict("no", f"forgotten and never-inserted canaries' {what} are not shown equivalent "
                         f"within {margin:g} bit (TOST p = {test['p_value']:.3f}, difference "
                         f"{test['difference']:+.2f}) though the test had {test['power']:.1%} power",
                   test)


# -- measuring ---------------------------------------------------------------------------------


def candidate_tokens(tokenizer: Any, canaries: CanarySet) -> tuple[list[int], np.ndarray, list[str]]:
    """The template's prefix tokens, and each candidate secret's tokens after it."""
    prefix = canaries.template.split("{secret}")[0]
    prefix_ids = tokenizer(prefix, add_special_tokens=False)["input_ids"]
    secrets = evidence.all_secrets(canaries.digits)
    rows = []
    for secret in secrets:
        ids = tokenizer(prefix + secret, add_special_tokens=False)["input_ids"]
        if ids[:len(prefix_ids)] != prefix_ids:
            raise ConfigError(f"the tokenizer merges the template's end with the secret "
                              f"({prefix!r} + {secret!r}): end the template with a space or colon")
        rows.append(ids[len(prefix_ids):])
    if len({len(r) for r in rows}) != 1:
        raise ConfigError("the tokenizer splits secrets into different numbers of tokens; use a "
                          "template whose secret digits tokenize one by one")
    return prefix_ids, np.asarray(rows, dtype=np.int64), secrets


def measure(scorer: Any, canaries: CanarySet, shard_of: dict[str, int],
            forget: tuple[Any, list[str]] | None, holdout: tuple[Any, list[str]],
            retain: tuple[Any, list[str]] | None, forget_shards: Sequence[int] = (),
            combine: Combine = "mean", references: int = 1000, seed: int = 0,
            progress: Progress | None = None) -> Evidence:
    """Canary exposures and membership scores under `scorer`'s views (its shards, the ensemble,
    and the frozen base model, in the same passes). `forget`, `holdout`, `retain`: (model
    inputs, texts)."""
    if not getattr(scorer, "base_view", True):
        scorer = scorer.with_base()
    prefix, cands, secrets = candidate_tokens(scorer.tokenizer, canaries)
    shards = f"{len(scorer.names)} shard{'s' if len(scorer.names) > 1 else ''}"
    logp, greedy = scorer.continuation_logprobs(
        prefix, cands, combine, on_progress=counter(progress, f"scoring {len(cands)} secrets ({shards})"))
    index = {s: i for i, s in enumerate(secrets)}
    views = list(scorer.views)
    ens = views.index("ensemble")
    base = views.index("base") if "base" in views else None
    out = []
    for c in canaries.canaries:
        i = index[c.secret]
        refs = evidence.reference_indices(len(secrets), i, references, seed)
        name = f"shard-{shard_of[c.id]}"
        e_ens = evidence.exposure(logp[ens], i, refs)
        e_shard = evidence.exposure(logp[views.index(name)], i, refs) if name in views else None
        e_base = evidence.exposure(logp[base], i, refs).exact if base is not None else None
        out.append(CanaryEvidence(
            c.id, c.group, c.inserted, shard_of[c.id],
            e_shard.exact if e_shard else None, e_ens.exact,
            e_shard.estimate if e_shard else None, e_shard.extrapolated if e_shard else None,
            e_shard.rank if e_shard else None,
            bool(greedy[views.index(name), i]) if name in views else None, bool(greedy[ens, i]),
            e_base,
            evidence.calibrated_exposure(e_shard.exact, e_base) if e_shard and e_base is not None
            else None,
            evidence.calibrated_exposure(e_ens.exact, e_base) if e_base is not None else None))

    def scored(part: tuple[Any, list[str]] | None, what: str) -> list[Any]:
        if part is None or not len(part[1]):
            return []
        bar = counter(progress, f"scoring {len(part[1])} {what} texts ({shards})")
        return scorer.scores(part[0], combine, on_progress=bar)

    s_forget, s_holdout = scored(forget, "forgotten"), scored(holdout, "held-out")
    s_retain = scored(retain, "retained")
    aucs: dict[str, dict[str, float]] = {}
    cis: dict[str, dict[str, list[float]]] = {}
    members: dict[str, dict[str, list[float]]] = {}
    if s_forget and s_holdout:
        for view in ["ensemble", *(f"shard-{s}" for s in forget_shards)]:
            if view not in views:
                continue
            v = views.index(view)

            def member_scores(scores: list[Any], texts: list[str], v: int = v) -> list[dict[str, float]]:
                return [evidence.membership_scores(
                            s.logp[v], s.mu[v], s.sigma[v], t,
                            base_logp=s.logp[base] if base is not None else None)
                        for s, t in zip(scores, texts, strict=True)]

            f = member_scores(s_forget, forget[1])  # type: ignore[index]
            h = member_scores(s_holdout, holdout[1])
            aucs[view] = {k: evidence.auc([x[k] for x in f], [x[k] for x in h]) for k in f[0]}
            if view == "ensemble":
                cis[view] = {k: list(evidence.auc_ci([x[k] for x in f], [x[k] for x in h], seed=seed))
                             for k in f[0]}
                members = {"forget": {k: [x[k] for x in f] for k in f[0]},
                           "holdout": {k: [x[k] for x in h] for k in h[0]}}

    perplexity = {name: scored_perplexity(part, "ensemble")
                  for name, part in (("retain", s_retain), ("holdout", s_holdout), ("forget", s_forget))}
    return Evidence(out, aucs, perplexity, len(secrets), min(references, len(secrets) - 1),
                    membership_ci=cis, member_scores=members)


# -- on a store --------------------------------------------------------------------------------


def canary_shards(sisa: Sisa, canaries: CanarySet) -> dict[str, int]:
    """Each canary's shard: where its records are (live or deleted), or where its made-up user
    would be placed."""
    p = sisa.config.partition
    rows = sisa.records([sisa_id for c in canaries.canaries for sisa_id in canaries.record_ids(c)])
    out = {}
    for c in canaries.canaries:
        first = rows.get(canaries.record_ids(c)[0])
        if first is not None:
            out[c.id] = first.shard
        else:
            out[c.id] = place(c.id, c.group, seed=p.seed, shards=p.shards, slices=p.slices).shard
    return out


def text_inputs(sisa: Sisa, texts: list[str], prompts: list[str | None] | None) -> tuple[Any, list[str]]:
    return sisa.lm_inputs(texts, prompts), texts


def stored_inputs(sisa: Sisa, ids: Sequence[str]) -> tuple[Any, list[str]]:
    found = sisa.texts(ids)
    live = list(dict.fromkeys(found[i] for i in ids if i in found))  # a repeated text counts once
    prompted = sisa.data_spec.prompt_column is not None
    return text_inputs(sisa, [t for t, _ in live], [p for _, p in live] if prompted else None)


def evidence_of(sisa: Sisa, canaries: CanarySet, forget: tuple[Any, list[str]] | None,
                holdout: tuple[Any, list[str]], retain: tuple[Any, list[str]] | None,
                forget_shards: Sequence[int], combine: Combine, references: int, seed: int,
                progress: Progress | None = None) -> Evidence:
    scorer = sisa.language_model()
    found = measure(scorer, canaries, canary_shards(sisa, canaries), forget, holdout, retain,
                    forget_shards, combine, references, seed, progress)
    return dataclasses.replace(found, model_version=sisa.ensemble().version)


def refuse_members(sisa: Sisa, rows: Sequence[Mapping[str, Any]], spec: DataSpec) -> None:
    """Refuse held-out texts that are not non-members: records the store holds (or held), or
    texts of users it trained on (their other words make a text look like a member: the AUCs
    would measure the user, not the record). Nothing has been changed when this raises."""
    ids = [str(r[spec.id_column]) for r in rows if r.get(spec.id_column) is not None]
    known = sisa.records(ids)
    if known:
        raise ConfigError(f"the holdout holds {len(known)} record(s) the store has or had (e.g. "
                          f"{name_some(sorted(known)[:3], quote=True)}): held-out texts must never "
                          "have been trained on; nothing was deleted")
    if spec.group_column is not None:
        users = {str(r[spec.group_column]) for r in rows if r.get(spec.group_column) is not None}
        shared = sorted(users & set(sisa.groups()))
        if shared:
            raise ConfigError(
                f"the holdout shares {len(shared)} user(s) with the store's training data (e.g. "
                f"{name_some(shared[:3], quote=True)}): their other texts were trained on, so "
                "membership scores would measure the user, not the record. Hold out whole users "
                "(builtin data sets' :test splits do); nothing was deleted")


def live_rows(sisa: Sisa) -> list[dict[str, Any]]:
    """The store's live records as rows of its data spec (id, text, prompt, group): what a
    scratch store is trained on."""
    spec = sisa.data_spec
    if spec.text_column is None:
        raise ConfigError("the oracle is trained from text records: this store has none")
    records = list(sisa.live_records())
    texts = sisa.texts([r.id for r in records])
    rows = []
    for r in records:
        text, prompt = texts[r.id]
        row: dict[str, Any] = {spec.id_column: r.id, spec.text_column: text}
        if spec.prompt_column is not None:
            row[spec.prompt_column] = prompt
        if spec.group_column is not None:
            row[spec.group_column] = r.group_id
        rows.append(row)
    return rows


def oracle_check(sisa: Sisa, directory: str | Path) -> OracleCheck:
    """Train the retrained oracle at `directory` (a scratch store on `sisa`'s live records, same
    config and seed; cached activations of the frozen layers reused) and compare every live
    shard's weights by sha256."""
    rows = live_rows(sisa)
    started = time.perf_counter()
    scratch = Sisa.train(directory, rows, sisa.config, sisa.data_spec, embeddings_from=sisa.root)
    seconds = time.perf_counter() - started
    try:
        mine = {s: r.sha256 for s, r in sisa.live_checkpoints().items()}
        theirs = {s: r.sha256 for s, r in scratch.live_checkpoints().items()}
    finally:
        scratch.close()
    shards = {str(s): {"store": mine.get(s), "oracle": theirs.get(s)}
              for s in sorted(set(mine) | set(theirs))}
    return OracleCheck(mine == theirs, shards, len(rows), seconds)


def check_canaries(sisa: Sisa, canaries: CanarySet) -> None:
    """Refuse a canary set whose template is not the one its canaries were inserted with: a live
    canary record of the store whose text is not the set's template with its secret."""
    inserted = [c for c in canaries.canaries if c.inserted]
    texts = sisa.texts([i for c in inserted for i in canaries.record_ids(c)])
    for c in inserted:
        for record_id in canaries.record_ids(c):
            found = texts.get(record_id)
            if found is not None and found[0] != canaries.text(c):
                raise RecordError(
                    f"canary record {record_id!r} reads {found[0]!r}, but the canary set's template "
                    f"{canaries.template!r} gives {canaries.text(c)!r}: give the template the "
                    "canaries were inserted with (sisa prove --template)")


def prove(sisa: Sisa, canaries: CanarySet, holdout_source: Any, forget_groups: Sequence[str] = (),
          holdout_limit: int = 64, retain_limit: int = 64, combine: Combine | None = None,
          references: int = 1000, seed: int = 0, progress: Progress | None = None,
          in_place: bool = False, oracle: bool = False, margin: float = TOST_MARGIN) -> ProofReport:
    """Measure, forget `forget_groups` (if any), measure again, and judge: did the model memorise
    the canaries, and do the forgotten ones now look like those never inserted (`judge`)?
    The deletion happens on a copy of the store (removed afterwards) unless `in_place`, where it
    is a real, receipted deletion. `oracle`: also train the retrained oracle (a scratch store on
    the records left) and compare the weights after the deletion with it, shard by shard.
    `progress`: the library's hook, for the scoring (the deletion's retraining reports through
    the store's own)."""
    sisa.require_language_model()
    combine = sisa.combine_mode(combine)
    check_canaries(sisa, canaries)
    rows, spec = resolve_source(holdout_source, sisa.data_spec)
    spec = dataclasses.replace(spec, label_column=None)
    refuse_members(sisa, rows, spec)
    held = records_from_rows(stable_subset(rows, spec.id_column, holdout_limit), spec, require_target=False)
    holdout = text_inputs(sisa, [r.input for r in held],  # type: ignore[misc]
                     [r.target for r in held] if spec.prompt_column else None)
    if references < 1:
        raise ConfigError(f"references must be >= 1, got {references}")
    groups = list(forget_groups) or sorted({c.group for c in canaries.canaries if c.inserted})
    all_ids = [i for g in groups for i in sisa.group_ids(g)]
    found = sisa.records(all_ids)
    forget_ids = [i for i in all_ids if found[i].deleted_at is None]
    if forget_groups and not forget_ids:
        raise RecordError(f"no live records of group(s) {list(forget_groups)} in the store")
    forget = stored_inputs(sisa, forget_ids)
    forget_set = set(forget_ids)
    live = [r.id for r in sisa.live_records() if r.id not in forget_set]
    retain_ids = [r["id"] for r in stable_subset([{"id": i} for i in live], "id", retain_limit)]
    retain = stored_inputs(sisa, retain_ids)
    shards = sorted({r.shard for r in sisa.records(forget_ids).values()})

    before = evidence_of(sisa, canaries, forget, holdout, retain, shards, combine, references, seed,
                         progress)
    inserted = [c for c in before.canaries if c.inserted and c.group in set(groups)]
    exposures = [c.exposure_shard for c in inserted if c.exposure_shard is not None]
    mean_before = float(np.mean(exposures)) if exposures else math.nan
    bar = min(MEMORISED_BITS, MEMORISED_SHARE * math.log2(10 ** canaries.digits))
    memorised = bool(exposures) and mean_before >= bar
    notes = []
    if not memorised:
        notes.append(f"the model did not memorise the canaries: their mean exposure on their own "
                     f"shard is {mean_before:.2f} bits, below {bar:.1f}; insert them more "
                     "often (repeats) or train longer before this evidence means anything")
    if not forget_groups:
        return ProofReport(before, None, [], 0, None, memorised, mean_before, None, None, None, None,
                           notes, memorised_bar=bar, template=canaries.template)

    with contextlib.ExitStack() as stack:
        work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="sisa-prove-")))
        target = sisa
        if not in_place:
            target = sisa.copy(work / "store")
            stack.callback(target.close)
        receipt = target.forget(forget_ids)  # one request: each affected shard retrains once
        after = evidence_of(target, canaries, forget, holdout, retain, shards, combine, references,
                            seed, progress)
        checked = oracle_check(target, work / "oracle") if oracle else None
    then = {c.id: c.exposure_shard for c in before.canaries}
    pairs: list[tuple[str, float, float]] = []  # each forgotten canary: before, after
    for c in after.canaries:
        was = then[c.id]
        if c.inserted and c.group in set(groups) and c.exposure_shard is not None and was is not None:
            pairs.append((c.id, was, c.exposure_shard))
    never = [c.exposure_shard for c in after.canaries if not c.inserted and c.exposure_shard is not None]
    gone = [a for _, _, a in pairs]
    p = evidence.ks_pvalue(gone, never)
    m_gone = float(np.mean(gone)) if gone else math.nan
    m_never = float(np.mean(never)) if never else math.nan
    gained = {c.id: c.calibrated_shard for c in after.canaries}
    calibrated = None
    if all(gained[i] is not None for i, _, _ in pairs) and all(
            c.calibrated_shard is not None for c in after.canaries if not c.inserted):
        calibrated = ([float(gained[i]) for i, _, _ in pairs],  # type: ignore[arg-type]
                      [float(c.calibrated_shard) for c in after.canaries  # type: ignore[arg-type]
                       if not c.inserted and c.exposure_shard is not None])
    verdict = judge(memorised, mean_before, bar, pairs, never, calibrated=calibrated,
                    utility=(before.perplexity["holdout"], after.perplexity["holdout"]),
                    oracle=checked.identical if checked is not None else None, margin=margin)
    alike = {"yes": True, "no": False}.get(verdict.answer)
    return ProofReport(before, after, groups, len(forget_ids), receipt.seconds,
                       memorised, mean_before, m_gone, m_never, p, alike, notes,
                       verdict.answer, verdict.reason, bar, in_place, checked, verdict.tost,
                       canaries.template)


# -- the report as rows of text (the CLI lays them out) ----------------------------------------


def _bits(value: float | None) -> str:
    return "-" if value is None or math.isnan(value) else f"{value:.2f}"


def _yes(value: bool | None) -> str:
    return "-" if value is None else "yes" if value else "no"


def canary_rows(report: ProofReport) -> list[tuple[str, ...]]:
    """Per canary: id, inserted, shard, then for each measurement (before, after) its exposure
    in bits as "own shard / ensemble", then whether greedy decoding reproduces the secret, as
    "own shard/ensemble" per measurement (y, n, or - where its shard did not serve)."""
    phases = [report.before] + ([report.after] if report.after is not None else [])
    rows = []
    for i, c in enumerate(report.before.canaries):
        bits = [f"{_bits(e.canaries[i].exposure_shard)} / {_bits(e.canaries[i].exposure_ensemble)}"
                for e in phases]
        greedy = " ".join(f"{_yes(e.canaries[i].greedy_shard)[0]}/{_yes(e.canaries[i].greedy_ensemble)[0]}"
                          for e in phases)
        rows.append((c.id, _yes(c.inserted), str(c.shard), *bits, greedy))
    return rows


def forgotten_rows(report: ProofReport) -> list[tuple[str, str, str, str, str, str]]:
    """Each forgotten canary: id, user, exposure on its own shard before and after (bits), the
    exposure after gained over the base model, and the chance that a never-inserted canary has at
    least the exposure after; then the never-inserted canaries' range after, for comparison."""
    if report.after is None:
        return []
    then = {c.id: c for c in report.before.canaries}
    gone = set(report.forgotten_groups)
    rows = []
    for c in report.after.canaries:
        if c.inserted and c.group in gone:
            chance = (f"{evidence.chance_of_exposure(c.exposure_shard):.2g}"
                      if c.exposure_shard is not None else "-")
            rows.append((c.id, c.group, _bits(then[c.id].exposure_shard), _bits(c.exposure_shard),
                         _bits(c.calibrated_shard), chance))
    never = [c for c in report.after.canaries if not c.inserted and c.exposure_shard is not None]
    if never:
        bits = [float(c.exposure_shard) for c in never]  # type: ignore[arg-type]
        gained = [c.calibrated_shard for c in never if c.calibrated_shard is not None]
        rows.append((f"never ({len(never)})", "", "", f"{min(bits):.2f} to {max(bits):.2f}",
                     f"mean {float(np.mean(gained)):.2f}" if gained else "-",
                     f"mean {float(np.mean(bits)):.2f}"))
    return rows


def verdict_rows(report: ProofReport) -> list[tuple[str, str]]:
    """The judgement as (what, finding) rows."""
    rows = [("memorised before", f"{_yes(report.memorised)}: {_bits(report.mean_exposure_before)} "
                                 f"bits mean on own shard (bar {report.memorised_bar:.1f})")]
    if report.after is not None:
        rows += [("forgotten users", ", ".join(report.forgotten_groups)),
                 ("deleted in", "the store itself (--in-place)" if report.in_place
                  else "a copy of the store, since removed (the store is unchanged)"),
                 ("deletion seconds", _bits(report.deletion_seconds)),
                 ("KS p, forgotten vs never inserted",
                  "-" if report.ks_pvalue is None or math.isnan(report.ks_pvalue)
                  else f"{report.ks_pvalue:.3f}"),
                 ("forgotten look like never inserted", report.verdict or "-"),
                 ("why", report.verdict_reason)]
        if report.tost is not None:
            t = report.tost
            need = (f"; {t['power_needed']:.0%} needs {t['forgotten_needed']} forgotten"
                    if t["power"] < t["power_needed"] and t["forgotten_needed"] is not None else "")
            rows.append((f"TOST, margin {t['margin']:g} bit",
                         f"p = {t['p_value']:.3f}, difference {t['difference']:+.2f} "
                         f"({t['ci'][0]:+.2f} to {t['ci'][1]:+.2f}); power {t['power']:.1%} with "
                         f"{t['n']} forgotten, {t['m']} never inserted{need}"))
        if report.oracle is not None:
            o = report.oracle
            same = sum(v["store"] == v["oracle"] for v in o.shards.values())
            rows.append(("retrained oracle", f"{'identical' if o.identical else 'DIFFERENT'}: "
                         f"{same} of {len(o.shards)} shards' weights equal a scratch store's on "
                         f"the {o.records} records left (sha256; trained in {o.seconds:.0f} s)"))
    return rows
