"""Fault injection: the CLI killed with SIGKILL at random times and at every named step of train,
add, forget, repair and recover; then corruption and tampering cases against the audit.

    python -m benchmarks.faults --out DIR [--trials N] [--seed S] [--quick] [--trial I ...]

Kill trials start from copies of one small trained store (mlp, S=3, R=3, groups). A named step is
`module:attribute:before|after:N` (the process dies just before or after the N-th call, armed by
tests/killer.py); a random time is a `python -m sisa.cli` process killed after uniform(0, t)
seconds, t that command's measured duration (one that finishes first counts as completed). Then
`sisa recover` runs as a fresh process (a killed `train` that left no complete store is run
again; a killed `repair` of a damaged store too, if the audit still reports the damage), and the
trial checks: every acknowledged deletion applied (acknowledged = its transaction committed, read
from the ledger right after the kill), the ids of the others still live, nothing pending; the
audit passes; no file on disk derives from a deleted record (every manifest under checkpoints/,
registered or not, followed through its parents; any `.tmp-*` counts); every live shard's weights
byte-identical to training from scratch on the records that remain.

Each corruption or tampering case runs on a fresh copy of a store with two deletions applied (the
adapter cases on a tiny LoRA store; the WAL cases on one whose last deletion was acknowledged by a
`forget` killed before the WAL was checkpointed). It is detected when `sisa audit` exits 1 naming
it, or when the command that meets it in ordinary work fails with a one-line error; the case also
records whether those commands left the store's files as they were (store.db-shm aside, and an
empty store.db-wal, which a reader's SQLite creates). Both run in this process, through the CLI
(typer's runner). Writes DIR/faults.json (a copy of the store of any trial with problems goes to
DIR/failed/) and prints a table.
"""

from __future__ import annotations

import argparse
import random
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks.common import machine, write_json
from benchmarks.fault_cases import build_stores, cases, run_case
from benchmarks.fault_kit import (
    STORE,
    TRAIN_FLAGS,
    Fixture,
    Run,
    build_fixture,
    derived_from,
    killed_after,
    killed_at,
    sisa_cli,
    tree_digest,
)
from sisa import Sisa
from sisa.errors import IncompleteStoreError, StoreNotFoundError

FILES = "shard_store.files"
COMMANDS = ("train", "add", "forget", "repair", "recover")

# Named steps per command: (point without N, the largest N worth trying). A point a run never
# reaches (N beyond its calls) lets the command complete; that trial counts as completed.
STEPS: dict[str, list[tuple[str, int]]] = {
    "train": [("shard_store.store:migrate:after", 1), (f"{STORE}.create:before", 1),
              (f"{STORE}.create:after", 1), (f"{FILES}:_fsync_file:after", 18),
              (f"{FILES}:write_dir:after", 9), (f"{STORE}.register_checkpoint:after", 9),
              (f"{STORE}.commit:before", 1), (f"{STORE}.commit:after", 1)],
    "add": [(f"{STORE}.insert_records:before", 1), (f"{STORE}.insert_records:after", 1),
            (f"{FILES}:_fsync_file:after", 6), (f"{FILES}:write_dir:after", 4),
            (f"{STORE}.register_checkpoint:after", 4), (f"{STORE}.commit:before", 1),
            (f"{STORE}.commit:after", 1), (f"{FILES}:remove:after", 3)],
    "forget": [(f"{STORE}.acknowledge:before", 1), (f"{STORE}.acknowledge:after", 1),
               (f"{STORE}.truncate_wal:before", 1), (f"{FILES}:remove:after", 3),
               (f"{FILES}:_fsync_file:after", 6), (f"{FILES}:write_dir:after", 3),
               (f"{STORE}.register_checkpoint:after", 3), (f"{STORE}.commit:before", 1),
               (f"{STORE}.commit:after", 1), (f"{STORE}.truncate_wal:before", 2),
               (f"{STORE}.sweep:after", 3)],
    "repair": [(f"{STORE}.drop_checkpoints:before", 1), (f"{STORE}.drop_checkpoints:after", 1),
               (f"{FILES}:remove:after", 9), (f"{FILES}:write_dir:after", 9),
               (f"{STORE}.register_checkpoint:after", 9), (f"{STORE}.commit:before", 1),
               (f"{STORE}.commit:after", 1)],
    "recover": [(f"{STORE}.sweep:before", 1), (f"{STORE}.register_checkpoint:before", 1),
                (f"{STORE}.register_checkpoint:after", 3), (f"{FILES}:write_dir:after", 3),
                (f"{STORE}.commit:before", 1), (f"{STORE}.commit:after", 1),
                (f"{STORE}.truncate_wal:before", 1), (f"{FILES}:remove:after", 3)],
}
# Where the `forget` before a `recover` trial dies: always after its acknowledgement committed.
RECOVER_SETUP = [f"{STORE}.acknowledge:after:1", f"{STORE}.truncate_wal:before:1",
                 f"{STORE}.register_checkpoint:after:1", f"{STORE}.commit:before:1"]


# -- reading a store -------------------------------------------------------------------------------

@dataclass
class StoreState:
    """What a store holds, read without writing."""

    deleted: dict[str, bool]  # id asked about -> deleted (absent: not in the store)
    live_ids: set[str]
    pending: int
    shas: dict[int, str]
    audit_ok: bool
    violations: list[str]


def read_state(store: Path, ids: list[str], audit: bool = False) -> StoreState | None:
    """The store's state (None if there is no complete store to open)."""
    try:
        with Sisa.open(store, recover=False, read_only=True) as sisa:
            found = sisa.records(ids)
            report = sisa.audit() if audit else None
            return StoreState(
                deleted={i: r.deleted_at is not None for i, r in found.items()},
                live_ids={r.id for r in sisa.live_records()},
                pending=len(sisa.pending()),
                shas={s: row.sha256 for s, row in sisa.live_checkpoints().items()},
                audit_ok=report.ok if report else False,
                violations=[f"shard {v.shard} slice {v.slice}: {v.problem}"[:300]
                            for v in (report.violations if report else [])])
    except (StoreNotFoundError, IncompleteStoreError):
        return None


# -- kill trials -----------------------------------------------------------------------------------

@dataclass
class Trial:
    index: int
    command: str
    mode: str  # "step" or "random"
    point: str | None  # the named step, with N
    variant: str  # the forget victims, the repair kind, ...
    setup_point: str | None = None  # recover: where the forget before it died
    fraction: float = 0.0  # random: the kill time as a fraction of the measured duration

    @property
    def step(self) -> str:
        return self.point.removeprefix("shard_store.") if self.point else "random time"


def plan(trials: int, seed: int, commands: tuple[str, ...]) -> list[Trial]:
    """`trials` trials, the commands in equal shares (shuffled), each a named step or a random time
    by a coin toss; everything drawn from `seed`."""
    rng = random.Random(seed)
    order = [commands[i % len(commands)] for i in range(trials)]
    rng.shuffle(order)
    out = []
    for i, command in enumerate(order):
        point = None
        mode = "step" if rng.random() < 0.5 else "random"
        if mode == "step":
            name, most = rng.choice(STEPS[command])
            point = f"{name}:{rng.randint(1, most)}"
        variant = {"train": "fresh directory", "add": "20 records, 2 groups",
                   "repair": rng.choice(["--from-scratch", "a weights file deleted"])}.get(command, "")
        if command in ("forget", "recover"):
            variant = str(rng.randrange(6))  # an index into Fixture.victims
        setup = rng.choice(RECOVER_SETUP) if command == "recover" else None
        out.append(Trial(i, command, mode, point, variant, setup, rng.random()))
    return out


def _argv(fx: Fixture, trial: Trial, store: Path) -> list[str]:
    if trial.command == "train":
        return ["train", "--store", str(store), "--data", str(fx.train_csv), *TRAIN_FLAGS]
    if trial.command == "add":
        return ["add", "--store", str(store), "--data", str(fx.new_csv), "--no-progress"]
    if trial.command == "forget":
        return ["forget", "--store", str(store), *fx.victims[int(trial.variant)][1], "--no-progress"]
    if trial.command == "repair":
        scratch = ["--from-scratch"] if trial.variant == "--from-scratch" else []
        return ["repair", "--store", str(store), *scratch, "--no-progress"]
    return ["recover", "--store", str(store), "--no-progress"]


def _settled(state: dict[str, bool], ids: list[str]) -> str:
    """all / none / partial of `ids` deleted (or, for new ids, present)."""
    hits = sum(1 for i in ids if state.get(i, False))
    return "all" if hits == len(ids) else "none" if hits == 0 else "partial"


def run_trial(fx: Fixture, trial: Trial, keep: Path | None = None) -> dict[str, Any]:
    """One trial: prepare a store, kill the command, read what the kill left, recover, check.
    With `keep`, the store of a trial with problems is copied there."""
    started = time.perf_counter()
    work = Path(tempfile.mkdtemp(dir=fx.work, prefix=f"trial-{trial.index}-"))
    store = work / "store"
    name, _, victims = fx.victims[int(trial.variant)] if trial.variant.isdigit() else ("", [], [])
    result: dict[str, Any] = {"trial": trial.index, "command": trial.command, "mode": trial.mode,
                              "step": trial.step, "variant": name or trial.variant, "problems": []}
    try:
        acknowledged = _prepare(fx, trial, store, victims, result)
        argv = _argv(fx, trial, store)
        before = tree_digest(store)
        if trial.mode == "step":
            run = killed_at(str(trial.point), *argv)
        else:
            result["delay_s"] = round(trial.fraction * fx.durations[trial.command], 3)
            run = killed_after(result["delay_s"], *argv)
        result.update(outcome=run.outcome, exit=run.returncode, command_seconds=round(run.seconds, 2),
                      store_changed=tree_digest(store) != before)  # did it die after writing?
        if run.outcome not in ("killed", "completed"):
            result["problems"].append(f"{trial.command} {run.outcome} (exit {run.returncode}): "
                                      f"{run.message}")
        if run.traceback:
            result["problems"].append(f"{trial.command} printed a traceback: {run.stderr[-500:]}")
        inserted = _what_the_kill_left(fx, trial, store, run, victims, acknowledged, result)
        _follow_up(trial, store, argv, result)
        _check(fx, trial, store, victims, acknowledged, inserted, result)
    except Exception as exc:  # a harness or library surprise: record it, go on with the others
        result.setdefault("outcome", "error")
        result["problems"].append(f"harness error: {exc!r}"[:1000])
    result["seconds"] = round(time.perf_counter() - started, 2)
    if keep is not None and result["problems"] and store.exists():
        shutil.copytree(store, keep / f"trial-{trial.index}", dirs_exist_ok=True)
    shutil.rmtree(work, ignore_errors=True)
    return result


def _prepare(fx: Fixture, trial: Trial, store: Path, victims: list[str],
             result: dict[str, Any]) -> list[str]:
    """The store the command starts from; returns the ids of deletions acknowledged already (a
    `recover` trial starts after a `forget` killed once its acknowledgement committed)."""
    if trial.command == "train":
        return []
    shutil.copytree(fx.base, store)
    if trial.command == "repair" and trial.variant != "--from-scratch":
        relative = random.Random(trial.index).choice(fx.checkpoints)
        (store / relative / "weights.safetensors").unlink()
        result["damaged"] = relative
    if trial.command != "recover":
        return []
    forget = ["forget", "--store", str(store), *fx.victims[int(trial.variant)][1], "--no-progress"]
    setup = killed_at(str(trial.setup_point), *forget)
    result["setup"] = f"forget killed at {str(trial.setup_point).removeprefix('shard_store.')}"
    state = read_state(store, victims)
    if setup.outcome == "killed" and state is not None and _settled(state.deleted, victims) == "all":
        return list(victims)
    result["problems"].append(f"the forget before recover was not killed after acknowledging "
                              f"({setup.outcome}, {setup.message})")
    return []


def _what_the_kill_left(fx: Fixture, trial: Trial, store: Path, run: Run, victims: list[str],
                        acknowledged: list[str], result: dict[str, Any]) -> bool:
    """Read the ledger right after the kill: a deletion whose transaction committed counts as
    acknowledged (added to `acknowledged`). Returns whether an `add` inserted its records."""
    new_ids = [r["id"] for r in fx.new_rows]
    state = read_state(store, victims + new_ids)
    problems = result["problems"]
    inserted = False
    if state is not None and trial.command == "forget":
        settled = _settled(state.deleted, victims)
        if settled == "partial":
            problems.append("only some of the ids of one deletion request were deleted")
        if settled == "all":
            acknowledged += victims
        elif run.outcome == "completed":
            problems.append("forget exited 0 but its deletion is not in the ledger")
    if state is not None and trial.command == "add":
        present = _settled({i: i in state.deleted for i in new_ids}, new_ids)
        if present == "partial":
            problems.append("only some of the added records were inserted")
        inserted = present == "all"
        if run.outcome == "completed" and not inserted:
            problems.append("add exited 0 but its records are not in the store")
    result["acknowledged"] = 1 if acknowledged else 0
    return inserted


def _follow_up(trial: Trial, store: Path, argv: list[str], result: dict[str, Any]) -> None:
    """`sisa recover` as a fresh process; then what an operator would run again: a `train` that
    left no complete store, a `repair` of a store whose damage the audit still reports."""
    follow = [("recover", sisa_cli("recover", "--store", str(store), "--no-progress"))]
    first = follow[0][1]
    if trial.command == "train" and first.outcome == "failed" and (
            "incomplete" in first.stderr or "no store" in first.stderr):
        follow.append(("train", sisa_cli(*argv)))
    if trial.command == "repair" and "damaged" in result:
        after = read_state(store, [], audit=True)
        if after is not None and not after.audit_ok:
            follow.append(("repair", sisa_cli("repair", "--store", str(store), "--no-progress")))
    result["follow_up"] = [f"{name}: {r.outcome}" for name, r in follow]
    for name, r in follow:
        if r.traceback:
            result["problems"].append(f"{name} after the kill printed a traceback: {r.stderr[-500:]}")
    name, last = follow[-1]
    if last.outcome != "completed":
        result["problems"].append(f"{name} after the kill failed (exit {last.returncode}): "
                                  f"{last.message}")


def _check(fx: Fixture, trial: Trial, store: Path, victims: list[str], acknowledged: list[str],
           inserted: bool, result: dict[str, Any]) -> None:
    """Every acknowledged deletion applied, the others' ids live, nothing pending, the live
    records what should remain; the audit; derived files on disk; exactness."""
    new_ids = [r["id"] for r in fx.new_rows]
    problems = result["problems"]
    final = read_state(store, victims + new_ids, audit=True)
    if final is None:
        problems.append("no complete store after recovery")
        result.update(lost=bool(acknowledged), audit_ok=False, derived=[], identical=False)
        return
    lost = [i for i in acknowledged if not final.deleted.get(i, False)]
    result["lost"] = bool(lost)
    if lost:
        problems.append(f"acknowledged deletion lost: {lost} live after recovery")
    if not acknowledged and any(final.deleted.get(i, False) for i in victims):
        problems.append("ids deleted whose deletion was never acknowledged")
    if final.pending:
        problems.append(f"{final.pending} deletion(s) still pending after recovery")
    expected = {r["id"] for r in fx.rows} - set(acknowledged)
    if inserted:
        expected |= set(new_ids)
    if final.live_ids != expected:
        problems.append(f"live records differ from what should remain: "
                        f"{sorted(final.live_ids ^ expected)[:5]}")
    result["audit_ok"] = final.audit_ok
    result["violations"] = final.violations[:5]
    result["derived"] = derived_from(store, set(acknowledged))
    result["identical"] = final.shas == fx.scratch_shas(final.live_ids)


def measure(fx: Fixture, commands: set[str]) -> None:
    """Each command's duration to its end, run as a trial would run it (for the random kills)."""
    for command in (c for c in COMMANDS if c in commands):
        work = Path(tempfile.mkdtemp(dir=fx.work, prefix=f"measure-{command}-"))
        store = work / "store"
        variant = "0" if command in ("forget", "recover") else "--from-scratch"
        if command != "train":
            shutil.copytree(fx.base, store)
        if command == "recover":
            killed_at(RECOVER_SETUP[0], *_argv(fx, Trial(-1, "forget", "step", None, variant), store))
        run = sisa_cli(*_argv(fx, Trial(-1, command, "random", None, variant), store))
        if run.outcome != "completed":
            raise RuntimeError(f"`sisa {command}` failed on an intact store: {run.stderr[-2000:]}")
        fx.durations[command] = round(run.seconds, 2)
        shutil.rmtree(work, ignore_errors=True)


# -- the run ---------------------------------------------------------------------------------------

COUNTS = ("trials", "killed", "killed_after_writing", "completed", "failed", "acknowledged", "lost",
          "audits_failed", "derived_left", "not_identical", "with_problems")


def tally(results: list[dict[str, Any]]) -> dict[str, int]:
    return {
        "trials": len(results),
        "killed": sum(r["outcome"] == "killed" for r in results),
        "killed_after_writing": sum(r["outcome"] == "killed" and r.get("store_changed", False)
                                    for r in results),
        "completed": sum(r["outcome"] == "completed" for r in results),
        "failed": sum(r["outcome"] not in ("killed", "completed") for r in results),
        "acknowledged": sum(r.get("acknowledged", 0) for r in results),
        "lost": sum(bool(r.get("lost")) for r in results),
        "audits_failed": sum(not r.get("audit_ok") for r in results),
        "derived_left": sum(bool(r.get("derived")) for r in results),
        "not_identical": sum(not r.get("identical") for r in results),
        "with_problems": sum(bool(r["problems"]) for r in results),
    }


def summary(payload: dict[str, Any]) -> str:
    lines = ["| command | " + " | ".join(COUNTS) + " |", "| --- |" + " --- |" * len(COUNTS)]
    for name, t in [*payload["by_command"].items(), ("all", payload["totals"])]:
        lines.append(f"| {name} | " + " | ".join(str(t[k]) for k in COUNTS) + " |")
    matrix = payload.get("corruption")
    if matrix:
        lines += ["", f"Corruption and tampering: {matrix['detected']} of {matrix['tried']} detected "
                  f"({matrix['by_audit']} by the audit); {matrix['healed']} of the "
                  f"{matrix['healable']} with a remedy in the store healed to a passing audit.", "",
                  "| case | detected | audit | command (exit) | store left as it was | healed by |",
                  "| --- | --- | --- | --- | --- | --- |"]
        for c in matrix["cases"]:
            heal = (f"{c['heal']}: {'yes' if c['healed'] else 'NO'}" if c.get("heal")
                    else f"no remedy: {c.get('cannot_heal', '')}")
            lines.append(f"| {c['case']} | {'yes' if c['detected'] else 'NO'} | "
                         f"{'flags it' if c['by_audit'] else 'exit ' + str(c['audit_exit'])} | "
                         f"{c['command']} ({c['command_exit']}) | "
                         f"{'yes' if c['unchanged_by_audit'] and c['unchanged_by_command'] else 'no'} | "
                         f"{heal} |")
        if matrix["acknowledged_deletion_lost_in"]:
            lines += ["", "An acknowledged deletion was lost in: "
                      + "; ".join(matrix["acknowledged_deletion_lost_in"]) + "."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.faults", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("results/faults"))
    parser.add_argument("--trials", type=int, default=None, help="kill trials (default 200; 5 quick)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the trial plan")
    parser.add_argument("--quick", action="store_true", help="a few trials, no LoRA store")
    parser.add_argument("--trial", type=int, action="append", default=None,
                        help="run only these trials of the plan (repeatable), to reproduce one")
    parser.add_argument("--commands", default=",".join(COMMANDS), help="comma-separated subset")
    parser.add_argument("--no-matrix", action="store_true", help="skip the corruption cases")
    args = parser.parse_args(argv)
    commands = tuple(c for c in args.commands.split(",") if c)
    if set(commands) - set(COMMANDS):
        parser.error(f"unknown command(s) in --commands; choose from {COMMANDS}")
    count = args.trials if args.trials is not None else 5 if args.quick else 200
    trials = plan(count, args.seed, commands)
    if args.trial:
        trials = [t for t in trials if t.index in set(args.trial)]
    started = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="sisa-faults-"))
    try:
        fx = build_fixture(work)
        measure(fx, {t.command for t in trials if t.mode == "random"})
        results = []
        for t in trials:
            result = run_trial(fx, t, keep=args.out / "failed")
            results.append(result)
            flag = "; ".join(result["problems"]) or "ok"
            print(f"  trial {t.index:3d} {t.command:7s} {t.step:45s} {result['outcome']:9s} "
                  f"{result['seconds']:6.1f}s {flag[:200]}", flush=True)
        trial_seconds = time.perf_counter() - started
        matrix = None
        if not args.no_matrix:
            stores = build_stores(fx, with_lora=not args.quick)
            rows = [run_case(c, stores[c.store], work) for c in cases(fx) if c.store in stores]
            lost = [r["case"] for r in rows if r.get("acknowledged_deletion_lost")]
            matrix = {"tried": len(rows), "detected": sum(r["detected"] for r in rows),
                      "by_audit": sum(r["by_audit"] for r in rows),
                      "healable": sum(bool(r.get("heal")) for r in rows),
                      "healed": sum(bool(r.get("healed")) for r in rows),
                      "acknowledged_deletion_lost_in": lost, "cases": rows}
    finally:
        shutil.rmtree(work, ignore_errors=True)
    steps: dict[str, list[dict[str, Any]]] = {}
    for r in results:
        steps.setdefault(f"{r['command']} {r['step']}", []).append(r)
    payload: dict[str, Any] = {
        "meta": {"command": "python -m benchmarks.faults " + " ".join(sys.argv[1:] if argv is None
                                                                        else argv),
                 "seed": args.seed, "machine": machine(), "seconds": round(time.perf_counter() - started, 1),
                 "seconds_per_trial": round(sum(r["seconds"] for r in results) / max(1, len(results)), 2),
                 "kill_trials_seconds": round(trial_seconds, 1), "durations": fx.durations},
        "totals": tally(results),
        "by_command": {c: tally([r for r in results if r["command"] == c]) for c in commands},
        "by_step": {k: tally(v) for k, v in sorted(steps.items())},
        "corruption": matrix,
        "trials": results,
    }
    write_json(args.out / "faults.json", payload)
    print(summary(payload))
    print(f"wrote {args.out / 'faults.json'} ({payload['meta']['seconds']} s; "
          f"{payload['meta']['seconds_per_trial']} s a trial)")


if __name__ == "__main__":
    main()
