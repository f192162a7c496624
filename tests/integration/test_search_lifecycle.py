"""Search indexes over their lifetime: the index key never rolls over with
the table key, a row-scoped column can be indexed, an index added to a table
that has rows is backfilled by verify_index(fix=True), and AsyncSession
writes and finds through the same hooks."""

from __future__ import annotations

import asyncio
import datetime as dt
from typing import Any

from alembic.autogenerate import produce_migrations
from alembic.migration import MigrationContext
from alembic.operations import Operations
from sqlalchemy import Date, Integer, String, inspect, select
from sqlalchemy.engine import Engine
from sqlalchemy.ext.asyncio import AsyncSession, create_async_engine
from sqlalchemy.orm import Mapped, Session, mapped_column

import pytest

from sa_envelope import (
    EncryptedType,
    KeyManager,
    LocalKeyProvider,
    PrefixIndex,
    RangeIndex,
    RolloverPolicy,
    SubstringIndex,
    lookup,
)
from support.models import new_base


def _model(keys: KeyManager, *, indexed: bool = True, scope: str = "table") -> Any:
    class Note(new_base()):
        __tablename__ = "life_notes"
        id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
        body: Mapped[str | None] = mapped_column(EncryptedType(String(200), keys, scope=scope))
        day: Mapped[dt.date | None] = mapped_column(EncryptedType(Date, keys))
        __table_args__ = (SubstringIndex("body", keys), RangeIndex("day", keys)) if indexed else ()

    return Note


def test_the_index_key_does_not_roll_over_with_the_table_key(engine: Engine, tmp_path: Any) -> None:
    keys = KeyManager(engine, LocalKeyProvider(b"k" * 32), rollover=RolloverPolicy(max_encryptions=3))
    keys.create_table()
    Note = _model(keys)
    Note.metadata.create_all(engine)
    for i in range(12):  # the table key rolls over every 3 values
        with Session(engine) as session:
            session.add(Note(id=i, body=f"entry {i} penicillin", day=dt.date(2000, 1, 1 + i)))
            session.commit()
    with engine.connect() as conn:
        scopes = [r.scope for r in conn.execute(select(keys.table).where(keys.table.c.owner_table == "life_notes"))]
    assert scopes.count("table") > 1 and scopes.count("blind-index") == 1
    with Session(engine) as session:
        assert {n.id for n in lookup(session, Note.body, contains="penicillin")} == set(range(12))
        assert {n.id for n in lookup(session, Note.day, between=(dt.date(2000, 1, 3), dt.date(2000, 1, 5)))} == {
            2,
            3,
            4,
        }


def test_a_row_scoped_column_can_be_indexed(engine: Engine, local_keys: KeyManager) -> None:
    Note = _model(local_keys, scope="row")
    Note.metadata.create_all(engine)
    with Session(engine) as session:
        session.add_all([Note(id=1, body="aspirin daily"), Note(id=2, body="penicillin")])
        session.commit()
        assert [n.id for n in lookup(session, Note.body, contains="aspirin")] == [1]
        local_keys.shred(session.get(Note, 1))
        session.commit()
        session.expire_all()
        assert lookup(session, Note.body, contains="aspirin") == []  # shredded: nothing to match
    assert all(r.rows == 2 for r in local_keys.verify_index(Note.__table__))


def test_an_index_added_later_is_backfilled(engine: Engine, local_keys: KeyManager) -> None:
    Plain = _model(local_keys, indexed=False)
    Plain.metadata.create_all(engine)
    with Session(engine) as session:
        session.add_all([Plain(id=i, body=f"note {i}", day=dt.date(1990, 1 + i % 12, 1)) for i in range(30)])
        session.commit()
    Note = _model(local_keys)  # the same table, now with its indexes (a new deployment)
    _autogenerate_and_upgrade(engine, Note.metadata)  # PostgreSQL: the token arrays and their GIN indexes
    with Session(engine) as session:
        assert lookup(session, Note.body, contains="note 1") == []  # no tokens yet: a miss, not an error
        reports = local_keys.verify_index(Note.__table__)
        assert [r.rows_differing for r in reports] == [30, 30]
        session.rollback()  # a new snapshot (MariaDB reads repeatably) for what verify writes
        local_keys.verify_index(Note.__table__, fix=True, batch_size=7)
        assert all(r.ok for r in local_keys.verify_index(Note.__table__))
        assert sorted(n.id for n in lookup(session, Note.body, contains="note 1")) == [1, *range(10, 20)]


def _autogenerate_and_upgrade(engine: Engine, metadata: Any) -> None:
    """Run what Alembic autogenerate finds between ``metadata`` and the database."""
    with engine.begin() as conn:
        only = {"include_name": lambda name, kind, parent: kind != "table" or name in metadata.tables}
        context = MigrationContext.configure(conn, opts={"target_metadata": metadata, **only})
        found = produce_migrations(context, metadata).upgrade_ops
        assert found is not None
        operations = Operations(context)
        for op in found.ops:
            for each in getattr(op, "ops", [op]):
                operations.invoke(each)
    if engine.dialect.name == "postgresql":
        columns = {c["name"]: c["type"] for c in inspect(engine).get_columns("life_notes")}
        assert repr(columns["body_substring_tokens"]) == "ARRAY(BIGINT())"
        indexes = {i["name"]: i for i in inspect(engine).get_indexes("life_notes")}
        assert indexes["ix_life_notes_body_substring_tokens"]["dialect_options"]["postgresql_using"] == "gin"


@pytest.mark.backends("sqlite")
def test_async_sessions_write_and_find(db_url: str) -> None:
    async def run() -> list[str]:
        engine = create_async_engine(db_url.replace("sqlite://", "sqlite+aiosqlite://"))
        keys = KeyManager(engine, LocalKeyProvider(b"a" * 32))
        await keys.create_table_async()
        Base = new_base()

        class Person(Base):
            __tablename__ = "life_people"
            id: Mapped[int] = mapped_column(Integer, primary_key=True)
            name: Mapped[str] = mapped_column(EncryptedType(String(100), keys))
            __table_args__ = (PrefixIndex("name", keys),)

        async with engine.begin() as conn:
            await conn.run_sync(Base.metadata.create_all)
        async with AsyncSession(engine) as session:
            session.add_all([Person(name="Ada"), Person(name="Adele"), Person(name="Bob")])
            await session.commit()
            found = await session.run_sync(lambda s: lookup(s, Person.name, startswith="Ad"))
            names = sorted(p.name for p in found)
        await engine.dispose()
        return names

    assert asyncio.run(run()) == ["Ada", "Adele"]
