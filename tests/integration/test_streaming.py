"""Streaming reads (server-side cursors) return every row, with a cold key cache.

A key lookup made on the streaming connection itself would cut an
unbuffered MySQL/MariaDB result short, silently: the first value of the
stream misses the cache and loads its key. Key lookups must go to another
connection while a stream is open.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy import String, insert, select
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Mapped, Session, mapped_column

from sa_envelope import EncryptedType, KeyManager, LocalKeyProvider
from support.models import new_base

ROWS = 3_000
IDS = range(1, ROWS + 1)  # MariaDB turns an explicit 0 into the next AUTO_INCREMENT id


def _model(keys: KeyManager) -> type:
    class Person(new_base()):  # type: ignore[misc]
        __tablename__ = "stream_people"
        id: Mapped[int] = mapped_column(primary_key=True)
        name: Mapped[str] = mapped_column(EncryptedType(String(50), keys))
        ssn: Mapped[str] = mapped_column(EncryptedType(String(11), keys, deterministic=True))

    return Person


@pytest.fixture
def written(engine: Engine, tmp_path: Path) -> Path:
    key_file = tmp_path / "master.key"
    keys = KeyManager(engine, LocalKeyProvider.from_file(key_file))
    keys.create_table()
    person = _model(keys)
    person.metadata.create_all(engine)
    with engine.begin() as conn:
        conn.execute(insert(person), [{"id": i, "name": f"n{i}", "ssn": f"s{i}"} for i in IDS])
    return key_file


def _cold(engine: Engine, key_file: Path) -> type:
    """A fresh manager and model: nothing cached, as in a fresh process."""
    return _model(KeyManager(engine, LocalKeyProvider.from_file(key_file)))


def test_orm_yield_per_returns_every_row_with_a_cold_cache(engine: Engine, written: Path) -> None:
    person = _cold(engine, written)
    with Session(engine) as session:
        got = [(p.id, p.name, p.ssn) for p in session.scalars(select(person).execution_options(yield_per=500))]
    assert got == [(i, f"n{i}", f"s{i}") for i in IDS]


def test_core_stream_results_returns_every_row_with_a_cold_cache(engine: Engine, written: Path) -> None:
    person = _cold(engine, written)
    with engine.connect() as conn:
        result = conn.execution_options(stream_results=True, max_row_buffer=100).execute(
            select(person.__table__.c.id, person.__table__.c.name).order_by(person.__table__.c.id)
        )
        got = list(result)
    assert [tuple(r) for r in got] == [(i, f"n{i}") for i in IDS]
