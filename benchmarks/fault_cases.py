"""The fault harness's corruption and tampering matrix: each case damages a fresh copy of a store,
then `sisa audit` and the command that meets the damage run in this process (typer's runner).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks.fault_kit import CONFIG, STORE, Fixture, killed_at, tree_digest
from sisa import ExecutionConfig, LoraConfig, PartitionConfig, Sisa, SisaConfig, StoreConfig
from sisa.testing import SPEC, TEXT_SPEC, make_text_rows, tiny_bert, write_csv
from sisa.testing.tamper import DAMAGES, KEY, Damage, sql


@dataclass
class Case:
    """A damage of the shared matrix (`sisa.testing.tamper.DAMAGES`), and the command that meets
    it in ordinary work."""

    damage: Damage
    use: Callable[[Path, Any], list[str]]  # the command that meets the damage

    @property
    def name(self) -> str:
        return self.damage.name

    @property
    def kind(self) -> str:
        return self.damage.kind

    @property
    def store(self) -> str:
        return self.damage.store


def cases(fx: Fixture) -> list[Case]:
    """The matrix. `use` names the command that meets the damage in ordinary work."""
    predict = lambda s, _: ["predict", "--store", str(s), "--data", str(fx.train_csv), "--json"]  # noqa: E731
    lora_predict = lambda s, _: ["predict", "--store", str(s), "--data", str(fx.work / "text.csv"),  # noqa: E731
                              "--json"]
    status = lambda s, _: ["status", "--store", str(s), "--json"]  # noqa: E731
    verify = lambda s, _: ["receipts", "verify", "--store", str(s), "--json"]  # noqa: E731
    recover = lambda s, _: ["recover", "--store", str(s), "--no-progress"]  # noqa: E731

    def forget_in(shard: int, slice_: int) -> Callable[[Path, Any], list[str]]:
        """Forget a live record of (shard, slice): its retrain resumes from the slice before."""
        def argv(s: Path, _: Any) -> list[str]:
            rid = sql(s, "SELECT id FROM records WHERE deleted_at IS NULL AND shard = ? AND slice = ? "
                         "ORDER BY id DESC LIMIT 1", [shard, slice_])[0][0]
            return ["forget", "--store", str(s), rid, "--no-progress"]
        return argv

    def same_shard_as_rotten(s: Path, rotten: str) -> list[str]:
        """Forget another record of the damaged record's shard (its retrain reads the shard)."""
        shard = sql(s, "SELECT shard FROM records WHERE id = ?", [rotten])[0][0]
        rid = sql(s, "SELECT id FROM records WHERE deleted_at IS NULL AND shard = ? AND id != ? "
                     "ORDER BY id DESC LIMIT 1", [shard, rotten])[0][0]
        return ["forget", "--store", str(s), rid, "--no-progress"]

    # The command that meets each damage in ordinary work, by the damage's kind (and store).
    use_by_name: dict[str, Callable[[Path, Any], list[str]]] = {
        "weights: deleted (slice 0 checkpoint)": forget_in(1, 1),
        "manifest: byte flipped (slice 1 checkpoint)": forget_in(2, 2),
        "checkpoint directory deleted (slice 1)": forget_in(0, 2),
        "database page: a registered sha256 digit changed": predict,
        "stray file inside a registered checkpoint directory": predict,
    }
    use_by_kind: dict[str, Callable[[Path, Any], list[str]]] = {
        "checkpoint files": predict, "adapter": lora_predict, "records": same_shard_as_rotten,
        "database": status, "WAL": status, "tampering": predict, "receipts": verify,
        "strays": recover, "links": recover, "journal": status, "restore": status}
    return [Case(d, use_by_name.get(d.name) or use_by_kind[d.kind]) for d in DAMAGES]


def _invoke(argv: list[str]) -> dict[str, Any]:
    """Run the CLI in this process (typer's runner): exit status, output, any traceback."""
    from typer.testing import CliRunner

    from sisa.cli import app

    result = CliRunner().invoke(app, argv)
    crashed = result.exception is not None and not isinstance(result.exception, SystemExit)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    return {"exit": result.exit_code, "stdout": result.stdout, "stderr": result.stderr,
            "error": next((line for line in lines if line.startswith("error:")), ""),
            "error_lines": sum(1 for line in lines if line.startswith("error:")),
            "traceback": crashed or "Traceback" in result.output}


def build_stores(fx: Fixture, with_lora: bool) -> dict[str, Path]:
    """The matrix's stores: `receipted` (two deletions applied), `wal` (a forget killed right
    after its acknowledgement committed, before the WAL was checkpointed: the acknowledgement is
    only in store.db-wal), `keyed` (the receipted store's data, its key kept beside it), `lora`
    (a tiny LoRA store, if asked). Each store is `<name>/store`, what is kept beside it next to it."""
    receipted = fx.work / "receipted" / "store"
    shutil.copytree(fx.base, receipted)
    with Sisa.open(receipted) as sisa:
        sisa.forget(["r0001"])
        sisa.forget_group("u3")
    keyed = fx.work / "keyed" / "store"
    keyed.parent.mkdir()  # the key file lives beside the store, outside it
    with Sisa.train(keyed, fx.rows, CONFIG, SPEC,
                    store_config=StoreConfig(key_file=str(keyed.parent / KEY))) as sisa:
        sisa.forget(["r0001"])
        sisa.forget_group("u3")
    wal = fx.work / "wal" / "store"
    shutil.copytree(receipted, wal)
    run = killed_at(f"{STORE}.truncate_wal:before:1", "forget", "--store", str(wal), "r0010",
                    "--no-progress")
    if run.outcome != "killed" or not (wal / "store.db-wal").stat().st_size:
        raise RuntimeError(f"could not leave an acknowledgement in the WAL: {run.stderr[-2000:]}")
    stores = {"receipted": receipted, "wal": wal, "keyed": keyed}
    if with_lora:
        stores["lora"] = _lora_store(fx)
    return stores


def _lora_store(fx: Fixture) -> Path:
    """A tiny random BERT (no download) and a LoRA store on 24 short texts, S=2, R=2."""
    model = tiny_bert(fx.work / "tiny-bert")
    rows = make_text_rows(24)
    write_csv(fx.work / "text.csv", rows)
    config = SisaConfig(partition=PartitionConfig(shards=2, slices=2, seed=5),
                        training=LoraConfig(model=model, epochs_per_slice=1, batch_size=8,
                                            learning_rate=1e-2, max_length=32, lora_r=2),
                        execution=ExecutionConfig(progress=False))
    store = fx.work / "lora" / "store"
    Sisa.train(store, rows, config, TEXT_SPEC).close()
    return store


def run_case(case: Case, source: Path, work: Path) -> dict[str, Any]:
    """Damage a fresh copy of `source` (and of what is kept beside it) as the case says; then
    `sisa audit` and the command that meets the damage: did either name it, and did they leave
    the store as it was? Then the command meant to heal it: is the audit clean after?"""
    case_dir = work / "case"
    shutil.rmtree(case_dir, ignore_errors=True)
    case_dir.mkdir(parents=True)
    if (source.parent / KEY).exists():
        shutil.copy2(source.parent / KEY, case_dir / KEY)
    try:
        return _run_case(case, source, case_dir / "store")
    except Exception as exc:  # a harness surprise: the case counts as not detected
        return {"case": case.name, "kind": case.kind, "detected": False, "by_audit": False,
                "audit_exit": None, "command": "-", "command_exit": None, "traceback": False,
                "unchanged_by_audit": False, "unchanged_by_command": False, "healed": False,
                "heal": case.damage.heal, "cannot_heal": case.damage.cannot_heal,
                "gap": case.damage.gap, "error": f"harness error: {exc!r}"[:1000]}
    finally:
        shutil.rmtree(case_dir, ignore_errors=True)


def _run_case(case: Case, source: Path, store: Path) -> dict[str, Any]:
    shutil.rmtree(store, ignore_errors=True)
    shutil.copytree(source, store)
    context = case.damage.damage(store)
    flags = case.damage.flags(store)
    damaged = tree_digest(store)
    audit = _invoke(["audit", "--store", str(store), "--json", *flags])
    after_audit = tree_digest(store)
    argv = [*case.use(store, context), *flags]
    use = _invoke(argv)
    after_use = tree_digest(store)
    try:
        report = json.loads(audit["stdout"]) if audit["stdout"].strip() else {}
    except ValueError:
        report = {}
    problems = [v["problem"] for v in report.get("violations", [])]
    said = " ".join([*problems, audit["error"]]).replace(str(store), "STORE").lower()
    by_audit = audit["exit"] == 1 and any(w.lower() in said for w in case.damage.words)
    use_said = " ".join([use["error"], use["stdout"] if argv[:2] == ["receipts", "verify"] else ""])
    use_said = use_said.replace(str(store), "STORE")
    by_use = use["exit"] != 0 and use["error_lines"] <= 1 and not use["traceback"] and any(
        w.lower() in use_said.lower() for w in case.damage.words)
    out: dict[str, Any] = {
        "case": case.name, "kind": case.kind, "detected": by_audit or by_use,
        "by_audit": by_audit, "audit_exit": audit["exit"],
        "audit_says": (problems[:2] or [audit["error"]])[:2],
        "command": " ".join(["sisa", *argv[:1], *([argv[1]] if argv[0] == "receipts" else [])]),
        "command_exit": use["exit"], "command_error": use["error"][:300], "by_command": by_use,
        "traceback": audit["traceback"] or use["traceback"],
        "unchanged_by_audit": damaged == after_audit, "unchanged_by_command": after_audit == after_use,
        "changed": sorted(k for k in set(damaged) | set(after_use)
                          if damaged.get(k) != after_use.get(k))[:5],
    }
    out.update(heal=case.damage.heal, cannot_heal=case.damage.cannot_heal, gap=case.damage.gap,
               healed=False)
    if case.damage.heal:  # healed: the command exits 0 and the audit is clean after it
        healing = _invoke([case.damage.heal, "--store", str(store), "--no-progress", *flags])
        clean = _invoke(["audit", "--store", str(store), "--json", *flags])
        out["healed"] = healing["exit"] == 0 and clean["exit"] == 0
        out["heal_error"] = healing["error"][:300]
    if case.store == "wal":  # lost = still live once a writer has opened the store
        recovered = _invoke(["recover", "--store", str(store), "--no-progress"])
        with Sisa.open(store, recover=False, read_only=True) as sisa:
            out["acknowledged_deletion_lost"] = (
                recovered["exit"] != 0
                or sisa.records(["r0010"])["r0010"].deleted_at is None)
    if case.damage.kind == "restore" and "--witness" in flags:  # a deletion made after the backup
        with Sisa.open(store, recover=False, read_only=True,
                       store_config=StoreConfig(witness=flags[flags.index("--witness") + 1])) as sisa:
            lost = [rid for rid, row in sisa.records(context or []).items() if row.deleted_at is None]
        out["acknowledged_deletion_lost"] = bool(lost)
    return out
