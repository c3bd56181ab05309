"""The audit: proof, from the database and the files on disk, that no checkpoint holds a deleted record.

It checks every registered checkpoint's files against their recorded sha256 (and that no other file
is in its directory), its manifest against its registration, the deleted records against every
manifest, the parent chain of every checkpoint, that each shard's live checkpoint is the one its
current records give, and that nothing on disk is unregistered (a leftover could derive from a
deleted record), and that no cached embedding is of a deleted input. It reads what the store
holds now, never what a process has kept in memory, and it holds the writer lock while it reads:
a writer at work would have files in flight, and nothing it audits changes meanwhile.
"""

from __future__ import annotations

from shard_store import CheckpointFileError, CheckpointRow
from sisa.errors import CheckpointError
from sisa.reports import AuditReport, Violation
from sisa.unlearning import DeletionManager


def audit(manager: DeletionManager) -> AuditReport:
    with manager.store.writer():
        return _audit(manager)


def _audit(manager: DeletionManager) -> AuditReport:
    store = manager.store
    manager.data.clear()  # check against what the store holds, not what was loaded
    violations: list[Violation] = []

    def flag(row: CheckpointRow, problem: str) -> None:
        violations.append(Violation(row.shard, row.slice, row.key, str(store.root / row.path), problem))

    deleted = store.deleted_ids()
    rows = store.checkpoints()
    known = {row.key: row for row in rows}
    for row in rows:
        try:
            store.verify_files(row)
            checkpoint = manager.read_checkpoint(row.key, row)
        except (CheckpointFileError, CheckpointError) as exc:
            flag(row, str(exc))
            continue
        m = checkpoint.manifest
        if (m.shard, m.slice, m.parent, m.record_count) != (row.shard, row.slice, row.parent,
                                                            row.record_count):
            flag(row, f"manifest (shard {m.shard}, slice {m.slice}, parent {m.parent}, "
                      f"{m.record_count} records) differs from the registered checkpoint")
        if m.config_digest != manager.config_digest:
            flag(row, "trained with another configuration or base model than the store's")
        held = set(m.records) & deleted
        if held:
            flag(row, f"holds {len(held)} deleted record(s), e.g. {sorted(held)[:3]}")
        if row.parent is not None and row.parent not in known:
            flag(row, f"parent checkpoint {row.parent} is missing: the records it trained on "
                      "cannot be accounted for")

    shards = store.shards()
    expected = {s: sched.keys[-1] for s, sched in manager.schedules(shards).items()}
    live = store.live()
    for s in shards:
        if s not in live:
            violations.append(Violation(s, None, None, None, "shard has no live checkpoint"))
        elif live[s].key != expected[s]:
            flag(live[s], "live checkpoint does not match the shard's current records")
    for relative in store.unregistered():
        violations.append(Violation(None, None, None, str(store.root / relative),
                                    "on disk but not registered: it may derive from a deleted record"))
    embeddings = store.deleted_embeddings()
    if embeddings:
        violations.append(Violation(None, None, None, None, f"{embeddings} cached embedding(s) of "
                                    "inputs that only deleted records had"))
    for d in store.pending_deletions():
        violations.append(Violation(None, None, None, None,
                                    f"deletion {d.request_id} is pending on shards {d.shards}"))
    return AuditReport(ok=not violations, checkpoints_checked=len(rows), violations=violations)

