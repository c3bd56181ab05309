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
import logging
import math
import numbers
import struct
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sisa.config import DataSpec, PartitionConfig, SisaConfig
from sisa.errors import ColumnError, ConfigError, RecordError, name_some
from sisa.partition import GroupId, RecordId

Input = str | tuple[float, ...]

_LOADERS = {".csv": "csv", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}
# The largest float32: the models compute in float32, so a larger feature becomes inf (then NaN).
FLOAT32_MAX = 3.4028234663852886e38


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
    if prior is not None:
        prior = prior + 0.0  # -0.0 becomes 0.0: SQLite stores it so, and the digest must agree
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
    # Columns whose values must be numbers or text (the text and prompt columns check their own).
    scalar_columns = list(dict.fromkeys(
        c for c in (spec.id_column, label_column, spec.group_column, spec.prior_column,
                    *spec.feature_columns) if c is not None and c != prompt_column))
    odd_values: dict[str, list[str]] = {}
    labelled: list[tuple[int, str, str]] = []  # (row, id, label): mixed numbers and text?
    out_of_range: list[int] = []
    empty_ids: list[int] = []
    missing_labels: list[int] = []
    bad_inputs: list[int] = []
    bad_priors: list[int] = []
    bad_prompts: list[int] = []
    seen: dict[str, list[int]] = {}
    records: list[Record] = []
    for row_number, row in enumerate(rows):
        odd = [] if _PLAIN.issuperset(map(type, map(row.__getitem__, scalar_columns))) else \
            [(c, kind) for c in scalar_columns if (kind := _odd_kind(row[c]))]
        if odd:
            where = f"row {row_number}"
            if _odd_kind(row[spec.id_column]) is None and _canonical_id(row[spec.id_column]):
                where = f"record {_canonical_id(row[spec.id_column])!r} (row {row_number})"
            for column, kind in odd:
                odd_values.setdefault(column, []).append(f"{where}: {kind} {row[column]!r}")
            continue
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
        elif label is not None and require_target:
            labelled.append((row_number, record_id, label))
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
            # sum() is finite when every value is (and cannot overflow below float32's range):
            # one C-speed pass for the common case.
            if not math.isfinite(sum(inp)) and not all(math.isfinite(v) for v in inp):
                bad_inputs.append(row_number)
                continue
            if max(map(abs, inp)) > FLOAT32_MAX:
                out_of_range.append(row_number)
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

    for column, places in odd_values.items():
        problems.append(f"column {column!r} holds values that are neither numbers nor text (give "
                        f"numbers or text there): {name_some(places)}")
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
    if out_of_range:
        problems.append(_name_rows(f"inputs in {','.join(spec.feature_columns)!r} beyond float32's "
                                   f"range (|x| > {FLOAT32_MAX:.3g}) at rows", out_of_range))
    stray, others = odd_labels([label for _, _, label in labelled])
    if stray:
        kind = "text" if others == "numeric" else "numeric"
        problems.append(
            f"labels in column {label_column!r} mix numbers and text: {kind} label(s) "
            + name_some(f"{labelled[i][2]!r} (record {labelled[i][1]!r}, row {labelled[i][0]})"
                        for i in stray)
            + f" among {len(labelled) - len(stray)} {others} ones; fix or remove those rows")
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
    if path.is_dir():
        raise RecordError(f"data file {str(path)!r} is a directory: give a .csv, .json, .jsonl or "
                          ".parquet file")
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
    # datasets logs a failed read itself (to a stream it captured when first imported): keep it
    # quiet, so the one error below says it.
    log = logging.getLogger("datasets")
    level = log.level
    log.setLevel(logging.CRITICAL)
    try:
        dataset = datasets.load_dataset(
            loader, data_files=str(path), split="train", keep_in_memory=True, **kwargs
        )
    except Exception as exc:  # datasets raises many types for malformed files
        cause = _root_cause(exc)  # "An error occurred while generating the dataset" says nothing
        raise RecordError(f"cannot read {str(path)!r}: {type(cause).__name__}: {cause}") from exc
    finally:
        log.setLevel(level)
    return [dict(r) for r in dataset]


def _root_cause(exc: BaseException) -> BaseException:
    while True:
        inner = exc.__cause__ or (None if exc.__suppress_context__ else exc.__context__)
        if inner is None:
            return exc
        exc = inner


def load_records(source: Any, spec: DataSpec, require_target: bool = True) -> list[Record]:
    """Read and validate records from any supported source."""
    return records_from_rows(load_rows(source, spec), spec, require_target)


def _placement_key(record: Record) -> str:
    # What placement hashes for the shard (see sisa.partition.place): the group, else the id.
    return f"g:{record.group}" if record.group is not None else f"r:{record.id}"


def check_partition(records: Sequence[Record], config: SisaConfig | PartitionConfig) -> None:
    """Refuse a partition the records cannot fill: more shards than records (or than groups and
    ungrouped records, since a group stays in one shard), or more slices than records. Call it
    before creating a store: such shards (slices) would train on nothing."""
    partition = config.partition if isinstance(config, SisaConfig) else config
    units = len({_placement_key(r) for r in records})
    groups = len({r.group for r in records if r.group is not None})
    problems = []
    if partition.shards > units:
        what = f"{len(records)} records" if not groups else (
            f"{len(records)} records in {units} placement units ({groups} groups, a group stays in "
            "one shard, and the ungrouped records)")
        problems.append(f"shards={partition.shards} is more than the data can fill: there are {what}; "
                        f"give shards <= {units}")
    if partition.slices > len(records):
        problems.append(f"slices={partition.slices} is more than the {len(records)} records: every "
                        f"shard would have empty slices; give slices <= {len(records)}")
    if problems:
        raise ConfigError("invalid partition for this data (nothing was written): "
                          + "; ".join(problems))


def empty_shards(placed: Iterable[int], shards: int) -> list[int]:
    """The shards of 0..shards-1 that no record was placed in (`placed`: each record's shard)."""
    return sorted(set(range(shards)) - set(placed))


def spec_columns(spec: DataSpec) -> list[str]:
    """Every column the data spec reads."""
    named = [spec.id_column, spec.label_column, spec.text_column, *spec.feature_columns,
             spec.group_column, spec.prior_column, spec.prompt_column]
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
