"""A cold read unwraps its row keys in batches (rows/keys.py, ``ciphers.open_many``).

Decided: a key row that does not unwrap (here: its wrapped bytes altered in
the database, attacker-controlled input) fails its whole batch loudly, with a
:class:`DecryptionError` naming the table and that key's id; nothing of the
batch is cached. Rows whose keys are loaded in another statement still read.
"""

from __future__ import annotations

import os
from typing import Any

import pytest
from sqlalchemy import event, select, update
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

from sa_envelope import DecryptionError, KeyManager, LocalKeyProvider
from sa_envelope.envelope import format as fmt
from support.models import row_scope_model

ROWS = 50
IDS = range(1, ROWS + 1)


def _written(engine: Engine, master: bytes) -> tuple[KeyManager, Any]:
    keys = KeyManager(engine, LocalKeyProvider(master))
    keys.create_table()
    patient = row_scope_model(keys, "batch_rows")
    patient.metadata.create_all(engine)
    with Session(engine) as session:
        session.add_all([patient(id=i, name=f"n{i}", ssn=f"s{i}", notes={"i": i}) for i in IDS])
        session.commit()
    return keys, patient


def _key_of(engine: Engine, patient: Any, row_id: int) -> int:
    with engine.connect() as conn:
        stored = conn.exec_driver_sql(f"SELECT notes FROM {patient.__tablename__} WHERE id = {row_id}").scalar_one()
    return fmt.key_id_of(bytes(stored))


def test_a_tampered_key_row_fails_its_batch_naming_table_and_key(engine: Engine) -> None:
    master = os.urandom(32)
    keys, patient = _written(engine, master)
    victim = _key_of(engine, patient, 7)
    t = keys.table
    with engine.begin() as conn:
        wrapped = bytes(conn.execute(select(t.c.wrapped_key).where(t.c.id == victim)).scalar_one())
        altered = wrapped[:-1] + bytes((wrapped[-1] ^ 1,))
        conn.execute(update(t).where(t.c.id == victim).values(wrapped_key=altered))
    cold = KeyManager(engine, LocalKeyProvider(master))
    cold_patient = row_scope_model(cold, "batch_rows")
    with Session(engine) as session, pytest.raises(DecryptionError) as caught:
        session.scalars(select(cold_patient).order_by(cold_patient.id)).all()
    assert caught.value.table == "batch_rows"
    assert caught.value.key_id == fmt.format_key_id(victim)
    assert len(cold.rows.cache) <= 1  # nothing of the batch cached (at most the digest key)
    with Session(engine) as session:  # the other rows, read without the tampered one, still open
        rows = session.scalars(select(cold_patient).where(cold_patient.id != 7).order_by(cold_patient.id)).all()
        assert [r.notes for r in rows] == [{"i": i} for i in IDS if i != 7]


@pytest.mark.backends("postgresql")
def test_key_ids_and_row_digests_reach_psycopg_as_binary_arrays(engine: Engine) -> None:
    """On psycopg the ``= ANY()`` parameters of the key-row queries (the
    digests an INSERT looks up, the ids a cold read loads) are dumped with the
    binary list dumper (rows/pgarrays.py), and the rows still read back."""
    if engine.dialect.driver != "psycopg":
        pytest.skip("psycopg only")
    from psycopg.adapt import PyFormat
    from psycopg.types.array import ListBinaryDumper

    from sa_envelope.rows.pgarrays import BinaryArray

    seen: list[tuple[str, Any]] = []

    def record(conn: Any, cursor: Any, statement: str, params: Any, context: Any, many: bool) -> None:
        for value in (params.values() if isinstance(params, dict) else ()):
            if isinstance(value, list) and "ANY" in statement.upper():
                seen.append((type(value).__name__, cursor.adapters.get_dumper(type(value), PyFormat.AUTO)))

    event.listen(engine, "before_cursor_execute", record)
    try:
        keys, patient = _written(engine, os.urandom(32))  # ids given: each row's digest looked up
        keys.clear_cache()
        with Session(engine) as session:
            got = session.scalars(select(patient).order_by(patient.id)).all()
            assert [p.ssn for p in got] == [f"s{i}" for i in IDS]
    finally:
        event.remove(engine, "before_cursor_execute", record)
    assert len(seen) >= 2 and all(s == (BinaryArray.__name__, ListBinaryDumper) for s in seen)
