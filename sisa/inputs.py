"""What users pass to `predict`: a pandas DataFrame, a `pyarrow.Table` or `datasets.Dataset`, a
list of dicts, a numpy array or a list of rows, a list of texts. Each is checked against the
columns the model reads (scikit-learn's `feature_names_in_` and `n_features_in_`) and becomes the
model's input: texts, or an (n, features) float64 array.

Named columns are matched by name, never by position; the data spec's own other columns (id,
label, group, prior) may be there and are ignored; any other column is an error, as a column
the model does not read may mean the wrong table. Unnamed rows are checked for their width.
Every problem is a `sisa` error that says what was expected.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from sisa.config import DataSpec
from sisa.errors import MAX_NAMED, ColumnError, InputKindError, RecordError, name_some
from sisa.records import FLOAT32_MAX, Ingest, feature_problems, spec_columns
from sisa.sources import is_data_frame


def model_reads(spec: DataSpec) -> list[str]:
    """The columns a classifier reads, in order: its features, or its text."""
    return list(spec.feature_columns) if spec.kind == "features" else [str(spec.text_column)]


def _named_columns(inputs: Any) -> list[str] | None:
    """The column names of a table or a list of dicts; None for unnamed input."""
    if is_data_frame(inputs):
        return [str(c) for c in inputs.columns]
    names = getattr(inputs, "column_names", None)  # a datasets.Dataset or a pyarrow.Table
    if names is not None and not isinstance(inputs, np.ndarray):
        return [str(c) for c in names]
    if isinstance(inputs, Sequence) and not isinstance(inputs, str) and len(inputs) \
            and isinstance(inputs[0], Mapping):
        return [str(c) for c in dict.fromkeys(k for row in inputs for k in row)]
    return None


def check_columns(columns: Sequence[str], spec: DataSpec) -> None:
    """Refuse named input that lacks a column the model reads, or has one that no part of the
    data spec names."""
    reads = model_reads(spec)
    missing = [c for c in reads if c not in set(columns)]
    extra = [c for c in columns if c not in set(spec_columns(spec))]
    problems = []
    if missing:
        problems.append(f"it has no column(s) {name_some(missing, quote=True)}")
    if extra:
        problems.append(f"it has column(s) the model does not read: {name_some(extra, quote=True)}")
    if problems:
        raise ColumnError(f"the input does not match the model's columns: {'; '.join(problems)}. "
                          f"The model reads {name_some(reads, quote=True)} (feature_names_in_), "
                          "matched by name in any order; select them, e.g. "
                          "df[model.feature_names_in_]")


def model_input(inputs: Any, spec: DataSpec) -> list[str] | np.ndarray:
    """`inputs` as the model takes them, checked (see the module's docstring)."""
    if isinstance(inputs, (str, bytes)):
        raise InputKindError("give a list of inputs (one text is a list of one)")
    columns = _named_columns(inputs)
    if columns is not None:
        if isinstance(inputs, Sequence) and not all(isinstance(k, str) for row in inputs for k in row):
            inputs = [{str(k): v for k, v in row.items()} for row in inputs]  # as a DataFrame's
        check_columns(columns, spec)
        batches = list(Ingest(inputs, spec, require_target=False))
        if spec.kind == "text":
            return [t for b in batches for t in b.inputs]
        if not batches:
            return np.zeros((0, len(spec.feature_columns)))
        return np.concatenate([np.asarray(b.inputs) for b in batches])
    if spec.kind == "text":
        return _texts(inputs)
    return _rows(inputs, spec)


def _texts(inputs: Any) -> list[str]:
    if isinstance(inputs, np.ndarray) and inputs.ndim != 1:
        raise InputKindError(f"this model reads texts: give a list (or 1-D array) of texts, got an "
                             f"array of shape {inputs.shape}")
    texts = list(inputs)
    wrong = [i for i, t in enumerate(texts) if not isinstance(t, str)]
    empty = [i for i, t in enumerate(texts) if isinstance(t, str) and not t.strip()]
    problems = []
    if wrong:
        problems.append(f"inputs that are not texts at positions "
                        f"{name_some(wrong[:MAX_NAMED], total=len(wrong))}")
    if empty:
        problems.append(f"empty texts at positions {name_some(empty[:MAX_NAMED], total=len(empty))}")
    if problems:
        raise RecordError(f"invalid input (nothing was predicted): {'; '.join(problems)}")
    return texts


def _rows(inputs: Any, spec: DataSpec) -> np.ndarray:
    width = len(spec.feature_columns)
    expected = f"rows of {width} numbers (the columns {name_some(model_reads(spec), quote=True)})"
    try:
        raw = np.asarray(inputs)
    except ValueError:  # numpy refuses rows of different lengths
        raise InputKindError(f"this model reads {expected}; the input has rows of different "
                             "lengths") from None
    if raw.dtype.kind not in "iuf":  # text, booleans, objects: a file's rows refuse them too
        raise InputKindError(f"this model reads {expected}; the input has values that are not "
                             "numbers")
    # Row-major, whatever the caller's layout (pandas gives column-major arrays): the same rows
    # give bit-identical answers however they were passed.
    array = np.ascontiguousarray(raw, dtype=np.float64)
    if array.ndim == 1:
        raise InputKindError(
            f"this model reads {expected}; got a 1-D array of {array.shape[0]} values: give one "
            "row as X.reshape(1, -1), or a list of rows")
    if array.ndim != 2 or array.shape[1] != width:
        shape = "x".join(map(str, array.shape))
        raise InputKindError(f"this model reads {expected}; got an array of shape {shape}")
    finite, huge = feature_problems(array)
    bad = [i for i, (ok, big) in enumerate(zip(finite, huge, strict=True)) if not ok or big]
    if bad:
        wrong = ~np.isfinite(array[bad]) | (np.abs(array[bad]) > FLOAT32_MAX)
        columns = [spec.feature_columns[j] for j in np.flatnonzero(wrong.any(axis=0)).tolist()]
        raise RecordError(
            f"invalid input (nothing was predicted): values missing, not finite or beyond float32's "
            f"range (|x| > {FLOAT32_MAX:.3g}) in rows at positions "
            f"{name_some(bad[:MAX_NAMED], total=len(bad))} (column(s) {name_some(columns, quote=True)})")
    return array
