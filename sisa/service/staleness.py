"""Checking a service's answers against its deletion log: was any answer given, after a deletion
was acknowledged, by a checkpoint that still held the deleted record?

A client records, for every answer, when it sent the request and which checkpoint of each shard
served it (the `model.shards` of the response), and for every deletion when its `202` arrived and
its receipt (once applied). A shard's checkpoints follow one another in the receipts' order; each
one live before a deletion's retrained checkpoint may hold the deleted record. An answer is stale
if its request was sent after a deletion's `202` arrived and it used such a checkpoint of one of
that deletion's shards. Times are the client's own clock (any monotonic one, the same for both).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Answer:
    sent: float  # when the request was sent
    shards: Mapping[str, str]  # shard -> sha256 of the weights that served (the response's)


@dataclass(frozen=True)
class Deletion:
    acknowledged: float  # when the 202 arrived
    shards: Sequence[int]
    receipt: Mapping[str, Any] | None  # as GET /v1/deletions/{id} returns it once applied


@dataclass
class Staleness:
    stale: int = 0  # answers from a checkpoint that held an acknowledged deletion
    unapplied: int = 0  # deletions without a receipt: their later answers cannot be judged
    examples: list[dict[str, Any]] = field(default_factory=list)  # the first few stale answers


def history(deletions: Iterable[Deletion]) -> dict[str, list[str]]:
    """Per shard, its live checkpoints' sha256 in the order they served (from the receipts)."""
    receipts = sorted((d.receipt for d in deletions if d.receipt), key=lambda r: r.get("sequence") or 0)
    shas: dict[str, list[str]] = {}
    for receipt in receipts:
        for shard, change in receipt.get("checkpoints_changed", {}).items():
            seen = shas.setdefault(shard, [])
            for sha in (change.get("before"), change.get("after")):
                if sha and sha not in seen:
                    seen.append(sha)
    return shas


def check(answers: Iterable[Answer], deletions: Sequence[Deletion], examples: int = 5) -> Staleness:
    """Count the stale answers (the goal: none)."""
    shas = history(deletions)
    result = Staleness(unapplied=sum(1 for d in deletions if not d.receipt))
    # Per deletion and shard: the checkpoints that may hold its record (every one before its own).
    tainted: list[tuple[float, dict[str, set[str]]]] = []
    for d in deletions:
        if not d.receipt:
            continue
        changed = d.receipt.get("checkpoints_changed", {})
        bad: dict[str, set[str]] = {}
        for shard in map(str, d.shards):
            after = (changed.get(shard) or {}).get("after")
            order = shas.get(shard, [])
            bad[shard] = set(order[:order.index(after)] if after in order else order)
        tainted.append((d.acknowledged, bad))
    tainted.sort(key=lambda t: t[0])
    for answer in answers:
        for acknowledged, bad in tainted:
            if acknowledged >= answer.sent:
                break
            hit = [s for s, sha in answer.shards.items() if sha in bad.get(s, ())]
            if hit:
                result.stale += 1
                if len(result.examples) < examples:
                    result.examples.append({"sent": answer.sent, "acknowledged": acknowledged,
                                            "shards": hit})
                break
    return result
