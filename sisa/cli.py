"""The `sisa` command line: a thin shell over `sisa.api.Sisa`.

Each command parses options, calls one library function and prints a table (or JSON with --json).
The options that set a config are generated from the config classes (`sisa.options`). Library
errors become one clean message, with the command that fixes them, and exit status 1 in `_Group`.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import math
import numbers
import os
import re
import shlex
import sys
import tomllib
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Column, Table
from typer.core import TyperCommand, TyperGroup

from sisa import errors
from sisa.config import COMBINES
from sisa.options import (
    build_config,
    build_execution,
    build_service,
    build_spec,
    build_store,
    with_options,
)

if TYPE_CHECKING:
    from sisa.api import Sisa

# No emoji codes: an id such as ":cat:" prints as typed. soft_wrap: a message longer than the
# terminal (or than 80 columns, when piped) stays one line, so tools and logs can grep it whole.
# markup=False: an id, a path or a prompt such as "[/]" prints as typed, in tables too; the few
# deliberate styles pass markup=True (with everything else escaped).
out = Console(emoji=False, markup=False)
err = Console(stderr=True, soft_wrap=True, emoji=False, markup=False)

# What to do about each kind of error, in CLI terms (the library's messages name no commands).
HINTS: list[tuple[type[errors.SisaError], str]] = [
    (errors.StoreNotFoundError, "create one with `sisa train --store DIR --data ...`"),
    (errors.StoreExistsError, "give another --store, or remove that directory first"),
    (errors.IncompleteStoreError, "run `sisa train` with the same --store again: it replaces the "
                                  "incomplete store"),
    (errors.SymlinkError, "`sisa repair --store DIR` removes the links (never what they point to) "
                          "and rebuilds what they replaced"),
    (errors.CheckpointError, "`sisa repair --store DIR` retrains the shard from its last intact "
                             "checkpoint, bit-identically"),
    (errors.DamagedStoreError, "`sisa repair --store DIR` rebuilds the damaged shards and removes "
                               "links and stray files; a record that fails its content digest: "
                               "`sisa forget` it and `sisa add` it again from the source data"),
    (errors.StoreKeyError, "give the store's key file with --key-file (or SISA_KEY_FILE)"),
    (errors.WitnessError, "give the store's witness with --witness (or SISA_WITNESS); the witness "
                          "of another store is refused"),
    (errors.NoServableShardError, "`sisa recover --store DIR` applies pending deletions"),
    (errors.RayExposureError, "use --executor local, or --ray-address of a Ray cluster you have "
                              "secured"),
    (errors.StoreCorruptError, "restore the store from a backup (with its witness, `sisa recover` "
                               "applies again every deletion made since), or train it again from "
                               "its data without the deleted records; nothing in a damaged store "
                               "can be trusted"),
    (errors.RecordCorruptError, "`sisa forget --store DIR ID...` the records named, then `sisa add` "
                                "them again from the source data"),
    (errors.ColumnError, "name the columns with --id-column, --label-column, --text-column or "
                         "--feature-columns (and --group-column, --prior-column)"),
    (errors.DeletionTargetError, "forget the ids (ID... or --ids-file) and the --group in two "
                                 "commands"),
    (errors.InputKindError, "for a --text-column use --backend head, lora or causal_lm; for numeric "
                            "--feature-columns use --backend mlp. A causal-LM store serves `sisa "
                            "generate` and `sisa score`; a classifier `sisa predict` and `sisa "
                            "evaluate`"),
]


# Where a command meets an error otherwise than training does: (error, commands, what to do).
COMMAND_HINTS: list[tuple[type[errors.SisaError], set[str], str]] = [
    (errors.ColumnError, {"predict", "evaluate", "score"},
     "give a file holding the columns the model reads (`sisa status --store DIR` names them); an "
     "id column is optional (carried into the output), evaluate also needs the label column"),
]


def hint(exc: errors.SisaError, command: str | None = None) -> str | None:
    for cls, commands, text in COMMAND_HINTS:
        if isinstance(exc, cls) and command in commands:
            return text
    return next((text for cls, text in HINTS if isinstance(exc, cls)), None)


# Typer's base of command-line errors (click's ClickException, which newer typers vendor): found
# from the public BadParameter, so this works with either.
_CommandLineError: type[Exception] = next(
    c for c in typer.BadParameter.__mro__ if c.__name__ == "ClickException")


def error_code(exc: BaseException) -> str:
    """An error's stable kind, as `--json` prints it: `usage` (a malformed command line), `io` (a
    file the system cannot read or write), or a library error's class in snake case without
    `Error` (`store_not_found`, `unknown_record`, `config`, ...; the service's codes where they
    meet)."""
    if isinstance(exc, _CommandLineError):
        return "usage"
    if isinstance(exc, OSError):
        return "io"
    name = type(exc).__name__.removesuffix("Error") or "sisa"
    return re.sub(r"(?<=[a-z0-9])(?=[A-Z])", "_", name).lower()


def error_object(exc: BaseException, message: str, hint_text: str | None) -> dict[str, Any]:
    """An error as `--json` prints it (the HTTP service's error bodies have the same shape)."""
    return {"error": {"code": error_code(exc), "message": message, "hint": hint_text}}


_JSON = "sisa.json"  # ctx.meta: the command's --json, once parsed
_ARGS = "sisa.args"  # ctx.meta: the command line, for an error found before --json was parsed


def _wants_json(ctx: Any) -> bool:
    if _JSON in ctx.meta:
        return bool(ctx.meta[_JSON])
    args = ctx.meta.get(_ARGS, [])
    return "--json" in args[:args.index("--")] if "--" in args else "--json" in args


def _fail(ctx: Any, exc: BaseException, message: str, hint_text: str | None) -> None:
    if _wants_json(ctx):
        _print_json(error_object(exc, message, hint_text))
        return
    err.print("[bold red]error:[/bold red] " + escape(message), highlight=False, markup=True)
    if hint_text:
        err.print("[bold]hint:[/bold] " + escape(hint_text), highlight=False, markup=True)


def _flags_take_no_value(params: list[Any]) -> list[Any]:
    """A flag shows as a flag in --help (`--json`), not with a type as if it took a value."""
    for param in params:
        if getattr(param, "is_flag", False) and param.metavar is None:
            param.metavar = ""
    return params


def _unwrapped(text: str | None) -> str | None:
    """A docstring's paragraphs, each on one line: the help wraps them to the terminal, where
    the source's line breaks would break lines early."""
    if text is None:
        return None
    return "\n\n".join(" ".join(p.split()) for p in inspect.cleandoc(text).split("\n\n"))


class _Command(TyperCommand):
    """A command whose help wraps to the terminal and whose flags show as flags."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.help = _unwrapped(self.help)

    def get_params(self, ctx: Any) -> list[Any]:
        return _flags_take_no_value(super().get_params(ctx))


class _Group(TyperGroup):
    """Turns every library error (and a file the system cannot read or write) into one clean
    message and exit status 1, and a malformed command line into one clean message and status 2;
    with --json, the message is a JSON object on stdout (`error_object`)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.help = _unwrapped(self.help)

    def get_params(self, ctx: Any) -> list[Any]:
        return _flags_take_no_value(super().get_params(ctx))

    def parse_args(self, ctx: Any, args: list[str]) -> list[str]:
        ctx.meta.setdefault(_ARGS, list(args))  # the outermost group's: the whole command line
        return super().parse_args(ctx, args)

    def invoke(self, ctx: Any) -> Any:
        try:
            return super().invoke(ctx)
        except errors.SisaError as exc:
            _fail(ctx, exc, str(exc), hint(exc, ctx.invoked_subcommand))
            raise typer.Exit(1) from None
        except _CommandLineError as exc:  # typer's own panel spans many lines: keep to one
            context = getattr(exc, "ctx", None)
            where = context.command_path if context is not None else "sisa"
            _fail(ctx, exc, exc.format_message(),  # type: ignore[attr-defined]
                  f"`{where} --help` lists the options")
            raise typer.Exit(getattr(exc, "exit_code", 2)) from None
        except OSError as exc:  # e.g. an --output path in a missing directory
            _fail(ctx, exc, str(exc), None)
            raise typer.Exit(1) from None


app = typer.Typer(
    cls=_Group,
    help="Train sharded, sliced models that can forget records exactly (SISA training).\n\n"
    "Options may also come from a TOML file: `sisa --config sisa.toml train ...`, whose keys are "
    "option names (store = \"stores/x\", shards = 8, ...).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

# Shared options ------------------------------------------------------------------------------------
Store = Annotated[Path, typer.Option("--store", help="Store directory (SQLite + checkpoints).")]
Data = Annotated[str, typer.Option("--data", help="csv/json/jsonl/parquet file, or builtin:NAME[:test].")]


def _json_errors(ctx: typer.Context, value: bool) -> bool:
    """--json's callback: from now on an error prints as JSON too (parsed first: is_eager)."""
    ctx.meta[_JSON] = value
    return value


Json = Annotated[bool, typer.Option(
    "--json", help='Print JSON instead of tables; an error, too, is then JSON on stdout: '
                   '{"error": {"code", "message", "hint"}}.',
    callback=_json_errors, is_eager=True)]
NoProgress = Annotated[bool, typer.Option("--no-progress",
                                          help="Hide progress bars (--json hides them too).")]


class ShardProgress:
    """Rich progress bars (on stderr) for the library's `progress(description, total)` hook, one
    at a time (a new bar ends the last); an item ticked that is a str (where the work is now)
    shows after the description. Narrow enough for 80 columns."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self._bar: Progress | None = None

    def __call__(self, description: str, total: int) -> Any:
        if self._bar is not None:
            self._bar.stop()
        bar = Progress(TextColumn("{task.description}", markup=False), BarColumn(bar_width=12),
                       MofNCompleteColumn(), TimeElapsedColumn(), console=err,
                       disable=not self.enabled)
        self._bar = bar
        bar.start()
        task = bar.add_task(description, total=total)
        done = [0]

        def tick(item: Any) -> None:
            done[0] += 1
            now = f"{description}: {item}" if isinstance(item, str) else None  # None: unchanged
            bar.update(task, advance=1, description=now)
            if done[0] >= total:
                bar.stop()

        return tick


def json_safe(value: Any) -> Any:
    """`value` with every non-finite float (at any depth) replaced by None: JSON has no NaN or
    infinity, so a diverged model's probabilities print as null, never as bare NaN."""
    if isinstance(value, dict):
        return {_json_key(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if hasattr(value, "tolist") and not isinstance(value, (str, bytes)):  # numpy arrays and scalars
        return json_safe(value.tolist())
    if isinstance(value, float) or (isinstance(value, numbers.Real) and not isinstance(value, int)):
        number = float(value)
        return number if math.isfinite(number) else None
    return value


def _json_key(key: Any) -> Any:
    if isinstance(key, float) and not math.isfinite(key):
        return str(key)  # a key cannot be null
    return key


def _print_json(payload: Any) -> None:
    """JSON on stdout: indented and highlighted for a terminal, plain `json` (one line) for a pipe
    or a file."""
    text = json.dumps(json_safe(payload), default=str, allow_nan=False)
    if out.is_terminal:
        out.print_json(text)
    else:
        sys.stdout.write(text + "\n")


def _emit(as_json: bool, payload: Any, table: Table | None = None) -> None:
    if as_json:
        _print_json(payload)
    elif table is not None:
        out.print(table)


_STRICT_JSON = json.JSONEncoder(allow_nan=False)  # made once: json.dumps(allow_nan=False) makes one a call


def _json_line(row: Any) -> str:
    """One result as JSON on one line; the cost per row is one encoding, as in a file the library
    writes (a non-finite float, which JSON lacks, takes the slow way: null)."""
    try:
        return _STRICT_JSON.encode(row)
    except (TypeError, ValueError):
        return json.dumps(json_safe(row), default=str, allow_nan=False)


def _stream_json_array(chunks: Iterable[list[Any]], encode: Callable[[Any], str] = _json_line) -> int:
    """Print results as they come, as one JSON array with one element per line (never held in
    memory whole, never indented or highlighted); returns how many. An error midway leaves the
    array unclosed, so that no reader takes what came before it for the whole; an error before
    the first result (a column missing, a file unreadable) prints only the error. `encode`: one
    result as JSON (`str` for results the library gave as JSON already)."""
    count = 0
    try:
        for chunk in chunks:
            if chunk:
                sys.stdout.write(("[\n" if not count else ",\n") + ",\n".join(map(encode, chunk)))
                count += len(chunk)
    except BaseException:
        if count:
            sys.stdout.write("\n")  # the error (with --json, a JSON object) starts a line of its own
        raise
    sys.stdout.write("\n]\n" if count else "[]\n")
    return count


TABLE_ROWS = 50  # rows a table of results shows; --output or --json gives them all


def _kv_table(title: str, rows: dict[str, Any]) -> Table:
    table = Table(title=title, show_header=False)
    table.add_column(style="bold")
    table.add_column(overflow="fold")  # digests in full: they are there to be copied
    for key, value in rows.items():
        table.add_row(key, str(value))
    return table


def _open(store: Path, values: dict[str, Any], no_progress: bool = False, recover: bool = True,
          tidy: bool = True, read_only: bool = False) -> Sisa:
    """A writer recovers on opening (damage it found is raised once the command is done: see
    `_done`). A reader (`read_only`) never writes the database; where it may, it removes files a
    crash left unregistered (unless it is the audit, which reports them)."""
    from sisa.api import Sisa

    execution = build_execution(values, progress=not no_progress) if not read_only else None
    sisa = Sisa.open(store, execution=execution, progress=ShardProgress(not no_progress),
                     recover=recover, read_only=read_only, store_config=build_store(values))
    if not recover and tidy:
        sisa.tidy()
    return sisa


def _read(store: Path, values: dict[str, Any], tidy: bool = True) -> Sisa:
    """Open a store for a command that only reads it."""
    return _open(store, values, recover=False, tidy=tidy, read_only=True)


def _retrain_payload(report: Any) -> dict[str, Any]:
    return {"shards_retrained": [r.shard for r in report.retrained],
            "start_slices": {str(r.shard): r.start_slice for r in report.retrained},
            "samples": report.samples, "seconds": round(report.seconds, 3),
            **({"ingest_seconds": round(report.ingest_seconds, 3)} if report.ingest_seconds else {})}


@app.callback()
def _root(
    ctx: typer.Context,
    config: Annotated[Path | None, typer.Option("--config", help="TOML file of option defaults.")] = None,
) -> None:
    if config is not None:
        try:
            values = tomllib.loads(config.read_text())
        except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
            raise typer.BadParameter(f"cannot read config file {str(config)!r}: {exc}") from exc
        flat = {k.replace("-", "_"): v for k, v in values.items()}
        ctx.default_map = {name: flat for name in ctx.command.commands}  # type: ignore[attr-defined]


@app.command(cls=_Command)
@with_options("data", "partition", "training", "execution", "serving", "store")
def train(
    store: Store,
    data: Data,
    embeddings_from: Annotated[Path | None, typer.Option(
        help="head: seed the embedding cache from another store on the same texts.")] = None,
    no_progress: NoProgress = False,
    as_json: Json = False,
    **values: Any,
) -> None:
    """Validate the data, create a store, and train every shard.

    Each shard is trained slice by slice, with a checkpoint after every slice.

    Example: sisa train --store stores/digits --data builtin:digits --shards 4 --slices 4
    """
    from sisa.api import Sisa

    quiet = no_progress or as_json  # --json: stdout is the document, and stderr stays quiet
    config = build_config(values, progress=not quiet)
    with Sisa.train(store, data, config, build_spec(values), progress=ShardProgress(not quiet),
                    embeddings_from=embeddings_from, store_config=build_store(values)) as sisa:
        report = sisa.training_report_
    payload = {"store": str(store), "records": report.records, "shards": config.partition.shards,
               "slices": config.partition.slices, "samples": report.samples,
               "seconds": round(report.seconds, 3), "ingest_seconds": round(report.ingest_seconds, 3),
               "checkpoints_written": report.checkpoints_written, "warnings": report.warnings}
    for warning in report.warnings:
        err.print("[bold yellow]warning:[/bold yellow] " + escape(warning), markup=True)
    _emit(as_json, payload, _kv_table("trained", payload))


@app.command(cls=_Command)
@with_options("execution", "store")
def add(store: Store, data: Data, no_progress: NoProgress = False, as_json: Json = False,
        **values: Any) -> None:
    """Add new records; the affected shards retrain.

    The records have the columns of the training data. Each affected shard retrains from its
    earliest affected slice, giving exactly what training from scratch on the union gives.
    """
    with _open(store, values, no_progress or as_json) as sisa:
        payload = _retrain_payload(sisa.add(data))
    _emit(as_json, payload, _kv_table("added", payload))


@app.command(cls=_Command)
@with_options("store")
def predict(
    store: Store, data: Data,
    output: Annotated[Path | None, typer.Option(help="Write predictions as JSON lines here.")] = None,
    as_json: Json = False,
    **values: Any,
) -> None:
    """Predict with the ensemble of the servable shards.

    Never with a shard whose deletion is pending. The input is read a chunk at a time, and
    predictions go out as they come: with --output, into a temporary file renamed once the whole
    input was read and found valid, and stdout carries a summary (how many, the file, the model
    that served them); with --json, one JSON array on stdout, one prediction per line; else a
    table of the first 50.
    """
    with _read(store, values) as sisa:
        if output is not None:
            written = sisa.write_predictions(data, output)
            served = sisa.ensemble()
            summary = {"predictions": written, "output": str(output),
                       "model_version": served.version, "shards": served.shards,
                       "config_digest": sisa.config_digest}
        elif as_json:
            _stream_json_array(sisa.prediction_lines(data), encode=str)
            return
        else:
            first: list[dict[str, Any]] = []
            count = 0
            for chunk in sisa.predictions(data):
                first += chunk[:TABLE_ROWS - len(first)]
                count += len(chunk)
    if output is not None:
        _emit(as_json, summary, _kv_table("predictions written", summary))
        return
    key = "id" if not first or "id" in first[0] else "row"  # rows are numbered where ids are absent
    table = Table(key, "prediction", "probability")
    for r in first:
        table.add_row(str(r[key]), r["prediction"], f"{r['probabilities'][r['prediction']]:.3f}")
    out.print(table)
    if count > len(first):
        err.print(f"the first {len(first)} of {count} predictions; --output FILE or --json gives "
                  "them all")


@app.command(cls=_Command)
@with_options("store")
def evaluate(store: Store, data: Data, as_json: Json = False, **values: Any) -> None:
    """Accuracy and macro-F1 of the ensemble and of each shard.

    The ensemble is scored with the store's voting, and with soft and hard voting each.
    """
    with _read(store, values) as sisa:
        result = sisa.evaluate(data)
    table = Table("model", "accuracy", "macro-F1", title=f"{result.examples} examples")
    for name, s in [("ensemble", result.ensemble), ("ensemble_soft", result.ensemble_soft),
                    ("ensemble_hard", result.ensemble_hard),
                    *[(f"shard {k}", v) for k, v in result.shards.items()]]:
        table.add_row(name, f"{s.accuracy:.4f}", f"{s.macro_f1:.4f}")
    _emit(as_json, result.to_dict(), table)


def _read_lines(path: Path, flag: str, what: str) -> list[str]:
    """The file's lines; one that cannot be read (missing, a directory, not UTF-8) is a usage
    error naming the file and why."""
    try:
        text = path.read_text(encoding="utf-8-sig")  # a BOM is not part of the first line
    except UnicodeDecodeError as exc:
        raise typer.BadParameter(
            f"cannot read {what} {str(path)!r}: it is not UTF-8 text (byte {exc.object[exc.start]:#04x} "
            f"at offset {exc.start}); save it as UTF-8", param_hint=flag) from None
    except OSError as exc:
        raise typer.BadParameter(f"cannot read {what} {str(path)!r}: {exc.strerror or exc}",
                                 param_hint=flag) from None
    # Only a newline ends a line: an id may hold other characters that str.splitlines() splits at.
    return [line.removesuffix("\r") for line in text.split("\n")]


def _read_ids(path: Path) -> list[str]:
    return [line.strip() for line in _read_lines(path, "--ids-file", "ids file") if line.strip()]


@app.command(cls=_Command)
@with_options("execution", "store")
def forget(
    store: Store,
    ids: Annotated[list[str] | None, typer.Argument(help="Record ids to forget.")] = None,
    ids_file: Annotated[Path | None, typer.Option(help="File with one record id per line.")] = None,
    group: Annotated[str | None, typer.Option(help="Forget every record of this group id.")] = None,
    no_progress: NoProgress = False, as_json: Json = False, **values: Any,
) -> None:
    """Forget records by id, or a whole group; print the receipt.

    The deletion is recorded durably, then the affected shards retrain from the last checkpoint
    before the earliest affected slice. Ids (ID... and --ids-file) and --group are two kinds of
    request: give one or the other, as the HTTP service takes one. Where a `sisa serve` of this
    store runs on this machine and SISA_SERVE_TOKEN holds its token, the deletion is handed to it
    (it holds the store open and its worker ready) and its receipt printed.

    Example: sisa forget --store stores/digits digits-0001 digits-0042
    """
    from sisa.errors import check_deletion_target  # light: a handed-off forget imports no torch

    wanted = list(ids or [])
    if ids_file is not None:
        wanted += _read_ids(ids_file)
    if not wanted and group is None:
        raise typer.BadParameter("give record ids, --ids-file, or --group")
    check_deletion_target(wanted if ids or ids_file is not None else None, group)
    if _handed_off(store, wanted if group is None else None, group, as_json):
        return
    # Not recovered on opening: the deletion is acknowledged first, so forgetting a damaged record
    # (which recovery would stop at) works; applying it then finishes anything a crash left.
    with _open(store, values, no_progress or as_json, recover=False, tidy=False) as sisa:
        r = sisa.forget_group(group) if group is not None else sisa.forget(wanted)
    if r.already_deleted:
        err.print(f"already deleted (no-op): {errors.name_some(r.already_deleted)}")
    receipt = r.to_dict()
    _emit(as_json, receipt, _receipt_table(f"deletion {r.request_id or '(nothing new)'}", receipt,
                                           len(r.record_ids)))


def _receipt_table(title: str, receipt: dict[str, Any], records: int) -> Table:
    return _kv_table(title, {
        "records": records,
        "shards retrained (from slice)": ", ".join(
            f"{a['shard']} ({a['start_slice']})" for a in receipt["affected_shards"]) or "-",
        "samples retrained": receipt["samples_retrained"],
        "seconds": receipt["seconds"],
        "checkpoints changed": len(receipt["checkpoints_changed"]),
        "checkpoints unchanged": len(receipt["checkpoints_unchanged"]),
    })


def _handed_off(store: Path, ids: list[str] | None, group: str | None, as_json: bool) -> bool:
    """Whether a running `sisa serve` of this store took the deletion (and applied it), which
    spares this process its imports; its receipt is printed as ours would be (`sisa.handoff`)."""
    from sisa.handoff import forget_through, running_service, token

    service, bearer = running_service(store), token()
    if service is None or bearer is None:
        return False
    state = forget_through(service, bearer, ids, group)
    if state is None:
        return False
    url, (receipt, ack) = service[0], (state["receipt"], state["acknowledged"])
    if ack.get("already_deleted"):
        err.print(f"already deleted (no-op): {ack['already_deleted']} record(s)")
    _emit(as_json, {**receipt, "record_ids": ids or [], "served_by": url}, _receipt_table(
        f"deletion {receipt['request_id']} (applied by the service at {url})", receipt,
        len(receipt.get("record_digests") or ids or [])))
    return True


@app.command(cls=_Command)
@with_options("store")
def status(store: Store, as_json: Json = False, **values: Any) -> None:
    """Per shard: live checkpoint, sha256, records, pending deletions.

    For each shard: the live slice checkpoint, its weights file and sha256, its live and deleted
    records, and whether a deletion is pending. Loads no model.
    """
    from sisa.status import quick_status

    # No model loaded, no torch imported; and where the store recorded its config digest (all but
    # the oldest stores), not even sisa.api, whose imports were a third of the command's time.
    custody = build_store(values)
    result = quick_status(store, custody)
    if result is None:
        from sisa.api import Sisa

        result = Sisa.read_status(store, custody)
    table = Table("shard", "live slice", "live", "deleted", "pending", "sha256",
                  Column("weights", overflow="fold"),  # in full: it is there to be found
                  title=f"{result.store}: {result.live_records} live, "
                        f"{result.deleted_records} deleted records",
                  caption=f"predictions read: {', '.join(result.reads)}" if result.reads else None)
    for s in result.shards:
        table.add_row(str(s.shard), str(s.live_slice), str(s.live_records), str(s.deleted_records),
                      "yes" if s.deletion_pending else "", (s.sha256 or "-")[:16], s.weights_path or "-")
    _emit(as_json, result.to_dict(), table)


@app.command(cls=_Command)
@with_options("store")
def audit(store: Store, as_json: Json = False, **values: Any) -> None:
    """Prove that no file holds or derives from a deleted record.

    Verifies every checkpoint's files and manifest, that none holds a deleted record, that each
    live checkpoint matches its shard's records, and that nothing unregistered is on disk; exit 1
    on any violation.
    """
    with _read(store, values, tidy=False) as sisa:
        result = sisa.audit()
    if as_json:
        _emit(True, result.to_dict())
    else:
        out.print(f"audit: {'OK' if result.ok else 'VIOLATIONS'} ({result.checkpoints_checked} "
                  "checkpoints checked)")
        if result.violations:  # paths in full: they are there to be found and copied
            table = Table("shard", "slice", Column("path", overflow="fold"),
                          Column("problem", overflow="fold"))
            for v in result.violations:
                table.add_row(_fmt(v.shard), _fmt(v.slice), v.path or "-", v.problem)
            out.print(table)
        # A violation about a file or a checkpoint is one repair heals (links and strays removed,
        # checkpoints rebuilt); the others (a damaged database or record, the config) it cannot.
        if any(v.path is not None or v.key is not None for v in result.violations):
            err.print(f"[bold]hint:[/bold] `sisa repair --store {escape(shlex.quote(str(store)))}` "
                      "removes the links and stray files and rebuilds the damaged checkpoints",
                      highlight=False, markup=True)
    if not result.ok:
        raise typer.Exit(1)


def _subcommands(name: str, help_text: str) -> typer.Typer:
    """A group of commands under `sisa NAME`."""
    group = typer.Typer(cls=_Group, no_args_is_help=True, add_completion=False,
                        pretty_exceptions_enable=False, help=help_text)
    app.add_typer(group, name=name)
    return group


key_app = _subcommands("key", "The store's ledger key, which keys seals, receipts, tombstones.")


@key_app.command("move-out", cls=_Command)
@with_options("store")
def key_move_out(store: Store, as_json: Json = False, **values: Any) -> None:
    """Keep the store's ledger key outside it, in a key file.

    The new file --key-file (mode 600) is written first: from then on every command on the store
    needs the key file (or SISA_KEY_FILE), and whoever can write the store's database can no
    longer re-seal a checkpoint.

    Example: sisa key move-out --store stores/digits --key-file ~/.sisa/digits.key
    """
    from sisa.api import Sisa

    config = build_store(values)
    if config.key_file is None:
        raise typer.BadParameter("give --key-file (the new file to keep the key in)")
    inside = dataclasses.replace(config, key_file=None)  # the key is still in the store
    with Sisa.open(store, recover=False, store_config=inside) as sisa:
        sisa.move_key_out(config.key_file)
    payload = {"store": str(store), "key_file": config.key_file}
    _emit(as_json, payload, _kv_table("key moved out", payload))


receipts_app = _subcommands("receipts", "The deletion receipts: a keyed hash chain.\n\nEach "
                                        "receipt is keyed and linked to the one before.")


@receipts_app.command("verify", cls=_Command)
@with_options("store")
def receipts_verify(
    store: Store,
    expect: Annotated[str | None, typer.Option(
        help="A head digest kept elsewhere: the chain must end in it or pass through it.")] = None,
    as_json: Json = False,
    **values: Any,
) -> None:
    """Re-check the chain of deletion receipts against the store.

    Checks each receipt's keyed digest, its link to the one before, its deleted ids' tombstones
    and its config digest; exit 1 on any problem. Keep the head digest it prints somewhere else:
    a rewritten chain will not end in it.

    Example: sisa receipts verify --store stores/digits
    """
    with _read(store, values, tidy=False) as sisa:
        result = sisa.verify_receipts(expect)
    summary = {"chain": "OK" if result.ok else "BROKEN", "receipts checked": result.receipts,
               "head digest": result.head or "-", "pending deletions": result.pending,
               "unchained (schema 4) receipts": result.unchained}
    if not as_json:
        out.print(_kv_table("receipts", summary))
        for problem in result.problems:
            err.print("[bold red]problem:[/bold red] " + escape(problem), highlight=False, markup=True)
    _emit(as_json, result.to_dict())
    if not result.ok:
        raise typer.Exit(1)


@receipts_app.command("show", cls=_Command)
@with_options("store")
def receipts_show(
    store: Store,
    which: Annotated[str, typer.Argument(help="Deletion request id, or the receipt's sequence number.")],
    as_json: Json = False,
    **values: Any,
) -> None:
    """Print one deletion receipt.

    It holds keyed digests of the deleted ids, the shards retrained with their weights' sha256
    before and after, the untouched shards' sha256, the config digest, the times, and the digests
    that chain it.

    Example: sisa receipts show --store stores/digits 1
    """
    with _read(store, values, tidy=False) as sisa:
        receipt = sisa.receipt(which)
    rows = {k: (json.dumps(v) if isinstance(v, dict | list) else v) for k, v in receipt.items()}
    _emit(as_json, receipt, _kv_table(f"receipt {receipt.get('sequence', '-')}", rows))


@app.command(cls=_Command)
@with_options("execution", "store")
def recover(store: Store, no_progress: NoProgress = False, as_json: Json = False,
            **values: Any) -> None:
    """Finish what a crash interrupted.

    Applies pending deletions, additions and training, removes files left on disk, and heals what
    is safe to heal unasked: a cut or lost deletion journal, deletions the database lost (a lost
    WAL, a backup restored behind its journal or witness), a deleted record that reappeared, a
    receipt reset to pending. Exit 1 naming any damage it did not build on.
    """
    with _open(store, values, no_progress or as_json) as sisa:
        receipts, damage = sisa.recovered_, sisa.damage_
    payload = {"deletions_applied": [r.to_dict() for r in receipts]}
    if as_json and damage is not None:  # one JSON object: what was done, and the damage left
        _emit(True, {**payload, **error_object(damage, str(damage), hint(damage))})
        raise typer.Exit(1)
    _emit(as_json, payload, _kv_table("recovered", {"deletions applied": len(receipts)}))
    if damage is not None:
        raise damage


@app.command(cls=_Command)
@with_options("execution", "store")
def repair(
    store: Store,
    shard: Annotated[list[int] | None, typer.Option(
        help="Shard to repair (repeat for several); default: every shard.")] = None,
    from_scratch: Annotated[bool, typer.Option(
        help="Retrain from slice 0 even where checkpoints are intact.")] = False,
    no_progress: NoProgress = False, as_json: Json = False, **values: Any,
) -> None:
    """Heal what the audit reports, bit-identically.

    Removes links and stray files, and retrains shards from their first missing or corrupt
    checkpoint (as `sisa audit` reports them), resuming from the intact one before it; the result
    is bit-identical to the lost one. Then finishes any interrupted deletion, as `sisa recover`
    does.
    """
    with _open(store, values, no_progress or as_json, recover=False) as sisa:
        report = sisa.repair(shard, from_scratch=from_scratch)
    payload = {**_retrain_payload(report),
               "deletions_applied": [r.to_dict() for r in report.deletions_applied]}
    _emit(as_json, payload, _kv_table("repaired", _retrain_payload(report)))


@app.command(cls=_Command)
@with_options("service", "execution", "store")
def serve(
    store: Store,
    token_file: Annotated[Path | None, typer.Option(
        help="File holding the bearer token (mode 600); default: the SISA_SERVE_TOKEN variable.")] = None,
    as_json: Annotated[bool, typer.Option(
        "--json", help="On start, print the settings and the address as JSON; an error, too, is "
                       "then JSON on stdout.", callback=_json_errors, is_eager=True)] = False,
    **values: Any,
) -> None:
    """Serve predictions, generation and deletions over HTTP.

    Runs until interrupted. Answers never come from a shard with an acknowledged deletion; a
    worker retrains it and swaps it back in.

    Example: SISA_SERVE_TOKEN=$(cat token) sisa serve --store stores/digits --port 8000
    """
    from sisa.service import read_token
    from sisa.service import serve as run_service

    config = build_service(values, None if values.get("no_auth") else read_token(token_file))
    if not config.loopback:
        err.print(f"warning: listening on {config.host}, not loopback: anyone who reaches this "
                  "machine reaches the service; put TLS in front of it")

    def started(summary: dict[str, Any]) -> None:
        if as_json:
            _emit(True, summary)
        else:
            err.print(f"serving {summary['store']} at {summary['url']}")
        sys.stdout.flush()

    run_service(store, config, build_execution(values, progress=False), on_start=started,
                store_config=build_store(values))


Combine = Annotated[str | None, typer.Option(
    help="How the shards combine: mean (mixture of next-token probabilities), product "
         "(normalised mean of log-probabilities) or merged (one adapter merged from theirs: one "
         "pass per token). Default: the store's (set at train time with --combine).")]


def _check_combine(combine: str | None) -> Any:
    if combine is not None and combine not in COMBINES:
        raise typer.BadParameter(f"must be {', '.join(COMBINES)}, got {combine!r}",
                                 param_hint="--combine")
    return combine


@app.command(cls=_Command)
@with_options("store")
def generate(
    store: Store,
    prompt: Annotated[list[str] | None, typer.Option(help="A prompt (repeat for several).")] = None,
    prompts_file: Annotated[Path | None, typer.Option(help="File with one prompt per line.")] = None,
    max_new_tokens: Annotated[int, typer.Option(help="Tokens to generate at most.")] = 48,
    combine: Combine = None,
    temperature: Annotated[float, typer.Option(help="0: greedy; above 0: sampled, seeded.")] = 0.0,
    seed: Annotated[int, typer.Option(help="Seed of the sampling (prompt i uses seed + i).")] = 0,
    stop: Annotated[list[str] | None, typer.Option(help="Stop at this string (repeatable).")] = None,
    as_json: Json = False,
    **values: Any,
) -> None:
    """Causal LM: continue prompts with the ensemble.

    All servable shards' adapters run in one batched pass per token (never a shard with a
    deletion pending).

    Example: sisa generate --store stores/chat --prompt "how was your weekend?"
    """
    prompts = list(prompt or [])
    if prompts_file is not None:
        lines = _read_lines(prompts_file, "--prompts-file", "prompts file")
        prompts += [line for line in lines if line.strip()]
    if not prompts:
        raise typer.BadParameter("give --prompt or --prompts-file")
    with _read(store, values) as sisa:
        result = sisa.generate(prompts, max_new_tokens, _check_combine(combine), temperature, seed,
                               list(stop or []))
    table = Table("prompt", "generated", "tokens",
                  title=f"model {result[0].model_version[:12]} (shards {result[0].shards})")
    for g in result:
        table.add_row(g.prompt, g.text, str(g.tokens))
    _emit(as_json, [g.to_dict() for g in result], table)


@app.command(cls=_Command)
@with_options("store")
def export(
    store: Store,
    directory: Annotated[Path, typer.Argument(help="A new (or empty) directory for the model.")],
    export_format: Annotated[str, typer.Option(
        "--format", help="hf: one Hugging Face model directory, the base with the shards' "
                         "adapters merged in (their mean update), and its provenance.")] = "hf",
    as_json: Json = False,
    **values: Any,
) -> None:
    """Causal LM: the store's model as one Hugging Face directory.

    AutoModelForCausalLM (and evaluators that take a model path) load it with no sisa installed.
    The shards' LoRA updates are averaged into the base: one model, not the ensemble's mixture
    that generate and score serve. Refused while a deletion is pending; after a deletion the
    weights are bit-identical to a store trained from scratch without the deleted records.
    sisa_provenance.json names the checkpoints, the config digest and the receipts' head.
    """
    from sisa.workflows.export import export_hf

    if export_format != "hf":
        raise errors.ConfigError(f"--format must be 'hf', got {export_format!r}")
    with _read(store, values) as sisa:
        report = export_hf(sisa, directory)
    _emit(as_json, report.to_dict(), _kv_table("exported", report.to_dict()))


@app.command(cls=_Command)
@with_options("store")
def score(
    store: Store, data: Data, combine: Combine = None,
    output: Annotated[Path | None, typer.Option(help="Write per-record scores as JSON lines.")] = None,
    as_json: Json = False,
    **values: Any,
) -> None:
    """Causal LM: log-likelihood and perplexity of each record.

    Each record's text (after its prompt) is scored under the ensemble. With --output, the
    scores go to that file as JSON lines, and stdout carries the totals only.
    """
    with _read(store, values) as sisa:
        result = sisa.score(data, _check_combine(combine))
    if output is not None:
        output.write_text("".join(_json_line(r.to_dict()) + "\n" for r in result.records))
        summary = {"scores": len(result.records), "output": str(output), "combine": result.combine,
                   "tokens": result.tokens, "perplexity": result.perplexity,
                   "model_version": result.model_version, "shards": result.shards}
        _emit(as_json, summary, _kv_table("scores written", summary))
        return
    table = Table("id", "tokens", "log-likelihood", "perplexity",
                  title=f"{len(result.records)} records, {result.tokens} tokens: perplexity "
                        f"{result.perplexity:.3f} ({result.combine})")
    for r in result.records[:TABLE_ROWS]:
        table.add_row(r.id, str(r.tokens), f"{r.logprob:.3f}", f"{r.perplexity:.3f}")
    _emit(as_json, result.to_dict(), table)
    if not as_json and len(result.records) > TABLE_ROWS:
        err.print(f"the first {TABLE_ROWS} of {len(result.records)} records; --output FILE or "
                  "--json gives them all")


@app.command(cls=_Command)
@with_options("execution", "store")
def canaries(
    store: Store,
    out_file: Annotated[Path, typer.Option("--out", help="Where to write the canary set (JSON).")],
    inserted: Annotated[int, typer.Option(
        help="Canaries put in the store, each a secret of a chosen user.")] = 8,
    per_user: Annotated[int, typer.Option(
        help="Canaries each chosen user gets: more secrets for the verdict from fewer users.")] = 1,
    never: Annotated[int, typer.Option(help="Canaries of made-up users, never trained on.")] = 8,
    digits: Annotated[int, typer.Option(help="Digits in each secret (1..5).")] = 4,
    repeats: Annotated[int, typer.Option(help="Copies of each inserted canary.")] = 8,
    seed: Annotated[int, typer.Option(help="Seed of the users chosen and the secrets.")] = 0,
    template: Annotated[str, typer.Option(
        help="The canary text; it must end with {secret} (the digits), e.g. "
             "'the code of my locker is {secret}'.")] = "my secret number is {secret}",
    no_progress: NoProgress = False, as_json: Json = False, **values: Any,
) -> None:
    """Causal LM: insert canaries, secrets of chosen users.

    Each canary is a secret of random digits in a fixed template, --per-user of them for each
    chosen user, added as records of that user; the canary set that `sisa prove` reads is
    written to --out. The affected shards retrain, exactly as for any `add`.
    """
    from sisa.workflows.proof import insert_canaries

    with _open(store, values, no_progress or as_json) as sisa:
        chosen, report = insert_canaries(sisa, inserted, never, digits, repeats, seed, template,
                                         per_user)
    chosen.save(out_file)
    payload = {"canaries": str(out_file), "inserted": inserted, "never_inserted": never,
               **_retrain_payload(report)}
    _emit(as_json, payload, _kv_table("canaries", payload))


@app.command(cls=_Command)
@with_options("execution", "store")
def prove(
    store: Store,
    canaries_file: Annotated[Path, typer.Option("--canaries", help="Canary set from `sisa canaries`.")],
    holdout: Annotated[str, typer.Option(
        help="Never-trained texts (file or builtin:NAME:test): the non-members.")],
    forget_group: Annotated[list[str] | None, typer.Option(
        help="Forget this group between the two measurements (repeatable); without it, only "
             "measure.")] = None,
    references: Annotated[int, typer.Option(help="Random reference secrets per canary.")] = 1000,
    holdout_limit: Annotated[int, typer.Option(help="Held-out texts scored.")] = 64,
    retain_limit: Annotated[int, typer.Option(help="Retained texts scored.")] = 64,
    combine: Combine = None,
    in_place: Annotated[bool, typer.Option(
        "--in-place", help="Forget in the store itself: a real, receipted deletion. Without it the "
                           "deletion happens on a temporary copy, removed afterwards, and the "
                           "store is left as it was.")] = False,
    oracle: Annotated[bool, typer.Option(
        "--oracle", help="Also train the retrained oracle (a scratch store on the records left, "
                         "same config and seed) and compare each shard's weights with the store's "
                         "after the deletion, by sha256. Costs a full training.")] = False,
    margin: Annotated[float, typer.Option(
        help="Equivalence margin of the verdict's TOST, in bits of exposure gained over the base "
             "model: forgotten canaries must be within it of never-inserted ones.")] = 0.5,
    template: Annotated[str | None, typer.Option(
        help="The canaries' text, ending with {secret}, where it is not the canary set's (a set "
             "written by hand or another tool); the store's canary records must read it.")] = None,
    no_progress: NoProgress = False, as_json: Json = False, **values: Any,
) -> None:
    """Causal LM: evidence that forgotten text is gone.

    Measures canary exposure (own shard and ensemble; gained over the base model) and
    membership-inference AUCs with 95% intervals (LOSS, zlib, Min-K%, Min-K%++, reference)
    before and after forgetting, on a temporary copy of the store unless --in-place. The verdict
    (yes, no, inconclusive) says plainly when the model never memorised the canaries, when the
    equivalence test lacks power, and when held-out perplexity rose past 1.05x; with --oracle,
    the store after the deletion is compared with a scratch store on the records left.

    Example: sisa prove --store stores/chat --canaries canaries.json --holdout builtin:chitchat:test
    --forget-group <user id>
    """
    from sisa.workflows.proof import CanarySet
    from sisa.workflows.proof import prove as run_prove

    chosen = CanarySet.load(canaries_file)
    if template is not None:
        chosen = chosen.with_template(template)
    quiet = no_progress or as_json
    with _open(store, values, quiet) as sisa:
        report = run_prove(sisa, chosen, holdout, forget_group or [], holdout_limit, retain_limit,
                           _check_combine(combine), references, progress=ShardProgress(not quiet),
                           in_place=in_place, oracle=oracle, margin=margin)
    if not as_json:
        _print_proof(report)
    else:
        _emit(True, report.to_dict())


def _fmt(value: Any, digits: int = 2) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def proof_tables(report: Any) -> list[Table]:
    """`sisa prove`'s tables, 80 columns wide at most: numbers never wrap (no_wrap), names and
    ids fold onto a second line where the width runs out."""
    from sisa.workflows.proof import canary_rows, forgotten_rows, verdict_rows

    phases = ["before"] + (["after"] if report.after is not None else [])

    def table(title: str, names: list[str], numbers: list[str], caption: str | None = None) -> Table:
        t = Table(title=title, caption=caption)
        for name in names:
            t.add_column(name, overflow="fold", min_width=6)
        for name in numbers:
            t.add_column(name, no_wrap=True, justify="right")
        return t

    canaries = table("canary exposure", ["canary"], ["inserted", "shard", *phases, "greedy"],
                     "bits, own shard / ensemble; greedy: whether greedy decoding gives the secret, "
                     "own shard/ensemble, " + " then ".join(phases) + " (y, n; -: shard not serving)")
    for row in canary_rows(report):
        canaries.add_row(*row)
    tables = [canaries]
    forgotten = forgotten_rows(report)
    if forgotten:
        gone = table("the forgotten canaries, own shard", ["canary", "user"],
                     ["before", "after", "vs base", "chance"],
                     "bits; vs base: exposure after, gained over the base model alone; chance: that "
                     "a never-inserted canary's exposure is as high (2^-bits); never: the "
                     "never-inserted canaries, after")
        for row in forgotten:
            gone.add_row(*row)
        tables.append(gone)
    mia = table("membership AUC (forget vs holdout)", ["view", "score"], phases,
                "ensemble: with its 95% bootstrap interval; reference: the model's log-likelihood "
                "over the base model's")
    def auc(found: Any, view: str, name: str) -> str:
        value = found.membership_auc.get(view, {}).get(name)
        ci = found.membership_ci.get(view, {}).get(name)
        if value is None or not ci or any(math.isnan(x) for x in ci):
            return _fmt(value, 3)
        return f"{value:.2f} ({ci[0]:.2f}-{ci[1]:.2f})"

    for view, scores in report.before.membership_auc.items():
        for name in scores:
            mia.add_row(view, name, *[auc(e, view, name) for e in [report.before, report.after] if e])
    ppl = table("perplexity", ["texts"], phases)
    for name in report.before.perplexity:
        ppl.add_row(name, *[_fmt(e.perplexity[name]) for e in [report.before, report.after] if e])
    verdict = Table(title="verdict", show_header=False)
    verdict.add_column(style="bold", overflow="fold", max_width=22)
    verdict.add_column(overflow="fold")
    for key, value in verdict_rows(report):
        verdict.add_row(key, value)
    return [*tables, mia, ppl, verdict]


def _print_proof(report: Any) -> None:
    for table in proof_tables(report):
        out.print(table)
    for note in report.notes:
        err.print(f"[bold yellow]note:[/bold yellow] {escape(note)}", markup=True)


@app.command(cls=_Command)
@with_options("partition", "training", "execution", exclude=("backend",))
def demo(
    backend: Annotated[str, typer.Option(
        help="head (default), lora, mlp (on digits), or causal_lm (SmolLM2 on chitchat, with "
             "canaries and the evidence of forgetting).")] = "head",
    dataset: Annotated[str | None, typer.Option(
        help="Built-in data set; default rotten_tomatoes (digits for mlp).")] = None,
    limit: Annotated[int | None, typer.Option(
        help="Use only this many training records (a stable subset); default per backend.")] = None,
    forget_count: Annotated[int, typer.Option(help="Random records to forget.")] = 5,
    no_progress: NoProgress = False,
    as_json: Json = False,
    **values: Any,
) -> None:
    """Train SISA and a monolith on built-in data, forget, compare costs.

    Trains a SISA ensemble and a monolith (S=1, R=1) on a built-in data set, evaluates both on its
    held-out split, forgets random records, and compares the deletion's cost with retraining from
    scratch. Default: the frozen-encoder head backend on Rotten Tomatoes.
    """
    from sisa.workflows.demo import demo_options, run, summary_rows

    quiet = no_progress or as_json  # --json: stdout is the document, and stderr stays quiet
    config = build_config(demo_options(backend, values), progress=not quiet)
    result = run(config, dataset, limit, forget_count, ShardProgress(not quiet))
    proof = result.get("proof")
    if as_json:
        _emit(True, {**result, "proof": proof.to_dict()} if proof is not None else result)
    elif proof is not None:
        for g in result["generated"]:
            out.print(f"[bold]prompt:[/bold] {escape(g['prompt'])}\n[bold]ensemble:[/bold] "
                      f"{escape(g['text'])}", markup=True)
        out.print(f"trained {result['records']} records ({result['canary_records']} canary copies) "
                  f"on S={result['shards']}, R={result['slices']} in {result['train_seconds']:.1f} "
                  f"s; forgot {len(proof.forgotten_groups)} user(s) in one request; audit "
                  f"{'OK' if result['audit_ok'] else 'VIOLATIONS'}")
        _print_proof(proof)
    else:
        p = config.partition
        table = Table("", f"SISA (S={p.shards}, R={p.slices})", "monolith (S=1, R=1)",
                      title=f"sisa demo: {backend} on {result['dataset']} ({result['records']} "
                            f"training, {result['test_records']} held-out records)")
        for row in summary_rows(result):
            table.add_row(*row)
        out.print(table)


REFERENCE_HEAD = """# Command-line reference

Every `sisa` command and its options, generated from the CLI itself (`python -c 'import sisa.cli
as c; print(c.cli_reference(), end="")' > docs/cli.md`; a test checks it is current). `sisa COMMAND
--help` prints the same, its options grouped in panels as the table below groups them. Options
may also come from a TOML file (`sisa --config sisa.toml train`, keys are option names).

## Output

- `--json` prints one JSON document on stdout: indented and highlighted on a terminal, plain
  `json` on one line on a pipe or into a file. The tables of `predict` and `score` show the first
  50 rows; `--json` or `--output` gives them all.
- An error with `--json` is one JSON object on stdout, `{"error": {"code": ..., "message": ...,
  "hint": ...}}` (`hint`: null when there is none), and the exit status is the same as without
  `--json`: 1, or 2 for a malformed command line. `code` is stable: `usage` (a malformed command
  line), `io` (a file the system cannot read or write), or the library error's class in snake
  case without `Error` (`store_not_found`, `unknown_record`, `config`, `record`, `column`,
  `deletion_target`, `damaged_store`, ...; where the HTTP service has the same error, the same
  code). `sisa recover --json` that leaves damage prints its result with `error` added.
- `sisa predict --json` streams: one JSON array, one prediction per line, printed as the input is
  read (never held whole). An error midway leaves the array unclosed (so no reader takes the part
  for the whole), then the error follows on a line of its own, with exit status 1.
- `sisa predict --output FILE` writes the predictions to FILE as JSON lines and prints a summary
  only: `predictions` (how many), `output`, and what identifies the model that served them,
  `model_version` (a digest of the serving checkpoints), `shards` and `config_digest`. `sisa
  score --output FILE` likewise.

## The options that set a configuration

Generated from the config classes in `sisa/config.py` (`python -m sisa.options` prints this
table); a training option's default depends on the backend.

"""


def cli_reference() -> str:
    """docs/cli.md: the configuration options, then every command with its options."""
    from sisa.options import markdown_table

    def cell(text: str) -> str:
        return " ".join(str(text).split()).replace("|", "/")

    def commands(group: Any, prefix: str) -> list[tuple[str, Any]]:
        out: list[tuple[str, Any]] = []
        for name, command in sorted(group.commands.items()):
            if hasattr(command, "commands"):  # a group of commands (typer may vendor click)
                out += commands(command, f"{prefix}{name} ")
            else:
                out.append((f"{prefix}{name}", command))
        return out

    parts = [REFERENCE_HEAD, markdown_table(), "\n## Commands\n"]
    for name, command in commands(typer.main.get_command(app), "sisa "):
        help_text = (command.help or "").strip().split("\n\n")
        parts.append(f"\n### {name}\n\n{cell(help_text[0])}\n")
        parts += [f"\n{cell(p)}\n" for p in help_text[1:]]
        rows = []
        for param in command.params:
            if param.param_type_name != "option" or param.hidden:
                continue
            flags = ", ".join(f"`{o}`" for o in [*param.opts, *param.secondary_opts])
            default = param.default
            shown = "-" if default is None or (param.is_flag and default is False) else cell(str(default))
            if isinstance(param.show_default, str):  # a default that depends (on the backend)
                shown = cell(param.show_default)
            if param.required:
                shown = "required"
            rows.append(f"| {flags} | {shown} | {cell(param.help or '')} |")
        if rows:
            parts.append("\n| option | default | what it does |\n| --- | --- | --- |\n")
            parts.append("\n".join(rows) + "\n")
    return "".join(parts)


def main() -> None:
    """The `sisa` command. Once a command has returned (its stores closed, its output written),
    the process ends without the interpreter's teardown, which only frees memory: torch's alone
    takes half a second, a large store's data as long again."""
    try:
        app()
        code: int | str | None = 0
    except SystemExit as exc:
        code = exc.code
    if code is not None and not isinstance(code, int):
        print(code, file=sys.stderr)
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code or 0)


if __name__ == "__main__":
    main()
