"""The orphan sweep: shred row keys whose row no longer exists.

A row deleted through the ORM has its keys shredded in the deleting
transaction (:mod:`sa_envelope.rows.orm`). Rows deleted any other way (raw
SQL, ``TRUNCATE``, ``ON DELETE CASCADE``, a bulk ``delete()``) leave their
keys live: a backup of those rows would still decrypt. The sweep finds them
through the row binding (:mod:`sa_envelope.rows.binding`): a live row key
bound to a digest that no existing row of its table has is an orphan.

Safe against concurrent writers: the candidate keys are listed *before* the
table's primary keys are read. A key and its row commit together, so every
candidate's row, if it exists, is committed by then and is seen by the scan.
Keys made later are not candidates. Shredding goes in batches (the one job
runner: a transaction each, a progress bar, fault points); a rerun after a
crash finds what is left, which is the resume. Unbound keys (made before
rows were bound, or by the Core API without a primary key) are not swept.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Iterable

from sqlalchemy import Connection, MetaData, Table, and_, select
from sqlalchemy.exc import NoSuchTableError

from ..columns.encrypted import EncryptedType
from ..keys import table as kt
from ..rows import binding
from ..rows.keys import RowKeys
from .runner import run_batches

__all__ = ["SweepReport", "find_orphans", "sweep_orphans"]


@dataclass
class SweepReport:
    """``found``: orphaned row keys; ``shredded``: those this run destroyed
    (0 on a dry run); ``tables``: how many owner tables were checked;
    ``missing``: owners whose table was not found, skipped."""

    found: int = 0
    shredded: int = 0
    tables: int = 0
    dry_run: bool = True
    missing: list[str] = field(default_factory=list)
    orphans: list[tuple[str, int]] = field(default_factory=list, repr=False)

    def __str__(self) -> str:
        action = "would shred (dry run, pass --apply)" if self.dry_run else "shredded"
        count = self.found if self.dry_run else self.shredded
        text = f"orphan sweep: {self.found} orphaned row keys in {self.tables} tables, {count} {action}"
        if self.missing:
            text += f"; skipped, table not found (renamed? pass tables=): {', '.join(self.missing)}"
        return text


def _candidates(conn: Connection, rows: RowKeys) -> dict[str, list[tuple[int, bytes]]]:
    t = rows.table
    stmt = select(t.c.owner_table, t.c.id, t.c.row_digest).where(
        and_(t.c.scope == kt.SCOPE_ROW, t.c.status == kt.ACTIVE, t.c.row_digest.is_not(None))
    )
    found: dict[str, list[tuple[int, bytes]]] = defaultdict(list)
    for owner, key_id, digest in conn.execute(stmt):
        found[owner].append((key_id, bytes(digest)))
    return found


def _owner_table(conn: Connection, owner: str, tables: dict[str, Table]) -> Table | None:
    """The user table ``owner`` names (given, or reflected); ``None`` if not found.

    A table that is not found is skipped, never swept: it may have been
    renamed with its columns pinned (``context="old.column"``), and taking
    all its keys for orphans would shred live rows."""
    if owner in tables:
        return tables[owner]
    schema, _, name = owner.rpartition(".")
    try:
        return Table(name, MetaData(), schema=schema or None, autoload_with=conn)
    except NoSuchTableError:
        return None


def _existing(conn: Connection, rows: RowKeys, owner: str, table: Table) -> set[bytes]:
    """The digests of every row ``owner`` holds now."""
    dkey = binding.digest_key(rows, conn, owner, create=False)
    if dkey is None:
        return set()
    result = conn.execution_options(stream_results=True).execute(select(*table.primary_key.columns))
    return {binding.row_digest(dkey, tuple(r)) for r in result}


def _owners(tables: Iterable[Table]) -> dict[str, Table]:
    """Given tables by every name their keys may be owned under: the table's
    names, and the table part of its row-scoped columns' pinned contexts."""
    out: dict[str, Table] = {}
    for t in tables:
        names = {t.name, t.fullname} | {
            c.type._table for c in t.columns if isinstance(c.type, EncryptedType) and c.type._table
        }
        out.update((name, t) for name in names)
    return out


def find_orphans(rows: RowKeys, tables: Iterable[Table] = ()) -> SweepReport:
    """Count the orphaned row keys; ``report.orphans`` lists ``(owner, key id)``."""
    given = _owners(tables)
    report = SweepReport()
    with rows.store.engine.connect() as conn:
        candidates = _candidates(conn, rows)  # before the scans: see the module docstring
        for owner, keys in candidates.items():
            table = _owner_table(conn, owner, given)
            if table is None:
                report.missing.append(owner)
                continue
            existing = _existing(conn, rows, owner, table)
            report.orphans += [(owner, key_id) for key_id, digest in keys if digest not in existing]
    report.found, report.tables = len(report.orphans), len(candidates) - len(report.missing)
    return report


def sweep_orphans(
    rows: RowKeys,
    *,
    dry_run: bool = True,
    tables: Iterable[Table] = (),
    batch_size: int = 500,
    progress: bool | None = None,
) -> SweepReport:
    """Find orphaned row keys; unless ``dry_run``, shred them in batches."""
    report = find_orphans(rows, tables)
    report.dry_run = dry_run
    if dry_run or not report.orphans:
        return report
    todo = iter(report.orphans)

    def batch(conn: Connection) -> int:
        chunk = [item for _, item in zip(range(batch_size), todo)]
        for owner, key_id in chunk:
            rows.shred_key(conn, key_id, owner=owner)
        return len(chunk)

    report.shredded = run_batches(
        rows.store.engine, "sweep", batch, total=len(report.orphans), desc="sweep orphaned row keys", progress=progress
    )
    return report
