"""Indexed equality lookup: a deterministic column against a plaintext one.

Two tables of ``lookup_rows`` rows, each with an index on its SSN column:
one plaintext, one ``EncryptedType(..., deterministic=True)``. A timed step
is ``lookups`` ORM queries ``select(M).where(M.ssn == value)`` for existing
values, each result's SSN touched. The encrypted side pays one AES-SIV
encryption of the parameter and one decryption of the result per lookup.
"""

from __future__ import annotations

import random
from typing import Any

from sqlalchemy import Column, Integer, MetaData, String, Table, select, text
from sqlalchemy.orm import Session, registry

from ._backend import PREFIX, BackendEnv
from ._data import ssn
from ._rounds import Contender, run_interleaved
from ._settings import Settings
from ._variants import VARIANTS

__all__ = ["run_lookup"]

CHUNK = 5_000
DETERMINISTIC = "sa-envelope deterministic"


class LookupTable:
    def __init__(self, name: str, column_type: Any, engine: Any, settings: Settings) -> None:
        self.engine = engine
        self.metadata = MetaData()
        self.table = Table(
            PREFIX + name, self.metadata,
            Column("id", Integer, primary_key=True),
            Column("ssn", column_type, nullable=False, index=True),
        )

        class Row:
            pass

        registry().map_imperatively(Row, self.table)
        self.model = Row
        rng = random.Random(6)
        self.targets = [ssn(rng.randrange(settings.lookup_rows)) for _ in range(settings.lookups)]
        self._load(settings.lookup_rows)

    def _load(self, count: int) -> None:
        """Untimed bulk load through Core (values still go through the type)."""
        self.metadata.drop_all(self.engine)
        self.metadata.create_all(self.engine)
        for start in range(0, count, CHUNK):
            with self.engine.begin() as conn:
                conn.execute(self.table.insert(), [{"ssn": ssn(i)} for i in range(start, min(count, start + CHUNK))])
        with self.engine.begin() as conn:
            name = self.table.name
            statement = f"ANALYZE TABLE {name}" if conn.dialect.name in ("mysql", "mariadb") else f"ANALYZE {name}"
            conn.execute(text(statement))

    def lookup(self) -> None:
        model = self.model
        with Session(self.engine) as session:
            for value in self.targets:
                found = session.scalars(select(model).where(model.ssn == value)).one()
                if found.ssn != value:
                    raise AssertionError("lookup returned the wrong row")

    def dispose(self) -> None:
        self.metadata.drop_all(self.engine)
        self.engine.dispose()


def run_lookup(env: BackendEnv, settings: Settings) -> dict[str, Any]:
    variant = VARIANTS.get(DETERMINISTIC)
    reason = "variant not registered" if variant is None else variant.unavailable()
    if reason:
        return {"unavailable": reason}
    from sa_envelope import EncryptedType

    keys, _ = env.key_manager(env.engine())
    plain = LookupTable("lookup_plaintext", String(11), env.engine(), settings)
    det = LookupTable("lookup_deterministic", EncryptedType(String(11), keys, deterministic=True), keys.engine, settings)
    try:
        timings = run_interleaved(
            [Contender("plaintext", [("lookup", plain.lookup)]), Contender(DETERMINISTIC, [("lookup", det.lookup)])],
            rounds=settings.rounds,
        )
    finally:
        plain.dispose()
        det.dispose()
    return {
        "rows": settings.lookup_rows, "lookups": settings.lookups, "timings": timings.as_dict(),
        "ratio": timings.ratio(DETERMINISTIC, "plaintext", "lookup"),
        "cpu_ratio": timings.ratio(DETERMINISTIC, "plaintext", "lookup", clock="cpu"),
    }
