"""Typed results of the library's reporting calls; `to_dict()` is what `--json` prints."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any


class _Dict:
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)  # type: ignore[call-overload]


@dataclass(frozen=True)
class Scores(_Dict):
    accuracy: float
    macro_f1: float


@dataclass(frozen=True)
class EvaluationReport(_Dict):
    examples: int
    voting: str  # the store's voting, used for `ensemble`
    ensemble: Scores
    ensemble_soft: Scores
    ensemble_hard: Scores
    shards: dict[str, Scores]  # each shard model on its own


@dataclass(frozen=True)
class ShardStatus(_Dict):
    shard: int
    live_slice: int | None
    checkpoint_key: str | None
    weights_path: str | None
    sha256: str | None
    live_records: int
    deleted_records: int
    deletion_pending: bool
    current: bool  # the live checkpoint is trained on the shard's records as they are now
    problem: str | None = None  # why its live checkpoint may not serve (damage), if it may not


@dataclass(frozen=True)
class StatusReport(_Dict):
    store: str
    config: dict[str, Any]
    config_digest: str  # of the config and any base model: what every manifest records
    task: dict[str, Any]
    live_records: int
    deleted_records: int
    deletion_requests: int
    pending_deletions: list[str]
    clean_shards: list[int]  # no acknowledged deletion pending against them
    checkpoints: int
    embeddings_cached: int
    shards: list[ShardStatus]
    model_version: str  # digest of the live checkpoints that serve
    key_outside: bool = False  # the ledger key is kept outside the store
    witnessed: bool = False  # a witness outside the store was checked
    data_spec: dict[str, Any] = field(default_factory=dict)  # the columns training read
    reads: list[str] = field(default_factory=list)  # the columns a prediction's input needs


@dataclass(frozen=True)
class Violation(_Dict):
    shard: int | None
    slice: int | None
    key: str | None
    path: str | None
    problem: str


@dataclass(frozen=True)
class AuditReport(_Dict):
    ok: bool
    checkpoints_checked: int
    violations: list[Violation] = field(default_factory=list)
    records_checked: int = 0  # live records whose content was re-digested
    receipts_checked: int = 0  # links of the receipt chain re-verified
    receipt_head: str | None = None  # digest of the last receipt: keep it to detect a rewrite
    warnings: list[str] = field(default_factory=list)  # what weakens the proof without breaking it


@dataclass(frozen=True)
class ReceiptsReport(_Dict):
    """`sisa receipts verify`: the receipt chain re-checked against the store."""

    ok: bool
    receipts: int  # chained receipts checked
    unchained: int  # applied before the chain existed (schema 4): not covered
    pending: int  # acknowledged, not yet applied: no receipt yet
    head: str | None  # digest of the last receipt
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class RecordScore(_Dict):
    id: str
    tokens: int  # learned tokens (after the prompt, if any)
    logprob: float  # their summed log-probability under the ensemble
    perplexity: float


@dataclass(frozen=True)
class ScoreReport(_Dict):
    combine: str
    records: list[RecordScore]
    tokens: int
    perplexity: float  # over all tokens of all records
    model_version: str
    shards: list[int]  # the shards that served


@dataclass(frozen=True)
class Generation(_Dict):
    prompt: str
    text: str
    tokens: int
    model_version: str
    shards: list[int]  # the shards that served
