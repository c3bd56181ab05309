"""The audit: proof, from the database and the files on disk, that no file of the store holds or
derives from a deleted record, and that nothing it relies on was altered.

Everything it checks is covered by a digest it recomputes: SQLite's own page check; every live
record's content against its content digest; every registered checkpoint's seal (a keyed digest of
its registration, the sha256 of each of its files included), its files against those sha256, its
manifest against its registration and against the records its shard holds now (key, parent, record
ids, record-set digest); the parent chain of every live checkpoint back to slice 0; every entry on
disk, in `checkpoints/` and in the store directory, registered or reported; no cached embedding of
a deleted input; no deletion pending; and the receipt chain. It reads what the store holds now,
never what a process kept in memory, under a shared lock that no writer holds meanwhile, and writes
nothing (it runs on a store the process may not write).
"""

from __future__ import annotations

from typing import Any

import shard_store
from shard_store import CheckpointFileError, CheckpointRow, ShardStore, keyed
from sisa.checkpoint import Manifest
from sisa.errors import CheckpointError, RecordCorruptError, name_some
from sisa.reports import AuditReport, ReceiptsReport, Violation
from sisa.schedule import ShardSchedule
from sisa.serving.loader import read_checkpoint
from sisa.status import CONFIG_DIGEST
from sisa.unlearning import DeletionManager


def audit(store: ShardStore, manager: DeletionManager) -> AuditReport:
    """Audit `store`; `manager` (of the same store) gives the shards' schedules and the config
    digest every checkpoint must name."""
    with store.reading():
        return _audit(store, manager)


def _audit(store: ShardStore, manager: DeletionManager) -> AuditReport:
    violations: list[Violation] = []

    def note(problem: str, shard: int | None = None, path: str | None = None) -> None:
        violations.append(Violation(shard, None, None, path, problem))

    damage = store.integrity()
    if damage:  # nothing read from a damaged database can be trusted
        note(f"the database {str(store.root / 'store.db')!r} is damaged: {'; '.join(damage[:3])}")
        return AuditReport(ok=False, checkpoints_checked=0, violations=violations)
    recorded = store.get_meta(CONFIG_DIGEST)
    if recorded is not None and recorded != manager.config_digest:
        note(f"the store was trained with config digest {recorded}; its config and base model now "
             f"give {manager.config_digest}: the base model changed on disk")
    for relative in store.symlinks():
        note("a symbolic link: nothing in a store is read or written through one, and what it "
             "points to is outside the store (it may hold a deleted record)",
             path=str(store.root / relative))
    for name in store.stray_files():
        note("in the store directory but not part of the store: it may hold a deleted record",
             path=str(store.root / name))
    for record_id, request in sorted(store.reappeared().items()):
        note(f"record {record_id!r} was deleted by request {request} and is live again (it was "
             "inserted again)")

    shards = store.shards()
    schedules: dict[int, ShardSchedule] = {}
    records = 0
    for s in shards:
        try:
            # What the store holds now, never what a process kept in memory.
            schedules.update(manager.schedules([s], fresh=True))
            records += len(schedules[s].members)
        except RecordCorruptError as exc:
            note(str(exc), shard=s)

    rows = store.checkpoints()
    known = {row.key: row for row in rows}
    sound: set[str] = set()
    tombstones = store.deleted_digests()
    for row in rows:
        problems = _checkpoint_problems(store, manager.config_digest, row, schedules.get(row.shard),
                                        tombstones)
        if row.parent is not None and row.parent not in known:
            problems.append(f"parent checkpoint {row.parent} is missing: the records it trained on "
                            "cannot be accounted for")
        for problem in problems:
            violations.append(Violation(row.shard, row.slice, row.key, str(store.root / row.path),
                                        problem))
        if not problems:
            sound.add(row.key)

    live = store.live()
    for s in shards:
        if s not in live:
            note("shard has no live checkpoint", shard=s)
            continue
        row = live[s]
        if s in schedules and row.key != schedules[s].keys[-1]:
            _flag(violations, store.root, row, "live checkpoint does not match the shard's current "
                                               "records")
        chain = 0
        key: str | None = row.key
        while key is not None:  # back through the parents to slice 0, each registered and sound
            if key not in known or key not in sound:
                _flag(violations, store.root, row, f"the chain of parents of the live checkpoint is "
                                                   f"broken at {key}: "
                                                   + ("not registered" if key not in known else
                                                      "that checkpoint fails the audit"))
                break
            chain += 1
            key = known[key].parent
        else:
            if chain != row.slice + 1:
                _flag(violations, store.root, row, f"the live checkpoint's chain has {chain} "
                                                   f"checkpoints for {row.slice + 1} slices")

    for relative in store.unregistered():
        note("on disk but not registered: it may derive from a deleted record",
             path=str(store.root / relative))
    embeddings = store.deleted_embeddings()
    if embeddings:
        note(f"{embeddings} cached embedding(s) of inputs that only deleted records had")
    for d in store.pending_deletions():
        note(f"deletion {d.request_id} is pending on shards {d.shards}")
    owed = store.scrub_owed()
    if owed:
        note(f"the WAL could not be truncated after a deletion (since {owed}; a reader held it): "
             "it may still hold a deleted record's old pages until a writer retries (`recover`)")
    for problem in _journal_problems(store):
        note(problem)
    try:
        for problem in store.witness_problems():
            note(f"witness: {problem}")
    except (shard_store.WitnessError, shard_store.StoreCorrupt) as exc:
        note(f"witness: {exc}")
    chain_report = verify_receipts(store, manager.config_digest)
    for problem in chain_report.problems:
        note(f"receipt chain: {problem}")
    return AuditReport(ok=not violations, checkpoints_checked=len(rows), violations=violations,
                       records_checked=records, receipts_checked=chain_report.receipts,
                       receipt_head=chain_report.head, warnings=_warnings(store))


def _journal_problems(store: ShardStore) -> list[str]:
    """What is wrong with the deletion journal, against the database."""
    log = store.journal_log
    try:
        entries, damaged = log.read()
    except shard_store.SymlinkError as exc:
        return [f"the deletion journal: {exc}"]
    problems = [f"the deletion journal's line {n} is damaged or was edited: what it records cannot "
                "be trusted" for n in damaged]
    if log.tail():
        problems.append("the deletion journal ends in a line cut short (a crash during an "
                        "acknowledgement, or an edit)")
    if store.get_meta("journal_started") is not None and not log.exists():
        problems.append("the deletion journal is missing: it was removed")
    known = {r.request_id for r in store.deletions()}
    journalled = {e["request_id"] for e in entries}
    for request_id in sorted(journalled - known):
        problems.append(f"deletion {request_id} was acknowledged (the deletion journal holds it) "
                        "but the database lacks it: its WAL was lost or it was restored from a backup")
    lacking = sorted(known - journalled)
    if lacking and log.exists():
        problems.append(f"the deletion journal lacks {len(lacking)} deletion(s) the database holds "
                        f"(e.g. {lacking[0]}): it was cut")
    return problems


def _warnings(store: ShardStore) -> list[str]:
    """What does not break the proof today but weakens it."""
    out = [f"{where} may be written by others than the store's owner: whoever can write the store "
           "can alter it" for where in store.loose_modes()]
    if not store.key_outside:
        out.append("the ledger key is kept inside the store: whoever can write store.db can re-seal "
                   "an altered checkpoint, which no audit can tell; keep the key outside the store "
                   "(a key file)")
    if store.get_meta("witnessed") is not None and store.witness_log is None:
        out.append("the store keeps a witness of its deletions, and it was not given: a store "
                   "restored from a backup cannot be told from this one without it")
    return out


def _sequence(receipt: dict[str, Any] | None) -> int:
    value = (receipt or {}).get("sequence")
    return value if isinstance(value, int) else -1  # a malformed one sorts first, then fails


def verify_receipts(store: ShardStore, config_digest: str | None = None,
                    tail: int | None = None) -> ReceiptsReport:
    """Re-check the receipt chain: sequence numbers without gaps, each receipt's keyed digest,
    the link to the one before, and that each deleted id's keyed digest is a tombstone of that
    request and its ledger entry names the same ids and shards; with `config_digest`, that every
    receipt names it. `tail`: look up the tombstones of the last `tail` receipts only (a writer
    checks what it builds on; the audit checks every one)."""
    problems: list[str] = []
    rows = store.deletions()
    if config_digest is not None:
        for d in rows:
            named = (d.receipt or {}).get("config_digest")
            if named not in (None, "", config_digest):
                problems.append(f"receipt of deletion {d.request_id} names another "
                                f"configuration ({named}) than the store's")
    chained = sorted((r for r in rows if r.receipt and "sequence" in r.receipt),
                     key=lambda r: _sequence(r.receipt))
    stored = store.chain_positions()
    previous: str | None = None
    for n, row in enumerate(chained, start=1):
        receipt = row.receipt or {}
        name = f"receipt {n} (deletion {row.request_id})"
        if receipt.get("sequence") != n or stored.get(row.request_id, (None,))[0] != n:
            problems.append(f"{name}: sequence number {receipt.get('sequence')} where {n} "
                            "belongs: a receipt is missing or was reordered")
        if receipt.get("request_id") != row.request_id:
            problems.append(f"{name}: names deletion {receipt.get('request_id')!r}")
        digest = store.receipt_digest(receipt)
        if digest != receipt.get("digest") or digest != stored.get(row.request_id, (0, None))[1]:
            problems.append(f"{name}: its digest does not match its content: it was edited")
        if receipt.get("previous") != previous:
            problems.append(f"{name}: does not link to the receipt before it: the chain was "
                            "cut or rewritten")
        previous = receipt.get("digest")
        digests = receipt.get("record_digests", [])
        if digests != row.record_ids:
            problems.append(f"{name}: its deleted ids differ from the ledger entry's")
        if tail is not None and n <= len(chained) - tail:
            continue
        found = store.tombstones_of(row.request_id, digests)
        if len(found) != len(digests):
            problems.append(f"{name}: {len(digests) - len(found)} of its {len(digests)} deleted "
                            "ids have no tombstone of this deletion in the store")
        try:
            affected = sorted(int(a["shard"]) for a in receipt.get("affected_shards", []))
        except (KeyError, TypeError, ValueError):
            problems.append(f"{name}: its retrained shards are malformed")
            continue
        if not set(affected) <= set(row.shards):
            problems.append(f"{name}: retrained shards {affected} that the ledger entry "
                            f"({row.shards}) does not name")
    unchained = sum(1 for r in rows if r.status == "applied" and r.receipt is not None
                    and "sequence" not in r.receipt)
    stray = sorted(set(stored) - {r.request_id for r in chained})
    if stray:
        problems.append(f"ledger entries {stray[:5]} hold a chain position but no receipt")
    orphans = store.orphan_tombstones()
    if orphans:  # e.g. the last receipt removed with its ledger entry: no link shows it
        problems.append(f"{orphans} deleted record(s) name a deletion the ledger does not hold: "
                        "a ledger entry and its receipt were removed")
    pending = sum(1 for r in rows if r.status == "pending")
    return ReceiptsReport(ok=not problems, receipts=len(chained), unchained=unchained,
                          pending=pending, head=previous, problems=problems)


def _flag(violations: list[Violation], root: object, row: CheckpointRow, problem: str) -> None:
    violations.append(Violation(row.shard, row.slice, row.key, f"{root}/{row.path}", problem))


def _checkpoint_problems(store: ShardStore, config_digest: str, row: CheckpointRow,
                         schedule: ShardSchedule | None, tombstones: set[str]) -> list[str]:
    """What is wrong with one registered checkpoint ([] if nothing)."""
    problems = []
    if not store.sealed(row):
        problems.append("its registration (files and their sha256) does not match its seal: the "
                        "database entry was altered")
    try:
        store.verify_files(row)
        m: Manifest = read_checkpoint(store, row).manifest
    except (CheckpointFileError, CheckpointError) as exc:
        return [*problems, str(exc)]
    if (m.shard, m.slice, m.parent, m.record_count) != (row.shard, row.slice, row.parent,
                                                        row.record_count):
        problems.append(f"manifest (shard {m.shard}, slice {m.slice}, parent {m.parent}, "
                        f"{m.record_count} records) differs from the registered checkpoint")
    if m.config_digest != config_digest:
        problems.append("trained with another configuration or base model than the store's")
    held = [r for r in m.records if keyed(store.key, "id", r) in tombstones]
    if held:
        problems.append(f"holds {len(held)} deleted record(s)")
    if schedule is None:
        return problems
    if row.slice >= len(schedule.keys) or schedule.keys[row.slice] != row.key:
        problems.append("not trained on the shard's current records (a stale checkpoint)")
        return problems
    expected = [mem.id for mem in schedule.slices[row.slice]]
    if list(m.records) != expected:
        extra, missing = set(m.records) - set(expected), set(expected) - set(m.records)
        problems.append(f"its manifest lists other records than the slice holds ({len(extra)} "
                        f"extra, {len(missing)} missing, e.g. "
                        f"{name_some(sorted(extra | missing), limit=3)})")
    if m.record_set_digest != schedule.set_digests[row.slice]:
        problems.append("its manifest's record-set digest does not match the shard's records")
    if m.record_count != schedule.cumulative_counts()[row.slice]:
        problems.append(f"its manifest counts {m.record_count} records; slices 0..{row.slice} hold "
                        f"{schedule.cumulative_counts()[row.slice]}")
    parent = schedule.keys[row.slice - 1] if row.slice else None
    if m.parent != parent:
        problems.append("its manifest names another parent than the slice before")
    return problems


__all__ = ["audit", "verify_receipts"]
