"""Reading input records in chunks, as columns: csv, json(l) and parquet files through Arrow, a
`datasets.Dataset`, a `pyarrow.Table`, a pandas DataFrame, or a list of dicts.

A chunk holds the wanted columns as Python lists and the numeric features as one float64 array
(NaN where a value is missing or not a number), so validation, digests and placement work on whole
columns. CSV and Parquet files stream a chunk at a time, so memory stays bounded for inputs larger
than RAM; so does JSON Lines, unless its types vary between rows (then its remaining lines go
through Python's JSON parser, still a chunk at a time). A JSON array is read whole.
"""

from __future__ import annotations

import csv
import itertools
import json
import math
import re
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from sisa.errors import RecordError

CHUNK_BYTES = 32 << 20  # CSV and JSON text per chunk (Arrow's block size)
CHUNK_ROWS = 65_536  # rows per chunk of a table or a list of dicts
_SUFFIXES = (".csv", ".json", ".jsonl", ".parquet")


@dataclass
class Chunk:
    """Consecutive rows of the input, as columns."""

    start: int  # the input row number of its first row
    size: int
    values: dict[str, list[Any]]  # the wanted non-feature columns (those the input has)
    features: np.ndarray | None  # (size, features) float64; NaN: missing or not a number
    # feature column -> (row in the chunk, value) of values that are neither numbers nor text
    odd_features: dict[str, list[tuple[int, Any]]] = field(default_factory=dict)


class Wanted(NamedTuple):
    """The columns to read: those read as Python values (id, label, text, group, prior,
    prompt) and the numeric features."""

    scalars: tuple[str, ...]
    features: tuple[str, ...]


def _float_or_nan(value: Any) -> float:
    try:
        return float(value)
    except (TypeError, ValueError, OverflowError):
        return math.nan


def _odd(value: Any) -> bool:
    """Neither a number nor text nor missing: a boolean, a list, an object..."""
    if isinstance(value, bool):
        return True
    return value is not None and not isinstance(value, (str, int, float))


def _list_features(column: list[Any], odd: list[tuple[int, Any]]) -> np.ndarray:
    """A feature column of Python values as float64 (NaN: missing or not a number); booleans,
    lists, objects go to `odd`."""
    if {type(v) for v in column} <= {int, float}:  # the common case, at C speed
        try:
            return np.array(column, dtype=np.float64)
        except OverflowError:
            pass
    out = np.empty(len(column))
    for i, v in enumerate(column):
        if _odd(v):
            odd.append((i, v))
            out[i] = math.nan
        else:
            out[i] = math.nan if v is None else _float_or_nan(v)
    return out


def _arrow_floats(column: Any) -> Any:
    """An Arrow feature column as float64 (nulls stay null), or None where Arrow cannot read it as
    numbers and Python must, value by value."""
    import pyarrow as pa
    import pyarrow.compute as pc

    kind = column.type
    if pa.types.is_float64(kind):
        return column  # a CSV's numbers: nothing to convert (a cast is a call of its own per column)
    if pa.types.is_integer(kind) or pa.types.is_floating(kind) or pa.types.is_decimal(kind) \
            or pa.types.is_null(kind):
        # Unchecked: an integer beyond 2**53 rounds to the nearest float, as float() rounds it
        # (a checked cast refuses it, quoting the value).
        return pc.cast(column, pa.float64(), safe=False)
    if pa.types.is_string(kind) or pa.types.is_large_string(kind):
        try:
            return pc.cast(column, pa.float64())
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
            pass  # e.g. " 1" or "1_0", which Python reads: value by value, as Python does
    return None


def _arrow_features(size: int, get: Any, present: set[str], columns: Sequence[str],
                    odd: dict[str, list[tuple[int, Any]]]) -> np.ndarray:
    """The feature columns of an Arrow batch as one row-major (size, features) float64 matrix
    (records are stored row by row: no second copy), laid out by Arrow in one pass (`to_tensor`;
    NaN where a value is missing or the batch lacks the column). A column Arrow cannot read as
    numbers is read by Python (its booleans, lists, objects go to `odd`). Never through
    `Array.to_numpy`, which imports pandas (a third of a second)."""
    import pyarrow as pa

    floats = []
    by_python: dict[int, np.ndarray] = {}
    for j, c in enumerate(columns):
        column = _arrow_floats(get(c)) if c in present else None
        if column is None:
            if c in present:
                found: list[tuple[int, Any]] = []
                by_python[j] = _list_features(get(c).to_pylist(), found)
                if found:
                    odd[c] = found
            column = pa.nulls(size, pa.float64())
        floats.append(column)
    batch = pa.RecordBatch.from_arrays(floats, names=list(columns))
    if hasattr(batch, "to_tensor"):  # pyarrow >= 16
        matrix = np.asarray(batch.to_tensor(null_to_nan=True, row_major=True))
    else:
        matrix = np.ascontiguousarray(np.stack([c.to_numpy(zero_copy_only=False) for c in floats], axis=1))
    for j, values in by_python.items():
        matrix[:, j] = values
    return matrix


def _from_columns(start: int, size: int, get: Any, names: Sequence[str], wanted: Wanted,
                  arrow: bool) -> Chunk:
    """A chunk's columns; a wanted column this chunk lacks (a later block of JSON lines without
    it) is missing in every row, which validation names row by row."""
    present = set(names)
    values = {c: (get(c).to_pylist() if arrow else get(c)) if c in present else [None] * size
              for c in wanted.scalars}
    features = None
    odd: dict[str, list[tuple[int, Any]]] = {}
    if wanted.features and arrow:
        features = _arrow_features(size, get, present, wanted.features, odd)
    elif wanted.features:
        # Column-major: each column is written contiguously (the rows are gathered later).
        features = np.full((size, len(wanted.features)), math.nan, order="F")
        for j, c in enumerate(wanted.features):
            if c not in present:
                continue
            found: list[tuple[int, Any]] = []
            features[:, j] = _list_features(get(c), found)
            if found:
                odd[c] = found
    return Chunk(start, size, values, features, odd)


def _arrow_chunk(start: int, batch: Any, wanted: Wanted) -> Chunk:
    return _from_columns(start, batch.num_rows, batch.column, batch.schema.names, wanted, arrow=True)


def _rows_chunk(start: int, rows: Sequence[Mapping[str, Any]], wanted: Wanted) -> Chunk:
    def get(column: str) -> list[Any]:
        return [row.get(column) for row in rows]  # a row without the column: missing there
    return _from_columns(start, len(rows), get, [*wanted.scalars, *wanted.features], wanted,
                         arrow=False)


class Numbering(NamedTuple):
    """How a message names an input row so that the user finds it: a file's line (1-based, the
    header counted), a JSON array's record (1-based), an in-memory table's position (0-based, as
    `df.iloc` and a list index count)."""

    unit: str
    units: str
    first: int  # the number of the input's first row, where no blank line or multi-line field is
    path: Path | None = None  # a CSV or JSON-lines file, whose lines `lines` counts
    kind: str = ""  # "csv" or "jsonl"

    def of(self, path: Path) -> Numbering:
        """This numbering for the lines of `path`."""
        return self._replace(path=path)

    def lines(self, rows: Iterable[int]) -> dict[int, int]:
        """Input rows (0-based) -> their numbers as messages name them; a file's physical line
        numbers, read from the file (blank lines and fields that span lines counted), which only
        an error message pays for."""
        wanted = set(rows)
        found: dict[int, int] = {}
        if wanted and self.path is not None:
            try:
                starts = _csv_starts(self.path) if self.kind == "csv" else _jsonl_starts(self.path)
                found = _record_lines(starts, wanted)
            except (OSError, UnicodeDecodeError, csv.Error):
                found = {}
        return {r: found.get(r, r + self.first) for r in wanted}


def _record_lines(starts: Iterator[int], wanted: set[int]) -> dict[int, int]:
    """Data row -> its line, for the wanted rows, from the line each record starts on."""
    out: dict[int, int] = {}
    for row, line in enumerate(starts):
        if row in wanted:
            out[row] = line
            if len(out) == len(wanted):
                break
    return out


def _csv_records(path: Path) -> Iterator[tuple[int, list[str]]]:
    """Each record of a CSV file, the header first, with the line it starts on, as Arrow reads
    the file: blank lines skipped, quoted fields spanning lines."""
    with path.open(newline="", encoding="utf-8-sig") as f:
        reader = csv.reader(f)
        end = 0
        for fields in reader:
            start, end = end + 1, reader.line_num
            if fields:
                yield start, fields


def _csv_starts(path: Path) -> Iterator[int]:
    """The line each data record of a CSV file starts on (the header is not one)."""
    return (start for start, _ in itertools.islice(_csv_records(path), 1, None))


def _jsonl_starts(path: Path) -> Iterator[int]:
    """The line of each record of a JSON-lines file (blank lines skipped)."""
    with path.open(encoding="utf-8-sig") as f:
        yield from (number for number, line in enumerate(f, 1) if line.strip())


POSITIONS = Numbering("position", "positions", 0)
CSV_LINES = Numbering("line", "lines", 2, kind="csv")
JSON_LINES = Numbering("line", "lines", 1, kind="jsonl")
JSON_RECORDS = Numbering("record", "records", 1)
PARQUET_ROWS = Numbering("row", "rows", 1)


class Source:
    """An input opened for reading: its column names, then its chunks (read once)."""

    def __init__(self, columns: list[str], chunks: Iterator[Chunk], numbering: Numbering = POSITIONS):
        self.columns = columns
        self._chunks = chunks
        self.numbering = numbering

    def chunks(self) -> Iterator[Chunk]:
        return self._chunks


def _table_chunks(batches: Iterator[Any], wanted: Wanted, start: int = 0) -> Iterator[Chunk]:
    for batch in batches:
        if batch.num_rows:
            yield _arrow_chunk(start, batch, wanted)
            start += batch.num_rows


def _rows_chunks(rows: Sequence[Mapping[str, Any]], wanted: Wanted, rows_per_chunk: int) -> Iterator[Chunk]:
    for start in range(0, len(rows), rows_per_chunk):
        yield _rows_chunk(start, rows[start:start + rows_per_chunk], wanted)


def is_data_frame(source: Any) -> bool:
    """A pandas DataFrame (duck-typed: pandas is not imported for it)."""
    return all(hasattr(source, a) for a in ("columns", "iloc", "dtypes", "to_numpy"))


def open_source(source: Any, wanted: Wanted, rows_per_chunk: int = CHUNK_ROWS) -> Source:
    """Open a local csv/json(l)/parquet file, a `datasets.Dataset`, a `pyarrow.Table`, a pandas
    DataFrame or a list of dicts; an unreadable file is a `RecordError` naming it and why."""
    if isinstance(source, (str, Path)):
        return _open_file(Path(source), wanted)
    if is_data_frame(source):
        source = frame_table(source)
    table = getattr(getattr(source, "data", None), "table", None)  # a datasets.Dataset
    if table is None and hasattr(source, "to_batches") and hasattr(source, "schema"):
        table = source  # a pyarrow.Table
    if table is not None:
        return Source(list(table.schema.names),
                      _table_chunks(iter(table.to_batches(max_chunksize=rows_per_chunk)), wanted))
    rows = source if isinstance(source, Sequence) else list(source)
    if rows and not all(isinstance(r, Mapping) for r in rows[:1]):
        raise RecordError(f"records must be mappings of column -> value, got {type(rows[0]).__name__}")
    columns = list(dict.fromkeys(key for row in rows for key in row))
    return Source(columns, _rows_chunks(rows, wanted, rows_per_chunk))


def frame_table(frame: Any) -> Any:
    """A pandas DataFrame as a `pyarrow.Table` (its index dropped: rows are named by position);
    column names become text. A column Arrow cannot convert (mixed objects) is named."""
    import pyarrow as pa

    frame = frame.rename(columns=str) if not all(isinstance(c, str) for c in frame.columns) else frame
    twice = sorted(c for c, n in Counter(frame.columns).items() if n > 1)
    if twice:
        raise RecordError(f"the DataFrame has duplicate column names: {twice}")
    try:
        return pa.Table.from_pandas(frame, preserve_index=False)
    except (pa.ArrowInvalid, pa.ArrowTypeError):
        columns = {}
        for name in frame.columns:  # column by column, as Python values: validation names them
            try:
                columns[name] = pa.array(frame[name], from_pandas=True)
            except (pa.ArrowInvalid, pa.ArrowTypeError):
                columns[name] = pa.array([_plain(v) for v in frame[name].tolist()], type=pa.string())
        return pa.table(columns)


def _plain(value: Any) -> str | None:
    """A value of a mixed-type DataFrame column as text (None stays missing)."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    return str(value)


# Arrow's CSV parser quotes the offending row ("Expected 3 columns, got 4: a,b,c,d"): a message
# must not carry a record's content, so it becomes the row's line number and the counts.
_RAGGED = re.compile(r"Expected (\d+) columns?, got (\d+)")


def _unreadable(path: Path, exc: BaseException) -> RecordError:
    ragged = _RAGGED.search(str(exc)) if path.suffix.lower() == ".csv" else None
    if ragged:
        line = _ragged_line(path, int(ragged.group(1)))
        where = f"line {line}" if line else "a row"
        return RecordError(f"cannot read {str(path)!r}: {where} has {ragged.group(2)} fields where "
                           f"the header has {ragged.group(1)} (a quote or a delimiter out of place?)")
    return RecordError(f"cannot read {str(path)!r}: {type(exc).__name__}: {exc}")


def _ragged_line(path: Path, width: int) -> int | None:
    """The line the first record whose field count differs from the header's starts on."""
    try:
        return next((start for start, fields in _csv_records(path) if len(fields) != width), None)
    except (OSError, UnicodeDecodeError, csv.Error):
        return None


def _open_file(path: Path, wanted: Wanted) -> Source:
    if path.is_dir():
        raise RecordError(f"data file {str(path)!r} is a directory: give a .csv, .json, .jsonl or "
                          ".parquet file")
    if not path.is_file():
        raise RecordError(f"data file {str(path)!r} does not exist")
    suffix = path.suffix.lower()
    if suffix not in _SUFFIXES:
        raise RecordError(f"cannot read {str(path)!r}: use a .csv, .json, .jsonl or .parquet file")
    try:
        if suffix == ".csv":
            return _open_csv(path, wanted)
        if suffix == ".parquet":
            return _open_parquet(path, wanted)
        return _open_json(path, wanted)
    except (OSError, ValueError, UnicodeDecodeError, csv.Error) as exc:  # pyarrow's errors too
        raise _unreadable(path, exc) from exc


def _guarded(path: Path, chunks: Iterator[Chunk]) -> Iterator[Chunk]:
    """A malformed row found mid-file is a RecordError naming the file, like one found first."""
    try:
        yield from chunks
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        raise _unreadable(path, exc) from exc


def _open_csv(path: Path, wanted: Wanted) -> Source:
    import pyarrow as pa
    import pyarrow.csv as pacsv

    with path.open(newline="", encoding="utf-8-sig") as f:
        header = next(csv.reader(f), None)
    if not header:
        raise RecordError(f"cannot read {str(path)!r}: the file is empty (no header row)")
    present = [c for c in (*wanted.scalars, *wanted.features) if c in header]
    # Every column as text: ids such as "007" stay strings, a type never changes between chunks,
    # and the numbers are parsed (and checked) column by column: Arrow's cast from text is twice
    # as fast as its CSV reader's own number parsing (50,000 rows x 600: 1.1 s against 2.2 s).
    reader = pacsv.open_csv(
        path, read_options=pacsv.ReadOptions(block_size=CHUNK_BYTES),
        convert_options=pacsv.ConvertOptions(column_types={c: pa.string() for c in present},
                                             include_columns=present, strings_can_be_null=False))
    return Source(header, _guarded(path, _table_chunks(iter(reader), wanted)), CSV_LINES.of(path))


def _open_parquet(path: Path, wanted: Wanted) -> Source:
    import pyarrow.parquet as pq

    parquet = pq.ParquetFile(path)
    names = list(parquet.schema_arrow.names)
    present = [c for c in (*wanted.scalars, *wanted.features) if c in names]
    batches = parquet.iter_batches(batch_size=CHUNK_ROWS, columns=present)
    return Source(names, _guarded(path, _table_chunks(batches, wanted)), PARQUET_ROWS)


def _open_json(path: Path, wanted: Wanted) -> Source:
    with path.open("rb") as f:
        head = f.read(4096).lstrip(b"\xef\xbb\xbf \t\r\n")
    if head.startswith(b"["):  # one JSON array: read whole
        rows = json.loads(path.read_text(encoding="utf-8-sig"))
        if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
            raise RecordError(f"cannot read {str(path)!r}: a JSON array of objects was expected")
        columns = list(dict.fromkeys(key for row in rows for key in row))
        return Source(columns, _rows_chunks(rows, wanted, CHUNK_ROWS), JSON_RECORDS)
    import pyarrow as pa
    import pyarrow.json as pj

    try:  # the columns of the first block (Arrow unifies its rows' keys)
        reader = pj.open_json(path, read_options=pj.ReadOptions(block_size=CHUNK_BYTES))
        columns = list(reader.schema.names)
    except pa.ArrowInvalid:  # types vary within the first block: Python reads it all
        reader, columns = None, list(_first_json_row(path))
    return Source(columns, _guarded(path, _json_lines(path, reader, wanted)), JSON_LINES.of(path))


def _first_json_row(path: Path) -> dict[str, Any]:
    with path.open(encoding="utf-8-sig") as f:
        for line in f:
            if line.strip():
                row = json.loads(line)
                if not isinstance(row, dict):
                    raise ValueError("the first record is not a JSON object")
                return row
    raise ValueError("the file holds no records")


def _json_lines(path: Path, reader: Any, wanted: Wanted) -> Iterator[Chunk]:
    """Arrow's JSON reader (`reader`) while the types hold; if a column changes type (a number,
    then text), Python's parser reads the rest, from the first row not yet given."""
    import pyarrow as pa

    done = 0
    if reader is not None:
        try:
            for batch in reader:
                if batch.num_rows:
                    yield _arrow_chunk(done, batch, wanted)
                    done += batch.num_rows
            return
        except pa.ArrowInvalid:
            pass  # mixed types: read on in Python
    rows: list[dict[str, Any]] = []
    seen = 0
    with path.open(encoding="utf-8-sig") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            seen += 1
            if seen <= done:
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"line {number} is not valid JSON: {exc}") from exc
            if not isinstance(row, dict):
                raise ValueError(f"line {number} is not a JSON object")
            rows.append(row)
            if len(rows) == CHUNK_ROWS:
                yield _rows_chunk(done, rows, wanted)
                done += len(rows)
                rows = []
    if rows:
        yield _rows_chunk(done, rows, wanted)


def rows_of(source: Any, wanted: Wanted) -> list[dict[str, Any]]:
    """Every row of a small input as a dict (for callers that need rows, e.g. a holdout sample)."""
    if isinstance(source, Sequence) and not isinstance(source, (str, bytes)):
        return [dict(r) for r in source]
    opened = open_source(source, wanted)
    rows: list[dict[str, Any]] = []
    for chunk in opened.chunks():
        columns = dict(chunk.values)
        if chunk.features is not None:
            for j, c in enumerate(wanted.features):
                columns[c] = chunk.features[:, j].tolist()
        rows += [dict(zip(columns, values, strict=True)) for values in zip(*columns.values(), strict=True)]
    return rows

