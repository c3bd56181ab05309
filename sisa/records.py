"""Stage 1 of the pipeline: read input records (through `datasets`) and validate them.

Every record gets a stable string id, an optional group id, a target (a class label, or none for a
task that learns its inputs), its input (a text or a tuple of floats) and a content digest; invalid
input raises `RecordError` naming the offending rows.
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import json
import math
import struct
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sisa.config import DataSpec
from sisa.errors import ColumnError, RecordError, name_some
from sisa.partition import GroupId, RecordId

Input = str | tuple[float, ...]

_LOADERS = {".csv": "csv", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}


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
    features: bytes | None = None  # a numeric input, packed (see pack_features); None for text

    @property
    def text(self) -> str | None:
        return self.input if isinstance(self.input, str) else None


def pack_features(inp: Sequence[float]) -> bytes:
    """A numeric input as little-endian float64 bytes: lossless, and nothing to parse."""
    return struct.pack(f"<{len(inp)}d", *inp)


def content_digest(inp: Input, target: str | None, group: str | None, prior: float | None = None,
                   packed: bytes | None = None) -> str:
    """`packed`: pack_features(inp), if the caller has it already."""
    if isinstance(inp, str):
        fields: list[Any] = [inp, target, group] if prior is None else [inp, target, group, prior]
        data = json.dumps(fields, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    else:  # JSON of many floats is slow: the other fields as JSON, then the input's bytes
        fields = ["f8", target, group] if prior is None else ["f8", target, group, prior]
        data = json.dumps(fields, separators=(",", ":")).encode() + b"\0" + (packed or pack_features(inp))
    return hashlib.blake2b(data, digest_size=16).hexdigest()


def input_digest(inp: Input, packed: bytes | None = None, prompt: str | None = None) -> str:
    """The key of an input's cached features. A prompt changes what the model computes for the
    text after it, so it enters the key (and a deletion purges the pair's cached activations)."""
    if prompt is not None and isinstance(inp, str):
        data = json.dumps(["prompt", prompt, inp], separators=(",", ":"), ensure_ascii=False).encode()
    elif isinstance(inp, str):  # the key of a cached embedding: keep it stable across versions
        data = json.dumps(inp, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    else:
        data = b"f8\0" + (packed or pack_features(inp))
    return hashlib.blake2b(data, digest_size=16).hexdigest()


def make_record(record_id: str, group: str | None, target: str | None, inp: Input,
                prior: float | None = None, prompted: bool = False) -> Record:
    """`prompted`: the target is the prompt the input text follows (a causal LM's records)."""
    packed = None if isinstance(inp, str) else pack_features(inp)
    return Record(
        id=RecordId(record_id),
        group=GroupId(group) if group is not None else None,
        target=target,
        input=inp,
        digest=content_digest(inp, target, group, prior, packed),
        input_digest=input_digest(inp, packed, target if prompted else None),
        prior=prior,
        features=packed,
    )


def _name_rows(problem: str, rows: Mapping[str, list[int]] | list[int]) -> str:
    if isinstance(rows, Mapping):
        return f"{problem}: " + name_some(
            f"{key!r} (rows {', '.join(map(str, idx[:5]))})" for key, idx in rows.items())
    return f"{problem}: {name_some(rows)}"


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


def records_from_rows(rows: Iterable[Mapping[str, Any]], spec: DataSpec,
                      require_target: bool = True) -> list[Record]:
    """Validate rows (dicts of column -> value) into records; all problems are reported at once.
    Without `require_target` (records to predict on) the label column may be absent or empty."""
    with paused_gc():
        return _records_from_rows(list(rows), spec, require_target)


def _records_from_rows(rows: list[Mapping[str, Any]], spec: DataSpec,
                       require_target: bool) -> list[Record]:
    if not rows:
        raise RecordError("no records in the input")
    label_column = spec.label_column
    if label_column is not None and not require_target and label_column not in rows[0]:
        label_column = None
    prompt_column = spec.prompt_column  # a causal LM's records: the prompt is the target
    wanted = [spec.id_column, *spec.feature_columns]
    wanted += [c for c in (label_column, spec.text_column, spec.group_column, spec.prior_column,
                           prompt_column) if c is not None]
    missing_columns = [c for c in wanted if c not in rows[0]]
    if missing_columns:
        raise ColumnError(f"input has no column(s) {missing_columns}; it has {sorted(rows[0])}")

    problems: list[str] = []
    empty_ids: list[int] = []
    missing_labels: list[int] = []
    bad_inputs: list[int] = []
    bad_priors: list[int] = []
    bad_prompts: list[int] = []
    seen: dict[str, list[int]] = {}
    records: list[Record] = []
    for row_number, row in enumerate(rows):
        record_id = _canonical_id(row[spec.id_column])
        if not record_id:
            empty_ids.append(row_number)
            continue
        seen.setdefault(record_id, []).append(row_number)
        label = _canonical_label(row[label_column]) if label_column is not None else None
        if prompt_column is not None:
            prompt = row[prompt_column]
            if prompt is not None and not isinstance(prompt, str):
                bad_prompts.append(row_number)
                continue
            label = prompt or None  # an empty prompt: the whole text is learned
        elif label is None and label_column is not None and require_target:
            missing_labels.append(row_number)
            continue
        inp: Input
        if spec.text_column is not None:
            text = row[spec.text_column]
            if not isinstance(text, str) or not text.strip():
                bad_inputs.append(row_number)
                continue
            inp = text
        else:
            try:
                inp = tuple(float(row[c]) for c in spec.feature_columns)
            except (TypeError, ValueError):
                bad_inputs.append(row_number)
                continue
            if not all(math.isfinite(v) for v in inp):
                bad_inputs.append(row_number)
                continue
        group = None
        if spec.group_column is not None:
            group = _canonical_id(row[spec.group_column]) or None
        prior = None
        if spec.prior_column is not None:
            try:
                prior = float(row[spec.prior_column])
            except (TypeError, ValueError):
                prior = math.nan
            if not math.isfinite(prior):
                bad_priors.append(row_number)
                continue
        records.append(make_record(record_id, group, label, inp, prior, prompt_column is not None))

    duplicates = {key: idx for key, idx in seen.items() if len(idx) > 1}
    if duplicates:
        problems.append(_name_rows(f"duplicate ids in column {spec.id_column!r}", duplicates))
    if empty_ids:
        problems.append(_name_rows(f"empty ids in column {spec.id_column!r} at rows", empty_ids))
    if missing_labels:
        problems.append(
            _name_rows(f"missing labels in column {spec.label_column!r} at rows", missing_labels)
        )
    if bad_inputs:
        what = spec.text_column or ",".join(spec.feature_columns)
        problems.append(_name_rows(f"missing or non-numeric inputs in {what!r} at rows", bad_inputs))
    if bad_priors:
        problems.append(
            _name_rows(f"missing or non-numeric priors in {spec.prior_column!r} at rows", bad_priors))
    if bad_prompts:
        problems.append(_name_rows(f"non-text prompts in {prompt_column!r} at rows", bad_prompts))
    if problems:
        raise RecordError("invalid records (nothing was written): " + "; ".join(problems))
    return records


def load_rows(source: Any, spec: DataSpec) -> list[dict[str, Any]]:
    """Rows from a local csv/json(l)/parquet file, a `datasets.Dataset`, or a list of dicts."""
    if isinstance(source, Sequence) and not isinstance(source, str):
        return [dict(r) for r in source]
    if not isinstance(source, (str, Path)):  # a datasets.Dataset (or anything iterable of rows)
        return [dict(r) for r in source]
    path = Path(source)
    if not path.is_file():
        raise RecordError(f"data file {str(path)!r} does not exist")
    loader = _LOADERS.get(path.suffix.lower())
    if loader is None:
        raise RecordError(
            f"cannot read {str(path)!r}: use a .csv, .json, .jsonl or .parquet file"
        )
    import datasets  # heavy import, only when reading files

    kwargs: dict[str, Any] = {}
    if loader == "csv":
        # Ids such as "007" must stay strings: never let the CSV reader parse them as numbers.
        kwargs["converters"] = {c: str for c in (spec.id_column, spec.group_column) if c}
    datasets.disable_progress_bars()
    try:
        dataset = datasets.load_dataset(
            loader, data_files=str(path), split="train", keep_in_memory=True, **kwargs
        )
    except Exception as exc:  # datasets raises many types for malformed files
        raise RecordError(f"cannot read {str(path)!r}: {type(exc).__name__}: {exc}") from exc
    return [dict(r) for r in dataset]


def load_records(source: Any, spec: DataSpec, require_target: bool = True) -> list[Record]:
    """Read and validate records from any supported source."""
    return records_from_rows(load_rows(source, spec), spec, require_target)
