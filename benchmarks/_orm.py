"""ORM insert and select of N rows with three encrypted columns, every variant.

Insert is ``add_all`` + ``commit`` of objects built beforehand (untimed);
select is a fresh session that loads every row and touches every encrypted
attribute (for lazy peers, touching decrypts). Each contender has its own
engine and, for sa-envelope, its own KeyManager with its own counted KMS
client, so nothing one variant caches helps another. Keys stay cached across
rounds, as they would in a long-running process; ``_kmscalls`` measures the
cold start.
"""

from __future__ import annotations

import re
import statistics
from typing import Any

from sqlalchemy import Column, Integer, MetaData, Table, select
from sqlalchemy.orm import Session, registry

from ._backend import PREFIX, BackendEnv, forget_row_keys
from ._data import dataset
from ._profile import profile_steps
from ._rounds import Contender, run_interleaved
from ._settings import Settings
from ._variants import COLUMNS, Variant

__all__ = ["OrmTable", "run_orm", "table_name"]


def table_name(variant: Variant, suffix: str = "") -> str:
    return PREFIX + re.sub(r"[^a-z0-9]+", "_", variant.name.lower()).strip("_") + suffix


class OrmTable:
    """One variant's mapped table on one backend, and its two timed steps."""

    def __init__(self, variant: Variant, env: BackendEnv, rows: list[tuple[str, str, str]], suffix: str = "",
                 keys: Any = None) -> None:
        self.variant = variant
        self.rows = rows
        # A KeyManager follows the transactions of one engine: use its engine.
        self.engine = keys.engine if keys is not None else env.engine()
        self.keys, self.kms = keys, None
        if variant.uses_keys and keys is None:
            self.keys, self.kms = env.key_manager(self.engine)
        self.metadata = MetaData()
        types = variant.types(self.keys)
        self.table = Table(
            table_name(variant, suffix), self.metadata,
            Column("id", Integer, primary_key=True),
            *(Column(name, types[name]) for name in COLUMNS),
        )

        class Row:
            def __init__(self, email: str, ssn: str, notes: str) -> None:
                self.email, self.ssn, self.notes = email, ssn, notes

        registry().map_imperatively(Row, self.table)
        self.model = Row
        self._pending: list[Any] = []

    def recreate(self) -> None:
        """Untimed: an empty table and the objects the insert step will add."""
        self.metadata.drop_all(self.engine)
        self.metadata.create_all(self.engine)
        forget_row_keys(self.keys, self.table)
        self._pending = [self.model(*row) for row in self.rows]
        if self.variant.ids_given:  # the application assigns the primary keys
            for i, obj in enumerate(self._pending, 1):
                obj.id = i

    def insert(self) -> None:
        with Session(self.engine) as session:
            session.add_all(self._pending)
            session.commit()
        self._pending = []

    def select(self) -> int:
        touch = self.variant.touch
        with Session(self.engine) as session:
            loaded = session.scalars(select(self.model)).all()
            for obj in loaded:
                touch(obj.email)
                touch(obj.ssn)
                touch(obj.notes)
        return len(loaded)

    def contender(self) -> Contender:
        return Contender(self.variant.name, [("insert", self.insert), ("select", self.select)], self.recreate)

    def stored_overhead(self) -> dict[str, float]:
        """Mean stored bytes per value minus mean plaintext bytes, per column."""
        reflected = Table(self.table.name, MetaData(), autoload_with=self.engine)
        with self.engine.connect() as conn:
            stored = conn.execute(select(*(reflected.c[name] for name in COLUMNS))).all()
        result: dict[str, float] = {}
        for index, name in enumerate(COLUMNS):
            plain = statistics.fmean(len(row[index].encode()) for row in self.rows)
            raw = statistics.fmean(_nbytes(row[index]) for row in stored)
            result[name] = raw - plain
        result["mean"] = statistics.fmean(result[name] for name in COLUMNS)
        return result

    def dispose(self) -> None:
        self.metadata.drop_all(self.engine)
        self.engine.dispose()


def _nbytes(value: Any) -> int:
    return len(value.encode()) if isinstance(value, str) else len(bytes(value))


def run_orm(env: BackendEnv, variants: list[Variant], settings: Settings) -> dict[str, Any]:
    """The insert/select section on one backend."""
    rows = dataset(settings.rows)
    tables = [OrmTable(v, env, rows) for v in variants]
    try:
        before = {t.variant.name: t.keys.stats()["keys_created"] for t in tables if t.keys}
        timings = run_interleaved([t.contender() for t in tables], rounds=settings.rounds)
        result: dict[str, Any] = {"rows": settings.rows, "timings": timings.as_dict(), "variants": {}}
        for t in tables:
            info: dict[str, Any] = {"stored_overhead": t.stored_overhead()}
            if t.kms is not None:
                info["kms_calls_all_rounds"] = t.kms.total()
                created = t.keys.stats()["keys_created"] - before[t.variant.name]
                info["keys_per_1k_rows"] = 1000 * created / (settings.rows * (settings.rounds + 1))
            result["variants"][t.variant.name] = info
        if settings.profile:
            result["profile"] = profile_steps(tables, settings.profile, f"on {env.name}")
        return result
    finally:
        for t in tables:
            t.dispose()

