"""What a store learns: the task. The deletion manager, the store and the executor never look inside it.

A task turns stored targets into training targets, gives the model its shape, and aggregates the
shard models' outputs. `ClassificationTask`: labels, soft or hard voting, accuracy.
`LanguageModelingTask`: a causal LM learns the texts (after their prompts, where given); the
ensemble scores and generates text (`sisa.serving`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol

import numpy as np

from sisa.config import Combine, Voting
from sisa.errors import ConfigError, RecordError, StoreError, name_some
from sisa.records import odd_labels
from sisa.reports import EvaluationReport, Scores


@dataclass(frozen=True)
class ModelSpec:
    """Shape of the task, fixed when a store is trained."""

    num_classes: int
    input_dim: int | None = None  # numeric features (or embedding width); None for raw text
    chat: bool = False  # a causal LM's inputs are conversations, formatted by the chat template


class Task(Protocol):
    kind: ClassVar[str]

    def to_meta(self) -> dict[str, Any]:
        """What the store keeps of the task (read back by `task_from_meta`)."""

    def encode_targets(self, values: Sequence[str | None]) -> np.ndarray:
        """Stored targets of a shard's records -> what its model trains on."""

    def check_new(self, targets: Sequence[str | None]) -> list[str]:
        """Problems (empty if none) with the targets of records added to a trained store."""

    def model_spec(self, input_dim: int | None) -> ModelSpec:
        """The shape of each shard's model."""

    def contexts(self, values: Sequence[str | None]) -> list[str | None] | None:
        """What the inputs are conditioned on (a causal LM's prompts), or None."""


def _sort_classes(labels: set[str]) -> tuple[str, ...]:
    try:
        return tuple(sorted(labels, key=lambda x: (float(x), x)))
    except ValueError:
        return tuple(sorted(labels))


@dataclass(frozen=True)
class ClassificationTask:
    """Class labels; the ensemble votes (soft: mean probability; hard: majority, ties broken by the
    mean probability), as scikit-learn's VotingClassifier does."""

    kind: ClassVar[str] = "classification"
    classes: tuple[str, ...]

    @classmethod
    def fit(cls, targets: Sequence[str | None]) -> ClassificationTask:
        """The task of a training set's labels."""
        if any(t is None for t in targets):
            raise RecordError("classification needs a label for every record (name the label column)")
        labels = [t for t in targets if t is not None]
        odd, others = odd_labels(labels)
        if odd:
            shown = name_some(sorted({labels[i] for i in odd}), quote=True)
            raise RecordError(f"labels mix numbers and text: {shown} among {others} ones; fix or "
                              "remove those records")
        classes = _sort_classes(set(labels))
        if len(classes) < 2:
            raise RecordError(f"need at least two classes to train, found {list(classes)}")
        return cls(classes)

    def to_meta(self) -> dict[str, Any]:
        return {"kind": self.kind, "classes": list(self.classes)}

    def model_spec(self, input_dim: int | None) -> ModelSpec:
        return ModelSpec(num_classes=len(self.classes), input_dim=input_dim)

    def contexts(self, values: Sequence[str | None]) -> None:
        return None

    def _index(self) -> dict[str, int]:
        return {c: i for i, c in enumerate(self.classes)}

    def encode_targets(self, values: Sequence[str | None]) -> np.ndarray:
        index = self._index()
        try:
            return np.fromiter((index[v] for v in values), dtype=np.int64,  # type: ignore[index]
                               count=len(values))
        except KeyError as exc:
            raise StoreError(f"a stored record's label {exc} is not among the store's classes "
                             f"{list(self.classes)}; the store is inconsistent") from exc

    def check_new(self, targets: Sequence[str | None]) -> list[str]:
        unknown = sorted({str(t) for t in targets} - set(self.classes))
        if unknown:
            return [f"labels {unknown} are not among the store's classes {list(self.classes)}"]
        return []

    def labels(self, values: Sequence[str | None]) -> np.ndarray:
        """Class indices of labels given for evaluation; an unknown or missing label is an error."""
        if any(v is None for v in values):
            raise RecordError("evaluation data needs a label for every record")
        unknown = sorted({str(v) for v in values} - set(self.classes))
        if unknown:
            raise RecordError(f"labels {name_some(unknown)} are not among the store's classes "
                              f"{list(self.classes)}")
        index = self._index()
        return np.array([index[str(v)] for v in values], dtype=np.int64)

    @staticmethod
    def predict_proba(per_shard: Mapping[int, np.ndarray], voting: Voting) -> np.ndarray:
        """Class probabilities of the ensemble. Soft: the mean of the shards' probabilities. Hard:
        the vote fractions plus the mean probability scaled below one vote, renormalised, so a
        tie goes to the higher mean probability and argmax always equals `predict`."""
        stacked = np.stack(list(per_shard.values()))  # (shards, n, classes)
        soft = stacked.mean(axis=0)
        if voting == "soft":
            return soft
        votes = np.eye(stacked.shape[-1])[stacked.argmax(axis=-1)].mean(axis=0)  # (n, classes)
        # Vote fractions differ by >= 1/S; the added term is < 1/(S+1), so it only breaks ties.
        weight = 1.0 / (stacked.shape[0] + 1)
        return (votes + weight * soft) / (1.0 + weight)

    @classmethod
    def predict(cls, per_shard: Mapping[int, np.ndarray], voting: Voting) -> np.ndarray:
        """Predicted class indices: the argmax of `predict_proba`."""
        return np.asarray(cls.predict_proba(per_shard, voting).argmax(axis=-1))

    def evaluate(self, per_shard: Mapping[int, np.ndarray], y: np.ndarray,
                 voting: Voting) -> EvaluationReport:
        """Accuracy and macro-F1 of the ensemble (soft and hard voting) and of each shard."""
        from sklearn.metrics import f1_score

        def scores(pred: np.ndarray) -> Scores:
            return Scores(accuracy=float((pred == y).mean()),
                          macro_f1=float(f1_score(y, pred, average="macro", zero_division=0)))

        return EvaluationReport(
            examples=len(y),
            voting=voting,
            ensemble=scores(self.predict(per_shard, voting)),
            ensemble_soft=scores(self.predict(per_shard, "soft")),
            ensemble_hard=scores(self.predict(per_shard, "hard")),
            shards={str(s): scores(p.argmax(-1)) for s, p in per_shard.items()},
        )


@dataclass(frozen=True)
class LanguageModelingTask:
    """A causal LM learns each record's text (after its prompt, if the record has one), or the
    assistant turns of each record's conversation (`chat`). Nothing to vote on: the ensemble
    mixes the shards' next-token distributions (see `combine_logprobs`)."""

    kind: ClassVar[str] = "causal_lm"
    chat: bool = False  # the records are conversations (a messages column): see `ModelSpec.chat`

    def to_meta(self) -> dict[str, Any]:
        return {"kind": self.kind, "chat": True} if self.chat else {"kind": self.kind}

    def model_spec(self, input_dim: int | None) -> ModelSpec:
        return ModelSpec(num_classes=0, input_dim=None, chat=self.chat)

    def encode_targets(self, values: Sequence[str | None]) -> np.ndarray:
        # The prompts travel as contexts; the tokens to learn are the inputs themselves.
        return np.zeros(len(values), dtype=np.int64)

    def contexts(self, values: Sequence[str | None]) -> list[str | None]:
        return list(values)

    def check_new(self, targets: Sequence[str | None]) -> list[str]:
        return []


PROMPT_SEPARATOR = "\n"  # between a prompt and the text that follows it


def format_prompt(prompt: str) -> str:
    """A prompt as a causal LM learns (and is asked) what follows it: the prompt, then the
    separator. Training and generation both format it here."""
    return prompt + PROMPT_SEPARATOR


def combine_logprobs(per_shard: np.ndarray | Any, combine: Combine) -> Any:
    """The ensemble's next-token log-distribution from the shards' ones (shards on axis 0, the
    vocabulary last; numpy arrays or torch tensors). `mean`: the mixture of the shards'
    probabilities. `product`: their normalised geometric mean (mean of log-probabilities).
    (`merged` combines weights, not distributions: the scorer runs the merged adapter.)"""
    import torch

    x = torch.as_tensor(per_shard)
    if combine == "mean":
        return torch.logsumexp(x, dim=0) - math.log(x.shape[0])
    if combine == "product":
        return torch.log_softmax(x.mean(dim=0), dim=-1)
    raise ConfigError(f"combine must be 'mean' or 'product' here, got {combine!r}")


AnyTask = ClassificationTask | LanguageModelingTask
TASKS: dict[str, type[ClassificationTask] | type[LanguageModelingTask]] = {
    ClassificationTask.kind: ClassificationTask, LanguageModelingTask.kind: LanguageModelingTask}


def task_from_meta(meta: Mapping[str, Any]) -> AnyTask:
    kind = meta.get("kind")
    if kind not in TASKS:
        raise ConfigError(f"unknown task {kind!r}; this version knows {sorted(TASKS)}")
    if kind == LanguageModelingTask.kind:
        return LanguageModelingTask(chat=bool(meta.get("chat")))
    return ClassificationTask(tuple(meta["classes"]))
