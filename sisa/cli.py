"""The `sisa` command line: a thin shell over `sisa.api.Sisa`.

Each command parses options, calls one library function and prints a table (or JSON with --json).
The options that set a config are generated from the config classes (`sisa.options`). Library
errors become one clean message, with the command that fixes them, and exit status 1 in `_Group`.
"""

from __future__ import annotations

import json
import tomllib
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from typer.core import TyperGroup

from sisa import errors
from sisa.options import build_config, build_execution, build_spec, with_options

if TYPE_CHECKING:
    from sisa.api import Sisa

out = Console()
err = Console(stderr=True)

# What to do about each kind of error, in CLI terms (the library's messages name no commands).
HINTS: list[tuple[type[errors.SisaError], str]] = [
    (errors.StoreNotFoundError, "create one with `sisa train --store DIR --data ...`"),
    (errors.StoreExistsError, "give another --store, or remove that directory first"),
    (errors.IncompleteStoreError, "run `sisa train` with the same --store again: it replaces the "
                                  "incomplete store"),
    (errors.CheckpointError, "`sisa repair --store DIR` retrains the shard from its last intact "
                             "checkpoint, bit-identically"),
    (errors.NoServableShardError, "`sisa recover --store DIR` applies pending deletions"),
    (errors.ColumnError, "name the columns with --id-column, --label-column, --text-column or "
                         "--feature-columns (and --group-column, --prior-column)"),
    (errors.InputKindError, "for a --text-column use --backend head or lora; for numeric "
                            "--feature-columns use --backend mlp"),
]


def hint(exc: errors.SisaError) -> str | None:
    return next((text for cls, text in HINTS if isinstance(exc, cls)), None)


class _Group(TyperGroup):
    """Turns every library error into one clean message and exit status 1."""

    def invoke(self, ctx: Any) -> Any:
        try:
            return super().invoke(ctx)
        except errors.SisaError as exc:
            text = hint(exc)
            err.print("[bold red]error:[/bold red] " + escape(str(exc)), highlight=False)
            if text:
                err.print("[bold]hint:[/bold] " + escape(text), highlight=False)
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
Json = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON instead of tables.")]
NoProgress = Annotated[bool, typer.Option("--no-progress", help="Hide progress bars.")]


class ShardProgress:
    """Rich progress bars (on stderr) for the library's `progress(description, total)` hook."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled

    def __call__(self, description: str, total: int) -> Any:
        bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                       TimeElapsedColumn(), console=err, disable=not self.enabled)
        bar.start()
        task = bar.add_task(description, total=total)
        done = [0]

        def tick(_result: Any) -> None:
            done[0] += 1
            bar.advance(task)
            if done[0] >= total:
                bar.stop()

        return tick


def _emit(as_json: bool, payload: Any, table: Table | None = None) -> None:
    if as_json:
        out.print_json(json.dumps(payload, default=str))
    elif table is not None:
        out.print(table)


def _kv_table(title: str, rows: dict[str, Any]) -> Table:
    table = Table(title=title, show_header=False)
    table.add_column(style="bold")
    table.add_column()
    for key, value in rows.items():
        table.add_row(key, str(value))
    return table


def _open(store: Path, values: dict[str, Any] | None = None, no_progress: bool = False,
          recover: bool = True, tidy: bool = True) -> Sisa:
    """A writer recovers on opening; a reader only removes files a crash left unregistered
    (unless it is the audit, which reports them)."""
    from sisa.api import Sisa

    execution = build_execution(values, progress=not no_progress) if values is not None else None
    sisa = Sisa.open(store, execution=execution, progress=ShardProgress(not no_progress),
                     recover=recover)
    if not recover and tidy:
        sisa.tidy()
    return sisa


def _retrain_payload(report: Any) -> dict[str, Any]:
    return {"shards_retrained": [r.shard for r in report.retrained],
            "start_slices": {str(r.shard): r.start_slice for r in report.retrained},
            "samples": report.samples, "seconds": round(report.seconds, 3)}


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


@app.command()
@with_options("data", "partition", "training", "execution", "serving")
def train(
    store: Store,
    data: Data,
    embeddings_from: Annotated[Path | None, typer.Option(
        help="head: seed the embedding cache from another store on the same texts.")] = None,
    no_progress: NoProgress = False,
    as_json: Json = False,
    **values: Any,
) -> None:
    """Validate the data, create a store, and train every shard slice by slice.

    Example: sisa train --store stores/digits --data builtin:digits --shards 4 --slices 4
    """
    from sisa.api import Sisa

    sisa = Sisa.train(store, data, build_config(values, progress=not no_progress), build_spec(values),
                      progress=ShardProgress(not no_progress), embeddings_from=embeddings_from)
    report = sisa.training_report_
    payload = {"store": str(store), "records": sisa.status().live_records,
               "shards": sisa.config.partition.shards, "slices": sisa.config.partition.slices,
               "samples": report.samples, "seconds": round(report.seconds, 3),
               "checkpoints_written": report.checkpoints_written}
    sisa.close()
    _emit(as_json, payload, _kv_table("trained", payload))


@app.command()
@with_options("execution")
def add(store: Store, data: Data, no_progress: NoProgress = False, as_json: Json = False,
        **values: Any) -> None:
    """Add new records (same columns as training); affected shards retrain from the earliest
    affected slice, giving exactly what training from scratch on the union gives."""
    with _open(store, values, no_progress) as sisa:
        payload = _retrain_payload(sisa.add(data))
    _emit(as_json, payload, _kv_table("added", payload))


@app.command()
def predict(
    store: Store, data: Data,
    output: Annotated[Path | None, typer.Option(help="Write predictions as JSON lines here.")] = None,
    as_json: Json = False,
) -> None:
    """Predict with the ensemble (never with a shard whose deletion is pending)."""
    with _open(store, recover=False) as sisa:
        ids, inputs, _ = sisa.load_inputs(data)
        proba = sisa.predict_proba(inputs)  # one ensemble for both: predict is its argmax
        classes = sisa.classes_
        labels = [classes[i] for i in proba.argmax(axis=1)]
        rows: list[dict[str, Any]] = [
            {"id": i, "prediction": p,
             "probabilities": {c: round(float(v), 6) for c, v in zip(classes, pr, strict=True)}}
            for i, p, pr in zip(ids, labels, proba, strict=True)]
    if output is not None:
        output.write_text("".join(json.dumps(r) + "\n" for r in rows))
        err.print(f"wrote {len(rows)} predictions to {output}")
    if as_json:
        _emit(True, rows)
    elif output is None:
        table = Table("id", "prediction", "probability")
        for r in rows:
            table.add_row(r["id"], r["prediction"], f"{r['probabilities'][r['prediction']]:.3f}")
        out.print(table)


@app.command()
def evaluate(store: Store, data: Data, as_json: Json = False) -> None:
    """Accuracy and macro-F1 of the ensemble (soft and hard voting) and of each shard."""
    with _open(store, recover=False) as sisa:
        result = sisa.evaluate(data)
    table = Table("model", "accuracy", "macro-F1", title=f"{result.examples} examples")
    for name, s in [("ensemble", result.ensemble), ("ensemble_soft", result.ensemble_soft),
                    ("ensemble_hard", result.ensemble_hard),
                    *[(f"shard {k}", v) for k, v in result.shards.items()]]:
        table.add_row(name, f"{s.accuracy:.4f}", f"{s.macro_f1:.4f}")
    _emit(as_json, result.to_dict(), table)


def _read_ids(path: Path) -> list[str]:
    try:
        text = path.read_text(encoding="utf-8-sig")  # a BOM is not part of the first id
    except (OSError, UnicodeDecodeError) as exc:
        raise typer.BadParameter(f"cannot read ids file {str(path)!r}: {exc}",
                                 param_hint="--ids-file") from None
    return [line.strip() for line in text.splitlines() if line.strip()]


@app.command()
@with_options("execution")
def forget(
    store: Store,
    ids: Annotated[list[str] | None, typer.Argument(help="Record ids to forget.")] = None,
    ids_file: Annotated[Path | None, typer.Option(help="File with one record id per line.")] = None,
    group: Annotated[str | None, typer.Option(help="Forget every record of this group id.")] = None,
    no_progress: NoProgress = False, as_json: Json = False, **values: Any,
) -> None:
    """Forget records by id (or a whole group): recorded durably, then the affected shards
    retrain from the last checkpoint before the earliest affected slice. Prints the receipt.

    Example: sisa forget --store stores/digits digits-0001 digits-0042
    """
    wanted = list(ids or [])
    if ids_file is not None:
        wanted += _read_ids(ids_file)
    if not wanted and group is None:
        raise typer.BadParameter("give record ids, --ids-file, or --group")
    with _open(store, values, no_progress) as sisa:
        receipts = []
        if wanted:
            receipts.append(sisa.forget(wanted))
        if group is not None:
            receipts.append(sisa.forget_group(group))
    for r in receipts:
        if r.already_deleted:
            err.print(f"already deleted (no-op): {errors.name_some(r.already_deleted)}")
    if not as_json:
        for r in receipts:
            out.print(_kv_table(f"deletion {r.request_id or '(nothing new)'}", {
                "records": len(r.record_ids),
                "shards retrained (from slice)": ", ".join(
                    f"{a['shard']} ({a['start_slice']})" for a in r.affected_shards) or "-",
                "samples retrained": r.samples_retrained,
                "seconds": r.seconds,
                "checkpoints changed": len(r.checkpoints_changed),
                "checkpoints unchanged": len(r.checkpoints_unchanged),
            }))
    payload = [r.to_dict() for r in receipts]
    _emit(as_json, payload[0] if len(payload) == 1 else payload)


@app.command()
def status(store: Store, as_json: Json = False) -> None:
    """Per shard: live slice checkpoint, its weights file and sha256, live and deleted records,
    pending deletions."""
    with _open(store, recover=False) as sisa:
        result = sisa.status()
    table = Table("shard", "live slice", "live", "deleted", "pending", "sha256", "weights",
                  title=f"{result.store}: {result.live_records} live, "
                        f"{result.deleted_records} deleted records")
    for s in result.shards:
        table.add_row(str(s.shard), str(s.live_slice), str(s.live_records), str(s.deleted_records),
                      "yes" if s.deletion_pending else "", (s.sha256 or "-")[:16], s.weights_path or "-")
    _emit(as_json, result.to_dict(), table)


@app.command()
def audit(store: Store, as_json: Json = False) -> None:
    """Verify every checkpoint's files and manifest, that none holds a deleted record, that each
    live checkpoint matches its shard's records, and that nothing unregistered is on disk; exit 1
    on any violation."""
    with _open(store, recover=False, tidy=False) as sisa:
        result = sisa.audit()
    table = Table("shard", "slice", "problem",
                  title=f"audit: {'OK' if result.ok else 'VIOLATIONS'} "
                        f"({result.checkpoints_checked} checkpoints checked)")
    for v in result.violations:
        table.add_row(str(v.shard), str(v.slice), v.problem)
    _emit(as_json, result.to_dict(), table)
    if not result.ok:
        raise typer.Exit(1)


@app.command()
@with_options("execution")
def recover(store: Store, no_progress: NoProgress = False, as_json: Json = False,
            **values: Any) -> None:
    """Finish what a crash interrupted: pending deletions, additions, training, and files left
    on disk."""
    with _open(store, values, no_progress) as sisa:
        receipts = sisa.recovered_
    payload = {"deletions_applied": [r.to_dict() for r in receipts]}
    _emit(as_json, payload, _kv_table("recovered", {"deletions applied": len(receipts)}))


@app.command()
@with_options("execution")
def repair(
    store: Store,
    shard: Annotated[list[int] | None, typer.Option(
        help="Shard to repair (repeat for several); default: every shard.")] = None,
    from_scratch: Annotated[bool, typer.Option(
        help="Retrain from slice 0 even where checkpoints are intact.")] = False,
    no_progress: NoProgress = False, as_json: Json = False, **values: Any,
) -> None:
    """Retrain shards from their first missing or corrupt checkpoint (as `sisa audit` reports
    them), resuming from the intact one before it; the result is bit-identical to the lost one.
    Then finish any interrupted deletion, as `sisa recover` does."""
    with _open(store, values, no_progress, recover=False) as sisa:
        report = sisa.repair(shard, from_scratch=from_scratch)
        receipts = sisa.recover()
    payload = {**_retrain_payload(report), "deletions_applied": [r.to_dict() for r in receipts]}
    _emit(as_json, payload, _kv_table("repaired", _retrain_payload(report)))


@app.command()
@with_options("partition", "training", "execution", exclude=("backend",))
def demo(
    backend: Annotated[str, typer.Option(help="head (default), lora, or mlp (on digits).")] = "head",
    dataset: Annotated[str | None, typer.Option(
        help="Built-in data set; default rotten_tomatoes (digits for mlp).")] = None,
    limit: Annotated[int | None, typer.Option(
        help="Use only this many training records (a stable subset); default per backend.")] = None,
    forget_count: Annotated[int, typer.Option(help="Random records to forget.")] = 5,
    no_progress: NoProgress = False,
    as_json: Json = False,
    **values: Any,
) -> None:
    """Train a SISA ensemble and a monolith (S=1, R=1) on a built-in data set, evaluate both on its
    held-out split, forget random records, and compare the deletion's cost with retraining from
    scratch. Default: the frozen-encoder head backend on Rotten Tomatoes."""
    from sisa.demo import DEMO_DATA, run_demo

    if backend not in DEMO_DATA:
        raise typer.BadParameter(f"backend must be one of {sorted(DEMO_DATA)}, got {backend!r}")
    default_data, default_limit = DEMO_DATA[backend]
    config = build_config({**values, "backend": backend}, progress=not no_progress)
    result = run_demo(config, dataset=dataset or default_data, forget_count=forget_count,
                      limit=limit if limit is not None else default_limit,
                      progress=ShardProgress(not no_progress))
    p = config.partition
    table = Table("", f"SISA (S={p.shards}, R={p.slices})", "monolith (S=1, R=1)",
                  title=f"sisa demo: {backend} on {result['dataset']} "
                        f"({result['records']} training, {result['test_records']} held-out records)")
    table.add_row("held-out accuracy", f"{result['sisa_accuracy']:.4f}",
                  f"{result['monolith_accuracy']:.4f}")
    table.add_row("held-out macro-F1", f"{result['sisa_macro_f1']:.4f}",
                  f"{result['monolith_macro_f1']:.4f}")
    table.add_row("full training (s)", f"{result['sisa_train_seconds']:.2f}",
                  f"{result['monolith_train_seconds']:.2f}")
    table.add_row("retraining from scratch (s)" + ("" if result["scratch_retrain_measured"]
                                                   else ", = full training"),
                  f"{result['scratch_retrain_seconds']:.2f}", f"{result['monolith_train_seconds']:.2f}")
    table.add_row(f"forget {forget_count} records (s)", f"{result['forget_seconds']:.2f}", "")
    table.add_row("samples retrained", f"{result['forget_samples']} of {result['sisa_train_samples']}",
                  "")
    table.add_row("speed-up of the deletion vs retraining from scratch",
                  f"{result['speedup_vs_sisa_retrain']}x", f"{result['speedup_vs_monolith_retrain']}x")
    table.add_row("accuracy after forgetting", f"{result['sisa_accuracy_after_forget']:.4f}", "")
    table.add_row("audit", "OK" if result["audit_ok"] else "VIOLATIONS", "")
    _emit(as_json, result, table)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
