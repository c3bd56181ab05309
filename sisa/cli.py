"""The `sisa` command line: a thin shell over `sisa.api.Sisa`.

Each command parses options, calls one library function and prints a table (or JSON with --json).
Library errors become one clean message and exit status 1 in `main`.
"""

from __future__ import annotations

import json
import tomllib
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from typer.core import TyperGroup

from sisa.config import (
    DataSpec,
    ExecutionConfig,
    PartitionConfig,
    SisaConfig,
    TrainingConfig,
)
from sisa.errors import SisaError

out = Console()
err = Console(stderr=True)


class _Group(TyperGroup):
    """Turns every library error into one clean message and exit status 1."""

    def invoke(self, ctx: Any) -> Any:
        try:
            return super().invoke(ctx)
        except SisaError as exc:
            err.print("[bold red]error:[/bold red] " + escape(str(exc)), highlight=False)
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
Executor = Annotated[str, typer.Option("--executor", help="local (in-process) or ray (a task per shard).")]
RayAddress = Annotated[
    str | None, typer.Option("--ray-address", help="Existing Ray cluster; default: start one on 127.0.0.1.")
]
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


def _execution(executor: str, ray_address: str | None, no_progress: bool,
               gpus_per_shard: float = 0.0, cpus_per_shard: float = 1.0) -> ExecutionConfig:
    return ExecutionConfig(executor=executor, ray_address=ray_address,  # type: ignore[arg-type]
                           progress=not no_progress, gpus_per_shard=gpus_per_shard,
                           cpus_per_shard=cpus_per_shard)


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


def _open(store: Path, executor: str = "local", ray_address: str | None = None,
          no_progress: bool = False, recover: bool = True) -> Any:
    from sisa.api import Sisa

    return Sisa.open(store, execution=_execution(executor, ray_address, no_progress),
                     progress=ShardProgress(not no_progress), recover=recover)


@app.callback()
def _root(
    ctx: typer.Context,
    config: Annotated[Path | None, typer.Option("--config", help="TOML file of option defaults.")] = None,
) -> None:
    if config is not None:
        try:
            values = tomllib.loads(config.read_text())
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise typer.BadParameter(f"cannot read config file {str(config)!r}: {exc}") from exc
        flat = {k.replace("-", "_"): v for k, v in values.items()}
        ctx.default_map = {name: flat for name in ctx.command.commands}  # type: ignore[attr-defined]


@app.command()
def train(
    store: Store,
    data: Data,
    id_column: Annotated[str | None, typer.Option(help="Column with the stable record id.")] = None,
    label_column: Annotated[str | None, typer.Option(help="Column with the class label.")] = None,
    text_column: Annotated[str | None, typer.Option(help="Column with the input text.")] = None,
    feature_columns: Annotated[
        str | None, typer.Option(help="Comma-separated numeric input columns.")] = None,
    group_column: Annotated[
        str | None, typer.Option(help="Column with a group (user) id; a group stays in one shard.")
    ] = None,
    prior_column: Annotated[str | None, typer.Option(
        help="Column with a number per record: how likely it is to be deleted.")] = None,
    placement: Annotated[str, typer.Option(
        help="uniform, late_slices (likely-deleted records in the last slices) or "
             "dedicated_shards (likely-deleted records in their own shards).")] = "uniform",
    prior_threshold: Annotated[float, typer.Option(
        help="A record is likely to be deleted when its prior is >= this.")] = 0.5,
    late_slices: Annotated[int, typer.Option(help="late_slices: how many last slices.")] = 1,
    dedicated_shards: Annotated[int, typer.Option(help="dedicated_shards: how many shards.")] = 1,
    shards: Annotated[int, typer.Option(help="S: number of shards (independent models).")] = 4,
    slices: Annotated[int, typer.Option(help="R: slices (checkpoints) per shard.")] = 4,
    epochs: Annotated[int, typer.Option(help="Epochs per slice.")] = 5,
    seed: Annotated[int, typer.Option(help="Seed of placement and of every random draw.")] = 0,
    backend: Annotated[str, typer.Option(
        help="mlp (numeric features), head (frozen encoder + trained head), lora (LoRA adapters)."
    )] = "mlp",
    batch_size: Annotated[int, typer.Option(help="Examples per optimizer step.")] = 32,
    learning_rate: Annotated[float, typer.Option(help="AdamW learning rate.")] = 1e-3,
    hidden_sizes: Annotated[str, typer.Option(
        help="mlp/head hidden widths, comma-separated; empty for a logistic head.")] = "64",
    torch_threads: Annotated[int, typer.Option(help="Torch threads per shard (fixed for exactness).")] = 1,
    model: Annotated[str, typer.Option(
        help="head/lora: model directory, locally cached hub id, or all-MiniLM-L6-v2 (packaged).")
    ] = "all-MiniLM-L6-v2",
    max_length: Annotated[int, typer.Option(help="head/lora: max tokens per text.")] = 128,
    lora_r: Annotated[int, typer.Option(help="lora: adapter rank.")] = 8,
    lora_alpha: Annotated[int, typer.Option(help="lora: adapter alpha.")] = 16,
    lora_dropout: Annotated[float, typer.Option(help="lora: adapter dropout.")] = 0.1,
    bf16: Annotated[bool, typer.Option(help="lora on CUDA: bf16 autocast.")] = False,
    gpus_per_shard: Annotated[float, typer.Option(
        help="Ray GPUs per shard task (0.25: four shards share a GPU); 0 trains on CPU.")] = 0.0,
    cpus_per_shard: Annotated[float, typer.Option(help="Ray CPUs per shard task.")] = 1.0,
    embeddings_from: Annotated[Path | None, typer.Option(
        help="head: seed the embedding cache from another store on the same texts.")] = None,
    voting: Annotated[str, typer.Option(help="Ensemble voting: soft or hard.")] = "soft",
    executor: Executor = "local",
    ray_address: RayAddress = None,
    no_progress: NoProgress = False,
    as_json: Json = False,
) -> None:
    """Validate the data, create a store, and train every shard slice by slice."""
    from sisa.api import Sisa

    spec = None
    if id_column or label_column or text_column or feature_columns or group_column or prior_column:
        spec = DataSpec(
            id_column=id_column or "id",
            label_column=label_column or "label",
            text_column=text_column,
            feature_columns=tuple(c.strip() for c in feature_columns.split(",") if c.strip())
            if feature_columns else (),
            group_column=group_column,
            prior_column=prior_column,
        )
    config = SisaConfig(
        partition=PartitionConfig(shards=shards, slices=slices, seed=seed,
                                  placement=placement,  # type: ignore[arg-type]
                                  prior_threshold=prior_threshold, late_slices=late_slices,
                                  dedicated_shards=dedicated_shards),
        training=TrainingConfig(
            backend=backend, epochs_per_slice=epochs, batch_size=batch_size,
            learning_rate=learning_rate, torch_threads=torch_threads,
            hidden_sizes=tuple(int(h) for h in hidden_sizes.split(",") if h.strip()),
            model=model, max_length=max_length, lora_r=lora_r, lora_alpha=lora_alpha,
            lora_dropout=lora_dropout, bf16=bf16,
        ),
        execution=_execution(executor, ray_address, no_progress, gpus_per_shard, cpus_per_shard),
        voting=voting,  # type: ignore[arg-type]
    )
    sisa, report = Sisa.train(store, data, config, spec, progress=ShardProgress(not no_progress),
                              embeddings_from=embeddings_from)
    status = sisa.status()
    payload = {"store": str(store), "records": status["live_records"], "shards": shards,
               "slices": slices, "samples": report.samples, "seconds": round(report.seconds, 3),
               "checkpoints_written": report.checkpoints_written}
    _emit(as_json, payload, _kv_table("trained", payload))


@app.command()
def add(
    store: Store, data: Data, executor: Executor = "local", ray_address: RayAddress = None,
    no_progress: NoProgress = False, as_json: Json = False,
) -> None:
    """Add new records (same columns as training); affected shards retrain from the earliest
    affected slice, giving exactly what training from scratch on the union gives."""
    with _open(store, executor, ray_address, no_progress) as sisa:
        report = sisa.add(data)
    payload = {"shards_retrained": [r.shard for r in report.retrained],
               "start_slices": {str(r.shard): r.start_slice for r in report.retrained},
               "samples": report.samples, "seconds": round(report.seconds, 3)}
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
        proba = sisa.predict_proba(inputs)
        labels = sisa.predict(inputs)
        rows = [{"id": i, "prediction": p,
                 "probabilities": {c: round(float(v), 6) for c, v in zip(sisa.classes, pr, strict=False)}}
                for i, p, pr in zip(ids, labels, proba, strict=False)]
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
    table = Table("model", "accuracy", "macro-F1", title=f"{result['examples']} examples")
    for name in ("ensemble", "ensemble_soft", "ensemble_hard"):
        table.add_row(name, f"{result[name]['accuracy']:.4f}", f"{result[name]['macro_f1']:.4f}")
    for shard, s in result["shards"].items():
        table.add_row(f"shard {shard}", f"{s['accuracy']:.4f}", f"{s['macro_f1']:.4f}")
    _emit(as_json, result, table)


@app.command()
def forget(
    store: Store,
    ids: Annotated[list[str] | None, typer.Argument(help="Record ids to forget.")] = None,
    ids_file: Annotated[Path | None, typer.Option(help="File with one record id per line.")] = None,
    group: Annotated[str | None, typer.Option(help="Forget every record of this group id.")] = None,
    executor: Executor = "local", ray_address: RayAddress = None,
    no_progress: NoProgress = False, as_json: Json = False,
) -> None:
    """Forget records by id (or a whole group): recorded durably, then the affected shards
    retrain from the last checkpoint before the earliest affected slice. Prints the receipt."""
    wanted = list(ids or [])
    if ids_file is not None:
        wanted += [line.strip() for line in ids_file.read_text().splitlines() if line.strip()]
    if not wanted and group is None:
        raise typer.BadParameter("give record ids, --ids-file, or --group")
    with _open(store, executor, ray_address, no_progress) as sisa:
        receipts = []
        if wanted:
            receipts.append(sisa.forget(wanted))
        if group is not None:
            receipts.append(sisa.forget_group(group))
    payload = [r.to_dict() for r in receipts]
    for r in receipts:
        if r.already_deleted:
            err.print(f"already deleted (no-op): {', '.join(r.already_deleted)}")
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
    _emit(as_json, payload[0] if len(payload) == 1 else payload)


@app.command()
def status(store: Store, as_json: Json = False) -> None:
    """Per shard: live slice checkpoint, its weights file and sha256, live and deleted records."""
    with _open(store, recover=False) as sisa:
        result = sisa.status()
    table = Table("shard", "live slice", "live", "deleted", "pending", "sha256", "weights",
                  title=f"{result['store']}: {result['live_records']} live, "
                        f"{result['deleted_records']} deleted records")
    for s in result["shards"]:
        table.add_row(str(s["shard"]), str(s["live_slice"]), str(s["live_records"]),
                      str(s["deleted_records"]), "yes" if s["deletion_pending"] else "",
                      (s["sha256"] or "-")[:16], s["weights_path"] or "-")
    _emit(as_json, result, table)


@app.command()
def audit(store: Store, as_json: Json = False) -> None:
    """Verify every checkpoint's sha256 and that none holds a deleted record; exit 1 on any
    violation."""
    with _open(store, recover=False) as sisa:
        result = sisa.audit()
    table = Table("shard", "slice", "problem",
                  title=f"audit: {'OK' if result['ok'] else 'VIOLATIONS'} "
                        f"({result['checkpoints_checked']} checkpoints checked)")
    for v in result["violations"]:
        table.add_row(str(v["shard"]), str(v["slice"]), v["problem"])
    _emit(as_json, result, table)
    if not result["ok"]:
        raise typer.Exit(1)


@app.command()
def recover(
    store: Store, executor: Executor = "local", ray_address: RayAddress = None,
    no_progress: NoProgress = False, as_json: Json = False,
) -> None:
    """Finish what a crash interrupted: pending deletions, additions, half-written checkpoints."""
    with _open(store, executor, ray_address, no_progress) as sisa:
        receipts = sisa.recovered
    payload = {"deletions_applied": [r.to_dict() for r in receipts]}
    _emit(as_json, payload, _kv_table("recovered", {"deletions applied": len(receipts)}))


@app.command()
def repair(
    store: Store,
    shard: Annotated[list[int] | None, typer.Option(
        help="Shard to repair (repeat for several); default: every shard.")] = None,
    from_scratch: Annotated[bool, typer.Option(
        help="Retrain from slice 0 even where checkpoints are intact.")] = False,
    executor: Executor = "local", ray_address: RayAddress = None,
    no_progress: NoProgress = False, as_json: Json = False,
) -> None:
    """Retrain shards from their first missing or corrupt checkpoint (as `sisa audit` reports
    them), resuming from the intact one before it; the result is bit-identical to the lost one.
    Then finish any interrupted deletion, as `sisa recover` does."""
    with _open(store, executor, ray_address, no_progress, recover=False) as sisa:
        report = sisa.repair(shard, from_scratch=from_scratch)
        receipts = sisa.recover()
    payload = {"shards_retrained": [r.shard for r in report.retrained],
               "start_slices": {str(r.shard): r.start_slice for r in report.retrained},
               "samples": report.samples, "seconds": round(report.seconds, 3),
               "deletions_applied": [r.to_dict() for r in receipts]}
    _emit(as_json, payload, _kv_table("repaired", {k: v for k, v in payload.items()
                                                   if k != "deletions_applied"}))


@app.command()
def demo(
    backend: Annotated[str, typer.Option(help="head (default), lora, or mlp (on digits).")] = "head",
    dataset: Annotated[str | None, typer.Option(
        help="Built-in data set; default rotten_tomatoes (digits for mlp).")] = None,
    shards: Annotated[int, typer.Option(help="S for the SISA ensemble.")] = 4,
    slices: Annotated[int, typer.Option(help="R for the SISA ensemble.")] = 4,
    epochs: Annotated[int | None, typer.Option(help="Epochs per slice (default per backend).")] = None,
    limit: Annotated[int | None, typer.Option(
        help="Use only this many training records (a stable subset); default per backend.")] = None,
    model: Annotated[str, typer.Option(help="head/lora model.")] = "all-MiniLM-L6-v2",
    forget_count: Annotated[int, typer.Option(help="Random records to forget.")] = 5,
    seed: Annotated[int, typer.Option(help="Seed.")] = 0,
    executor: Executor = "local",
    no_progress: NoProgress = False,
    as_json: Json = False,
) -> None:
    """Train a SISA ensemble and a monolith (S=1, R=1) on a built-in data set, evaluate both on its
    held-out split, forget random records, and compare the deletion's cost with retraining from
    scratch. Default: the frozen-encoder head backend on Rotten Tomatoes."""
    from sisa.demo import DEMO_DEFAULTS, run_demo

    if backend not in DEMO_DEFAULTS:
        raise typer.BadParameter(f"backend must be one of {sorted(DEMO_DEFAULTS)}, got {backend!r}")
    defaults = DEMO_DEFAULTS[backend]
    training = TrainingConfig(**{**defaults["training"], "model": model,
                                 **({"epochs_per_slice": epochs} if epochs else {})})
    config = SisaConfig(
        partition=PartitionConfig(shards=shards, slices=slices, seed=seed),
        training=training,
        execution=_execution(executor, None, no_progress),
    )
    result = run_demo(config, dataset=dataset or defaults["dataset"], forget_count=forget_count,
                      limit=limit if limit is not None else defaults["limit"],
                      progress=ShardProgress(not no_progress))
    table = Table("", f"SISA (S={shards}, R={slices})", "monolith (S=1, R=1)",
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
