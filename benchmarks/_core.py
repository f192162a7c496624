"""The Core path: executemany insert, select, ``IN`` lookup, cold select.

The ORM section measures ``add_all`` + ``commit``, where SQLAlchemy's unit
of work (~70 us a row) hides the per-value cost of encryption. Here nothing
sits between the statement and the column types:

- insert: ``conn.execute(insert(t), rows)`` (one executemany of parameter
  dicts built untimed; the database makes the primary keys). Row scope gets
  its keys automatically (``rows.core``: made, bound to the new rows and
  inserted in the statement's transaction), inside the timed insert: the
  key creation is part of what a row-scoped insert costs ("sa-envelope row,
  ids given": the parameters carry the primary keys, so each key is bound as
  it is made and the INSERT needs no RETURNING);
- select: ``conn.execute(select(...)).all()``, every value touched;
- lookup: ``select(...).where(t.c.ssn.in_(values))`` of 1,000 existing
  values (fewer if the table is smaller), for the variants whose stored bytes
  support equality (plaintext and deterministic); the others say why not;
- select, cold: the same select after the variant's key cache was emptied
  (untimed), as in a fresh process: sa-envelope unwraps its table key (one
  KMS call) and, for row scope, every row key. The KMS calls of each cold
  select are recorded.

Every contender has its own engine and, for sa-envelope, its own KeyManager
and counted KMS client, as in the ORM section.
"""

from __future__ import annotations

import random
from typing import Any, Callable

from sqlalchemy import Column, Integer, MetaData, Table, insert, select

from ._backend import BackendEnv, forget_row_keys
from ._data import dataset
from ._kms import KmsClient
from ._orm import table_name
from ._profile import profile_steps
from ._rounds import Contender, run_interleaved
from ._settings import Settings
from ._variants import COLUMNS, Variant

__all__ = ["CoreTable", "LOOKUP_VALUES", "lookup_targets", "run_core"]

LOOKUP_VALUES = 1_000
STEPS = ("insert", "select", "lookup", "select_cold")


def lookup_targets(rows: list[tuple[str, str, str]]) -> list[str]:
    """A fixed sample of existing SSNs: the same values every run."""
    count = min(LOOKUP_VALUES, len(rows))
    return [rows[i][1] for i in random.Random(15).sample(range(len(rows)), count)]


class CoreTable:
    """One variant's Core table on one backend, and its timed steps."""

    def __init__(self, variant: Variant, env: BackendEnv, rows: list[tuple[str, str, str]],
                 suffix: str = "_core") -> None:
        self.variant = variant
        self.rows = rows
        self.engine = env.engine()
        self.keys: Any = None
        self.kms: KmsClient | None = None
        if variant.uses_keys:
            self.keys, self.kms = env.key_manager(self.engine)
        self.metadata = MetaData()
        types = variant.types(self.keys)
        equality = not variant.no_equality
        self.table = Table(
            table_name(variant, suffix), self.metadata,
            Column("id", Integer, primary_key=True),
            *(Column(name, types[name], index=equality and name == "ssn") for name in COLUMNS),
        )
        self.targets = lookup_targets(rows)
        self.cold_kms_calls: list[int] = []
        self._params: list[dict[str, Any]] = []

    def recreate(self) -> None:
        """Untimed: an empty table and the parameter dicts of the insert."""
        self.metadata.drop_all(self.engine)
        self.metadata.create_all(self.engine)
        forget_row_keys(self.keys, self.table)
        self._params = [dict(zip(COLUMNS, row)) for row in self.rows]
        if self.variant.ids_given:  # the application assigns the primary keys: no RETURNING
            for i, params in enumerate(self._params, 1):
                params["id"] = i

    def insert(self) -> None:
        with self.engine.begin() as conn:
            conn.execute(insert(self.table), self._params)  # row scope: keys made by the Core hook
        self._params = []

    def select(self) -> int:
        touch = self.variant.touch
        c = self.table.c
        with self.engine.connect() as conn:
            loaded = conn.execute(select(c.email, c.ssn, c.notes)).all()
        for email, ssn, notes in loaded:
            touch(email)
            touch(ssn)
            touch(notes)
        return len(loaded)

    def lookup(self) -> None:
        touch = self.variant.touch
        c = self.table.c
        with self.engine.connect() as conn:
            found = conn.execute(select(c.id, c.ssn).where(c.ssn.in_(self.targets))).all()
        if sorted(str(touch(row[1])) for row in found) != sorted(self.targets):
            raise AssertionError(f"{self.variant.name}: IN lookup returned the wrong rows")

    def go_cold(self) -> None:
        """Untimed, before the cold select: forget every key, as a new process would."""
        if self.keys is not None and self.kms is not None:
            self.keys.clear_cache()
            self.kms.reset()

    def select_cold(self) -> int:
        count = self.select()
        if self.kms is not None:
            self.cold_kms_calls.append(self.kms.total())
        return count

    def contender(self) -> Contender:
        steps: list[tuple[str, Callable[[], object]]] = [("insert", self.insert), ("select", self.select)]
        if not self.variant.no_equality:
            steps.append(("lookup", self.lookup))
        steps.append(("select_cold", self.select_cold))
        return Contender(self.variant.name, steps, self.recreate, before={"select_cold": self.go_cold})

    def dispose(self) -> None:
        self.metadata.drop_all(self.engine)
        self.engine.dispose()


def run_core(env: BackendEnv, variants: list[Variant], settings: Settings) -> dict[str, Any]:
    """The Core section on one backend."""
    rows = dataset(settings.rows)
    tables = [CoreTable(v, env, rows) for v in variants]
    try:
        timings = run_interleaved([t.contender() for t in tables], rounds=settings.rounds)
        result: dict[str, Any] = {
            "rows": settings.rows, "lookup_values": len(tables[0].targets) if tables else 0,
            "timings": timings.as_dict(), "variants": {},
        }
        for t in tables:
            info: dict[str, Any] = {}
            if t.variant.no_equality:
                info["lookup_unavailable"] = t.variant.no_equality
            if t.kms is not None:
                # one entry per round, warm-up included: KMS calls of a cold select
                info["cold_select_kms_calls"] = t.cold_kms_calls
            result["variants"][t.variant.name] = info
        if settings.profile:
            result["profile"] = profile_steps(tables, settings.profile, f"Core on {env.name}")
        return result
    finally:
        for t in tables:
            t.dispose()

