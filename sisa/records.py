"""Stage 1 of the pipeline: validate input records, a chunk of columns at a time (see
`sisa.sources` for the reading).

Every record gets a stable string id, an optional group id, a target (a class label, or none for a
task that learns its inputs), its input (a text or a tuple of floats) and a content digest; invalid
input raises `RecordError` naming the offending rows, after the whole input was read, so that it
names every problem at once.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import hashlib
import json
import math
import numbers
import re
import struct
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from sisa.config import DataSpec, PartitionConfig, SisaConfig
from sisa.errors import MAX_NAMED, ColumnError, ConfigError, RecordError, name_some
from sisa.partition import GroupId, RecordId
from sisa.sources import CHUNK_ROWS, POSITIONS, Chunk, Numbering, Wanted, open_source

Input = str | tuple[float, ...]

# The largest float32: the models compute in float32, so a larger feature becomes inf (then NaN).
FLOAT32_MAX = 3.4028234663852886e38
# Control characters (C0, DEL, C1): an id holding one cannot be typed on a command line, and may
# hide in a log line; refused in ids and group ids.
CONTROL = re.compile("[\x00-\x1f\x7f-\x9f]")


def feature_problems(features: np.ndarray) -> tuple[list[bool], list[bool]]:
    """Per row of a (rows, features) float64 matrix: whether every value is finite, and whether
    any is beyond float32's range (the models compute in float32)."""
    rows = len(features)
    finite, huge = [True] * rows, [False] * rows
    if not features.size:
        return finite, huge
    # A row within float32's range both ways is finite and not huge (NaN fails both comparisons,
    # and max and min carry it): two reductions over the matrix, and no temporary of its size.
    inside = (features.max(axis=1) <= FLOAT32_MAX) & (features.min(axis=1) >= -FLOAT32_MAX)
    odd = np.flatnonzero(~inside)
    if odd.size:
        rest = features[odd]
        for i, ok, big in zip(odd.tolist(), np.isfinite(rest).all(axis=1).tolist(),
                              (np.abs(rest) > FLOAT32_MAX).any(axis=1).tolist(), strict=True):
            finite[i], huge[i] = ok, big
    return finite, huge


@contextlib.contextmanager
def paused_gc() -> Iterator[None]:
    """Build many small objects without the cycle collector rescanning them over and over (it
    made building a 200k-record shard's members five times slower); reference counting still
    frees memory."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


@dataclass(frozen=True, slots=True)
class Record:
    id: RecordId
    group: GroupId | None
    # A class label (canonical string form), or a causal LM's prompt; None where there is none.
    target: str | None
    input: Input
    digest: str  # digest of (input, target, group[, prior]): a changed record is another record
    input_digest: str  # digest of the input alone: the key of its cached embedding
    prior: float | None = None  # how likely the record is to be deleted (deletion-aware placement)
    features: bytes | memoryview | None = None  # a numeric input, packed (see pack_features); None for text

    @property
    def text(self) -> str | None:
        return self.input if isinstance(self.input, str) else None


def pack_features(inp: Sequence[float]) -> bytes:
    """A numeric input as little-endian float64 bytes: lossless, and nothing to parse."""
    return struct.pack(f"<{len(inp)}d", *inp)


def _digest(data: bytes, *more: bytes | memoryview) -> str:
    """The digest of `data` and then `more` (as of their concatenation, which is not made)."""
    digest = hashlib.blake2b(data, digest_size=16)
    for part in more:
        digest.update(part)
    return digest.hexdigest()


def features_prefix(target: str | None, group: str | None, prior: float | None) -> bytes:
    """What a numeric record's content digest covers before its input's bytes: the other fields
    as JSON (JSON of many floats is slow)."""
    fields = ["f8", target, group] if prior is None else ["f8", target, group, prior]
    return json.dumps(fields, separators=(",", ":")).encode() + b"\0"


def content_digest(inp: Input, target: str | None, group: str | None, prior: float | None = None,
                   packed: bytes | memoryview | None = None) -> str:
    """`packed`: pack_features(inp), if the caller has it already."""
    if isinstance(inp, str):
        fields: list[Any] = [inp, target, group] if prior is None else [inp, target, group, prior]
        return _digest(json.dumps(fields, separators=(",", ":"), ensure_ascii=False).encode("utf-8"))
    return _digest(features_prefix(target, group, prior), packed or pack_features(inp))


def input_digest(inp: Input, packed: bytes | memoryview | None = None, prompt: str | None = None,
                 messages: bool = False) -> str:
    """The key of an input's cached features. A prompt changes what the model computes for the
    text after it, so it enters the key (and a deletion purges the pair's cached activations).
    `messages`: the input is a conversation's canonical JSON (`conversation`), marked as such."""
    if messages and isinstance(inp, str):
        data = json.dumps(["messages", inp], separators=(",", ":"), ensure_ascii=False).encode()
    elif prompt is not None and isinstance(inp, str):
        data = json.dumps(["prompt", prompt, inp], separators=(",", ":"), ensure_ascii=False).encode()
    elif isinstance(inp, str):  # the key of a cached embedding: keep it stable across versions
        data = json.dumps(inp, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    else:
        return _digest(b"f8\0", packed or pack_features(inp))
    return _digest(data)


ROLES = ("system", "user", "assistant")


def conversation(value: Any) -> tuple[str | None, str]:
    """A messages column's value (a list of {"role", "content"} mappings, or that list as JSON
    text, as a CSV holds it) as its canonical JSON text, and "", or None and what is wrong with
    it. Only `role` and `content` are read (and kept). A problem names no content: a message must
    not carry a record's words."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None, "no messages"
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            return None, "not a JSON list of messages (invalid JSON)"
    if isinstance(value, np.ndarray):  # a DataFrame cell Arrow made
        value = value.tolist()
    if not isinstance(value, (list, tuple)):
        return None, f"not a list of messages ({_what(value)})"
    if not value:
        return None, "no messages"
    out = []
    for k, message in enumerate(value, 1):
        if not isinstance(message, Mapping):
            return None, f"message {k} is not an object with a role and a content"
        role, content = message.get("role"), message.get("content")
        if role is None:
            return None, f"message {k} has no 'role'"
        if not isinstance(role, str):
            return None, f"message {k}'s role is not text (use system, user or assistant)"
        if role not in ROLES:
            shown = repr(role if len(role) <= 20 else role[:20] + "...")
            return None, f"message {k} has an unknown role {shown} (use system, user or assistant)"
        if content is None:
            return None, f"message {k} has no 'content'"
        if not isinstance(content, str):
            return None, f"message {k}'s content is not text ({_what(content)})"
        out.append({"role": role, "content": content})
    if not any(m["role"] == "assistant" for m in out):
        return None, "no assistant message (the loss covers the assistant turns: nothing to learn)"
    return json.dumps(out, ensure_ascii=False, separators=(",", ":")), ""


def _what(value: Any) -> str:
    """What a JSON value is, for a message that must not quote it."""
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, numbers.Number):
        return "a number"
    if isinstance(value, str):
        return "text"
    if isinstance(value, Mapping):
        return "an object"
    return "a list" if isinstance(value, (list, tuple)) else f"a {type(value).__name__}"


def parse_conversation(text: str) -> list[dict[str, str]]:
    """The messages of a stored conversation (`conversation`'s canonical JSON)."""
    messages: list[dict[str, str]] = json.loads(text)
    return messages


def _name_rows(problem: str, rows: Mapping[str, list[int]], units: str, line: Mapping[int, int]) -> str:
    return f"{problem}: " + name_some(
        f"{key!r} ({units} {', '.join(str(line[i]) for i in idx[:5])})" for key, idx in rows.items())


_KINDS = {bool: "boolean", list: "list", tuple: "list", dict: "object"}
_PLAIN = frozenset({str, int, float, type(None)})  # the common case, checked at C speed


def _odd_kind(value: Any) -> str | None:
    """What a value is when it is neither a number nor text (nor missing): "boolean", "list",
    "object", ...; None for a value the columns accept. A JSON `true` must not become the class
    'True' or the feature 1.0."""
    if value is None or isinstance(value, str):
        return None
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        return None
    return _KINDS.get(type(value), type(value).__name__)


def _is_number(label: str) -> bool:
    try:
        return math.isfinite(float(label))
    except ValueError:
        return False


def odd_labels(labels: Sequence[str]) -> tuple[list[int], str]:
    """Where labels mix numbers and text (a stray 'cat' among 0, 1, 2): the positions of the
    fewer kind and what the others are ("numeric" or "text"); ([], "") when they do not mix."""
    numeric = [i for i, label in enumerate(labels) if _is_number(label)]
    if not numeric or len(numeric) == len(labels):
        return [], ""
    text = sorted(set(range(len(labels))) - set(numeric))
    return (text, "numeric") if len(text) <= len(numeric) else (numeric, "text")


def _canonical_label(value: Any) -> str | None:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    text = str(value).strip()
    return text or None


def _canonical_id(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return str(value).strip()


class _Few:
    """The first few of many items (for an error message) and how many there were."""

    __slots__ = ("count", "items")

    def __init__(self) -> None:
        self.items: list[Any] = []
        self.count = 0

    def add(self, item: Any) -> None:
        self.count += 1
        if len(self.items) < MAX_NAMED:
            self.items.append(item)

    def __bool__(self) -> bool:
        return self.count > 0

    def named(self, show: Callable[[Any], str] = str) -> str:
        return name_some([show(i) for i in self.items], total=self.count)

    def rows(self) -> list[int]:
        """The input rows its items name (an item is a row, or a tuple that starts with one)."""
        return [i if isinstance(i, int) else i[0] for i in self.items]


@dataclass
class Batch:
    """The valid records of one chunk of the input, as columns, in input order."""

    ids: list[str]
    groups: list[str | None]
    targets: list[str | None]  # labels, or a causal LM's prompts
    inputs: list[str] | np.ndarray  # texts, or (n, features) float64
    priors: list[float | None]
    digests: list[str]
    input_digests: list[str]
    # Each row of numeric inputs as pack_features gives it (a view of the batch's matrix).
    packed: list[bytes | memoryview] | None
    # Each record's number (its line in a file with no blank line or multi-line field; messages
    # read the file again for the exact line: `sisa.sources.Numbering`), and whether the ids
    # came from the input (records to predict on may have none: their ids are these numbers).
    rows: list[int] = dataclasses.field(default_factory=list)
    has_ids: bool = True

    def __len__(self) -> int:
        return len(self.ids)

    def input(self, i: int) -> Input:
        if isinstance(self.inputs, np.ndarray):
            return tuple(self.inputs[i].tolist())
        return self.inputs[i]

    def records(self) -> list[Record]:
        packed = self.packed
        return [Record(RecordId(self.ids[i]), GroupId(g) if (g := self.groups[i]) is not None else None,
                       self.targets[i], self.input(i), self.digests[i], self.input_digests[i],
                       self.priors[i], None if packed is None else packed[i])
                for i in range(len(self.ids))]


def prediction_spec(spec: DataSpec, labelled: bool = False) -> DataSpec:
    """The columns a model's input has when it is asked about records (predict, evaluate, score):
    the features or text (and a causal LM's prompt); the label only to evaluate. Group and prior
    only place training records."""
    return dataclasses.replace(spec, group_column=None, prior_column=None,
                               label_column=spec.label_column if labelled else None)


class Validator:
    """Validates an input chunk by chunk into batches of records; `finish` raises one
    `RecordError` naming every problem (so a caller writes nothing until it returns). Whole-input
    checks (duplicate ids, labels that mix numbers and text) span the chunks.

    Without `require_target`, the records are to be predicted on: only the model's input columns
    must be there (`prediction_spec`; the label too where `labelled`, to evaluate); an id column
    is optional and its ids are carried, unchecked (rows without one are numbered). `numbering`
    says how messages name rows (a file's lines, a table's positions)."""

    def __init__(self, spec: DataSpec, columns: Sequence[str], require_target: bool = True,
                 labelled: bool = False, numbering: Numbering = POSITIONS):
        if not columns:
            raise RecordError("no records in the input")
        present = set(columns)
        if not require_target:
            spec = prediction_spec(spec, labelled)
            if labelled and spec.label_column is not None and spec.label_column not in present:
                raise ColumnError(f"evaluating needs each record's label: the input has no label "
                                  f"column {spec.label_column!r}; it has {sorted(columns)}")
        label_column = spec.label_column
        self.spec = spec
        self.label_column = label_column
        self.require_target = require_target or labelled
        self.predicting = not require_target
        self.has_ids = require_target or spec.id_column in present
        self.numbering = numbering
        self.prompted = spec.prompt_column is not None
        wanted = [spec.id_column] if self.has_ids else []
        wanted += [*spec.feature_columns]
        wanted += [c for c in (label_column, spec.text_column, spec.group_column, spec.prior_column,
                               spec.prompt_column, spec.messages_column) if c is not None]
        missing = [c for c in wanted if c not in present]
        if missing:
            raise ColumnError(f"input has no column(s) {missing}; it has {sorted(columns)}")
        # Columns whose values must be numbers or text (the text and prompt columns check their own).
        self.checked = list(dict.fromkeys(
            c for c in (spec.id_column if self.has_ids else None, label_column, spec.group_column,
                        spec.prior_column)
            if c is not None and c != spec.prompt_column))
        self.rows = 0
        self.seen: dict[str, int] = {}  # id -> its first row
        self.duplicates: dict[str, list[int]] = {}
        self.odd_values: dict[str, _Few] = {}
        self.empty_ids, self.missing_labels, self.bad_inputs = _Few(), _Few(), _Few()
        self.empty_texts = _Few()
        self.bad_messages = _Few()  # (row, record id or None, what is wrong)
        self.bad_features: dict[str, _Few] = {}  # feature column -> rows missing or not a number
        self.huge_features: dict[str, _Few] = {}  # feature column -> rows beyond float32
        self.bad_priors, self.bad_prompts = _Few(), _Few()
        self.control_ids, self.control_groups = _Few(), _Few()
        self.label_kinds = {True: _Few(), False: _Few()}  # numeric?: (row, id, label)
        self._numeric: dict[str, bool] = {}

    @property
    def failed(self) -> bool:
        return bool(self.duplicates or any(self._row_fews())
                    or (self.label_kinds[True] and self.label_kinds[False]))

    def _odd(self, column: str, row: int, raw_id: Any, kind: str) -> None:
        # The value itself is not quoted: a message must not carry a record's content.
        named = self.has_ids and _odd_kind(raw_id) is None and _canonical_id(raw_id)
        self.odd_values.setdefault(column, _Few()).add((row, _canonical_id(raw_id) if named else None,
                                                        kind))

    def _bad_features(self, row: int, values: np.ndarray) -> None:
        """Name the columns of a row whose features are missing, not numbers, or too large."""
        columns = self.spec.feature_columns
        for j in np.flatnonzero(~np.isfinite(values)).tolist():
            self.bad_features.setdefault(columns[j], _Few()).add(row)
        for j in np.flatnonzero(np.abs(values) > FLOAT32_MAX).tolist():
            self.huge_features.setdefault(columns[j], _Few()).add(row)

    def feed(self, chunk: Chunk) -> Batch:
        with paused_gc():
            return self._feed(chunk)

    def _feed(self, chunk: Chunk) -> Batch:
        spec, n, values = self.spec, chunk.size, chunk.values
        base = chunk.start  # rows are counted from 0 here; messages name them (`finish`)
        self.rows += n
        raw_ids = values[spec.id_column] if self.has_ids else [None] * n
        skip = np.zeros(n, dtype=bool)
        for column in self.checked:
            col = values[column]
            if not _PLAIN.issuperset(map(type, col)):
                for i, v in enumerate(col):
                    if kind := _odd_kind(v):
                        self._odd(column, base + i, raw_ids[i], kind)
                        skip[i] = True
        for column, found in chunk.odd_features.items():
            for i, v in found:
                self._odd(column, base + i, raw_ids[i], _odd_kind(v) or type(v).__name__)
                skip[i] = True
        features = chunk.features
        finite: list[bool] = []
        huge: list[bool] = []
        if features is not None:  # per row, as Python lists: the loop below reads them fast
            finite, huge = feature_problems(features)
        skipped = skip.tolist()
        labels = values.get(self.label_column) if self.label_column is not None else None
        prompts = values.get(spec.prompt_column) if spec.prompt_column is not None else None
        texts = values.get(spec.text_column) if spec.text_column is not None else None
        messages = values.get(spec.messages_column) if spec.messages_column is not None else None
        canonical: list[str | None] = [None] * n if messages is not None else []
        groups = values.get(spec.group_column) if spec.group_column is not None else None
        priors = values.get(spec.prior_column) if spec.prior_column is not None else None
        keep: list[int] = []
        rows: list[int] = []
        ids: list[str] = []
        out_groups: list[str | None] = []
        targets: list[str | None] = []
        out_priors: list[float | None] = []
        for i in range(n):
            if skipped[i]:
                continue
            row = base + i
            if self.predicting:  # ids are only carried (or the row numbered)
                record_id = _canonical_id(raw_ids[i]) if self.has_ids else str(row + self.numbering.first)
                if CONTROL.search(record_id):  # it would be printed: no escape reaches a terminal
                    self.control_ids.add(row)
                    continue
            else:
                record_id = _canonical_id(raw_ids[i])
                if not record_id:
                    self.empty_ids.add(row)
                    continue
                if CONTROL.search(record_id):
                    self.control_ids.add(row)
                    continue
                first = self.seen.setdefault(record_id, row)
                if first != row:
                    self.duplicates.setdefault(record_id, [first]).append(row)
            label = _canonical_label(labels[i]) if labels is not None else None
            if prompts is not None:
                prompt = prompts[i]
                if prompt is not None and not isinstance(prompt, str):
                    self.bad_prompts.add(row)
                    continue
                label = prompt or None  # an empty prompt: the whole text is learned
            elif label is None and labels is not None and self.require_target:
                self.missing_labels.add(row)
                continue
            elif label is not None and self.require_target:
                numeric = self._numeric.get(label)
                if numeric is None:
                    numeric = self._numeric[label] = _is_number(label)
                self.label_kinds[numeric].add((row, record_id, label))
            if messages is not None:
                text, problem = conversation(messages[i])
                if text is None:
                    self.bad_messages.add((row, record_id if self.has_ids else None, problem))
                    continue
                canonical[i] = text  # the record's input: the conversation's canonical JSON
            elif texts is not None:
                text = texts[i]
                if not isinstance(text, str):
                    self.bad_inputs.add(row)
                    continue
                if not text.strip():
                    self.empty_texts.add(row)
                    continue
            elif not finite[i] or huge[i]:
                assert features is not None
                self._bad_features(row, features[i])
                continue
            group = None
            if groups is not None:
                group = _canonical_id(groups[i]) or None
                if group is not None and CONTROL.search(group):
                    self.control_groups.add(row)
                    continue
            prior = None
            if priors is not None:
                try:
                    prior = float(priors[i])
                except (TypeError, ValueError, OverflowError):
                    prior = math.nan
                if not math.isfinite(prior):
                    self.bad_priors.add(row)
                    continue
                prior = prior + 0.0  # -0.0 becomes 0.0: SQLite stores it so, and the digest must agree
            keep.append(i)
            rows.append(row)
            ids.append(record_id)
            out_groups.append(group)
            targets.append(label)
            out_priors.append(prior)
        batch = self._digested(keep, ids, out_groups, targets, out_priors,
                               canonical if messages is not None else texts, features)
        first = self.numbering.first
        batch.rows, batch.has_ids = [r + first for r in rows], self.has_ids
        return batch

    def _digested(self, keep: list[int], ids: list[str], groups: list[str | None],
                  targets: list[str | None], priors: list[float | None], texts: list[Any] | None,
                  features: np.ndarray | None) -> Batch:
        prompted = self.prompted
        if self.predicting and not prompted:  # nothing is stored or cached: no digest is needed
            none = [""] * len(keep)
            inputs: list[Any] | np.ndarray = [texts[i] for i in keep] if texts is not None else \
                np.ascontiguousarray(features[keep] if features is not None else [], dtype="<f8")
            return Batch(ids, groups, targets, inputs, priors, none, none, None)
        if texts is not None:
            kept = [texts[i] for i in keep]
            digests = [content_digest(t, y, g, p) for t, y, g, p in zip(kept, targets, groups, priors,
                                                                       strict=True)]
            chat = self.spec.messages_column is not None
            input_digests = [input_digest(t, None, y if prompted else None, chat)
                             for t, y in zip(kept, targets, strict=True)]
            return Batch(ids, groups, targets, kept, priors, digests, input_digests, None)
        assert features is not None
        # Every row kept (the usual case): the matrix itself, if already row-major float64.
        matrix = np.ascontiguousarray(features if len(keep) == len(features) else features[keep],
                                      dtype="<f8")
        width = matrix.shape[1] * 8
        # Each row's bytes are a read-only view of the matrix, not a copy: a copy per record is
        # the records' size again in small allocations, each page of them a fresh page fault.
        matrix.flags.writeable = False
        flat = matrix.reshape(-1).view(np.uint8).data
        packed: list[bytes | memoryview] = [flat[k:k + width] for k in range(0, len(flat), width)]
        prefixes: dict[tuple[Any, ...], bytes] = {}  # one per (label, group, prior), made once
        digests = []
        for y, g, p, row in zip(targets, groups, priors, packed, strict=True):
            prefix = prefixes.get((y, g, p))
            if prefix is None:
                prefix = prefixes[(y, g, p)] = features_prefix(y, g, p)
            digests.append(_digest(prefix, row))
        input_digests = [input_digest((), row) for row in packed]
        return Batch(ids, groups, targets, matrix, priors, digests, input_digests, packed)

    def _row_fews(self) -> list[_Few]:
        """Every problem found row by row (the labels' kinds aside: they are a problem together)."""
        return [*self.odd_values.values(), self.empty_ids, self.control_ids, self.control_groups,
                self.missing_labels, self.bad_inputs, self.empty_texts, self.bad_messages,
                *self.bad_features.values(),
                *self.huge_features.values(), self.bad_priors, self.bad_prompts]

    def finish(self) -> None:
        """Raise the input's problems, if any."""
        spec = self.spec
        self.seen = {}  # every id was checked: free them (a million ids hold about 100 MB)
        if not self.rows:
            raise RecordError("no records in the input")
        problems: list[str] = []
        units, unit = self.numbering.units, self.numbering.unit
        shown = {r for few in [*self._row_fews(), *self.label_kinds.values()] for r in few.rows()}
        shown.update(r for idx in self.duplicates.values() for r in idx[:5])
        line = self.numbering.lines(shown) if self.failed else {}  # the file is read again only here

        def at(row: int) -> str:
            return str(line[row])

        def at_rows(what: str, few: _Few) -> None:
            if few:
                problems.append(f"{what} at {units}: {few.named(at)}")

        def odd(item: tuple[int, str | None, str]) -> str:
            row, record_id, kind = item
            where = f"{unit} {at(row)}" if record_id is None else f"record {record_id!r} ({unit} {at(row)})"
            return f"{where}: {kind}"

        for column, places in self.odd_values.items():
            problems.append(f"column {column!r} holds values that are neither numbers nor text (give "
                            f"numbers or text there): {places.named(odd)}")
        if self.duplicates:
            problems.append(_name_rows(f"duplicate ids in column {spec.id_column!r}", self.duplicates,
                                       units, line))
        at_rows(f"empty ids in column {spec.id_column!r}", self.empty_ids)
        at_rows(f"ids with control characters (which no command line can name) in column "
                f"{spec.id_column!r}", self.control_ids)
        at_rows(f"group ids with control characters in column {spec.group_column!r}",
                self.control_groups)
        at_rows(f"missing labels in column {spec.label_column!r}", self.missing_labels)
        at_rows(f"missing or non-text values in text column {spec.text_column!r}", self.bad_inputs)
        at_rows(f"empty texts in column {spec.text_column!r}", self.empty_texts)
        if self.bad_messages:
            problems.append(
                f"invalid conversations in messages column {spec.messages_column!r} (each must be a "
                "list of {\"role\", \"content\"} messages, roles system, user or assistant, content "
                f"text, at least one assistant message): {self.bad_messages.named(odd)}")
        for column, places in self.bad_features.items():
            at_rows(f"missing or non-numeric values in feature column {column!r}", places)
        for column, places in self.huge_features.items():
            at_rows(f"values beyond float32's range (|x| > {FLOAT32_MAX:.3g}) in feature column "
                    f"{column!r}", places)
        numeric, text = self.label_kinds[True], self.label_kinds[False]
        if numeric and text:
            stray, others, kind = (text, "numeric", "text") if text.count <= numeric.count else (
                numeric, "text", "numeric")
            problems.append(
                f"labels in column {self.label_column!r} mix numbers and text: {kind} label(s) "
                + name_some([f"{label!r} (record {rid!r}, {unit} {at(row)})"
                             for row, rid, label in stray.items],
                            total=stray.count)
                + f" among {numeric.count + text.count - stray.count} {others} ones; fix or remove "
                "those rows")
        at_rows(f"missing or non-numeric priors in {spec.prior_column!r}", self.bad_priors)
        at_rows(f"non-text prompts in {spec.prompt_column!r}", self.bad_prompts)
        if problems:
            what = "invalid input (nothing was predicted)" if self.predicting else \
                "invalid records (nothing was written)"
            raise RecordError(f"{what}: " + "; ".join(problems))


class Ingest:
    """An input read chunk by chunk into validated batches. Iterating yields the batches (none
    after the first problem) and ends by raising the input's problems, if any; `column_names` are
    the input's."""

    def __init__(self, source: Any, spec: DataSpec, require_target: bool = True,
                 rows_per_chunk: int = CHUNK_ROWS, labelled: bool = False):
        read = spec if require_target else prediction_spec(spec, labelled)
        self._source = open_source(source, wanted(read), rows_per_chunk)
        self.column_names = self._source.columns
        self.validator = Validator(spec, self.column_names, require_target, labelled,
                                   self._source.numbering)
        self.spec = self.validator.spec

    def __iter__(self) -> Iterator[Batch]:
        for chunk in self._source.chunks():
            batch = self.validator.feed(chunk)
            if len(batch) and not self.validator.failed:
                yield batch
        self.validator.finish()


def records_from_rows(rows: Iterable[Mapping[str, Any]], spec: DataSpec,
                      require_target: bool = True, labelled: bool = False) -> list[Record]:
    """Validate rows (dicts of column -> value) into records; all problems are reported at once.
    Without `require_target`: records to predict on (see `Validator`)."""
    return load_records(list(rows), spec, require_target, labelled)


def load_records(source: Any, spec: DataSpec, require_target: bool = True,
                 labelled: bool = False) -> list[Record]:
    """Read and validate records from any supported source (all in memory: for small inputs;
    `Ingest` streams)."""
    return [r for batch in Ingest(source, spec, require_target, labelled=labelled)
            for r in batch.records()]


def check_partition(records: Sequence[Record], config: SisaConfig | PartitionConfig) -> None:
    """Refuse a partition these records cannot fill (see `check_counts`)."""
    groups = len({r.group for r in records if r.group is not None})
    ungrouped = sum(r.group is None for r in records)
    check_counts(len(records), ungrouped + groups, groups, config)


def check_counts(records: int, units: int, groups: int, config: SisaConfig | PartitionConfig) -> None:
    """Refuse a partition the records cannot fill: more shards than placement `units` (a group
    stays in one shard, so a group is one unit, and each ungrouped record another), or more slices
    than records. Call it before a store is complete: such shards (slices) would train on nothing."""
    partition = config.partition if isinstance(config, SisaConfig) else config
    problems = []
    if partition.shards > units:
        what = f"{records} records" if not groups else (
            f"{records} records in {units} placement units ({groups} groups, a group stays in "
            "one shard, and the ungrouped records)")
        problems.append(f"shards={partition.shards} is more than the data can fill: there are {what}; "
                        f"give shards <= {units}")
    if partition.slices > records:
        problems.append(f"slices={partition.slices} is more than the {records} records: every "
                        f"shard would have empty slices; give slices <= {records}")
    if problems:
        raise ConfigError("invalid partition for this data (nothing was written): "
                          + "; ".join(problems))


def empty_shards(placed: Iterable[int], shards: int) -> list[int]:
    """The shards of 0..shards-1 that no record was placed in (`placed`: each record's shard)."""
    return sorted(set(range(shards)) - set(placed))


def wanted(spec: DataSpec) -> Wanted:
    """The columns of the input that the spec reads, as the readers take them."""
    named = [spec.id_column, spec.label_column, spec.text_column, spec.group_column,
             spec.prior_column, spec.prompt_column, spec.messages_column]
    return Wanted(tuple(dict.fromkeys(c for c in named if c is not None)), spec.feature_columns)


def spec_columns(spec: DataSpec) -> list[str]:
    """Every column the data spec reads."""
    named = [spec.id_column, spec.label_column, spec.text_column, *spec.feature_columns,
             spec.group_column, spec.prior_column, spec.prompt_column, spec.messages_column]
    return list(dict.fromkeys(c for c in named if c is not None))


def unused_columns(source: Any, spec: DataSpec) -> list[str]:
    """Columns of the input that the spec does not read, in input order. `source`: rows (dicts of
    column -> value; the union of their keys) or a table with `column_names` (a
    `datasets.Dataset`, a `pyarrow.Table`)."""
    names = getattr(source, "column_names", None)
    if names is None:
        names = dict.fromkeys(key for row in source for key in row)
    used = set(spec_columns(spec))
    return [str(c) for c in names if c not in used]


def refuse_new_columns(source: Any, spec: DataSpec, known: Iterable[str] = ()) -> None:
    """Raise when the input has a column the spec does not read and that is not in `known` (the
    unused columns the store's training data had): `add` must not drop a column silently."""
    allowed = set(known)
    new = [c for c in unused_columns(source, spec) if c not in allowed]
    if new:
        raise RecordError(
            f"input has column(s) {name_some(new, quote=True)} that the store's data spec does not "
            f"read (it reads {name_some(spec_columns(spec), quote=True)}); nothing was written: "
            "remove them, or train a store whose data spec names them")
