"""Streamed reads of a row-scoped table load row keys once per partition.

A server-side cursor (``yield_per``, ``stream_results`` on PostgreSQL and
MariaDB) hands rows over as the caller iterates. Before, each row's key was
loaded on its own: one key-table query per row. Now each partition's keys
are loaded together on another connection (rows/stream.py), and the row
binding is checked as for a buffered result. SQLite has no server-side
cursors; its streamed reads get the same pass on their own connection.
"""

from __future__ import annotations

import os
from typing import Any, Iterator

import pytest
from sqlalchemy import event, select
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

from sa_envelope import DecryptionError, KeyManager, LocalKeyProvider
from support.models import row_scope_model

ROWS = 3_000
PARTITION = 500
IDS = range(1, ROWS + 1)  # MariaDB turns an explicit 0 into the next AUTO_INCREMENT id


@pytest.fixture
def master() -> bytes:
    return os.urandom(32)


@pytest.fixture
def written(engine: Engine, master: bytes) -> Any:
    keys = KeyManager(engine, LocalKeyProvider(master))
    keys.create_table()
    patient = row_scope_model(keys, "stream_rows")
    patient.metadata.create_all(engine)
    with Session(engine) as session:
        session.add_all([patient(id=i, name=f"n{i}", ssn=f"s{i}", notes={"i": i}) for i in IDS])
        session.commit()
    return patient


class KeyQueries:
    """Counts the statements sent to the key table (a fresh manager: a cold cache)."""

    def __init__(self, engine: Engine, table_name: str) -> None:
        self.count = 0
        self.name = table_name
        event.listen(engine, "before_cursor_execute", self)

    def __call__(self, conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        if self.name in statement:
            self.count += 1


@pytest.fixture
def cold(engine: Engine, master: bytes, written: Any) -> Iterator[tuple[Any, KeyQueries]]:
    keys = KeyManager(engine, LocalKeyProvider(master))
    counter = KeyQueries(engine, keys.table.name)
    yield row_scope_model(keys, "stream_rows"), counter
    event.remove(engine, "before_cursor_execute", counter)


def test_orm_yield_per_loads_row_keys_per_partition(engine: Engine, cold: tuple[Any, KeyQueries]) -> None:
    patient, queries = cold
    with Session(engine) as session:
        stmt = select(patient).order_by(patient.id).execution_options(yield_per=PARTITION)
        got = [(p.id, p.name, p.ssn, p.notes) for p in session.scalars(stmt)]
    assert got == [(i, f"n{i}", f"s{i}", {"i": i}) for i in IDS]
    # a table key, the digest key, then a few queries per partition: never one per row
    assert 1 <= queries.count <= 3 * (ROWS // PARTITION) + 5, queries.count


def test_core_stream_results_loads_row_keys_per_partition(engine: Engine, cold: tuple[Any, KeyQueries]) -> None:
    patient, queries = cold
    t = patient.__table__
    with engine.connect() as conn:
        result = conn.execution_options(stream_results=True, max_row_buffer=PARTITION).execute(
            select(t.c.id, t.c.ssn, t.c.notes).order_by(t.c.id)
        )
        got = [tuple(r) for r in result]
    assert got == [(i, f"s{i}", {"i": i}) for i in IDS]
    # the buffer grows 1, 5, 25, 125, then PARTITION rows a fetch
    assert 1 <= queries.count <= 3 * (ROWS // PARTITION + 5) + 5, queries.count


def test_a_value_copied_between_rows_is_refused_in_a_stream(engine: Engine, cold: tuple[Any, KeyQueries]) -> None:
    patient, _ = cold
    with engine.begin() as conn:  # a database writer copies row 1's stored value into row 2,000
        conn.exec_driver_sql(
            "UPDATE stream_rows SET ssn = (SELECT ssn FROM (SELECT ssn FROM stream_rows WHERE id = 1) AS src)"
            " WHERE id = 2000"
        )
    with Session(engine) as session:
        stmt = select(patient).order_by(patient.id).execution_options(yield_per=PARTITION)
        with pytest.raises(DecryptionError, match="bound to another row"):
            for _ in session.scalars(stmt):
                pass

