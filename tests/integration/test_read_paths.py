"""Every way SQLAlchemy reads a row decrypts it, on every backend (async on
aiosqlite, asyncpg and asyncmy), for table-scoped, deterministic and row-scoped columns.

The rows are written once through the ORM; each case reads them back through
one path, in a fresh manager (a cold key cache, as in a new process) and
must return exactly what was written.
"""

from __future__ import annotations

import asyncio
from typing import Any, Callable

import pytest
from sqlalchemy import JSON, ForeignKey, Integer, String, select
from sqlalchemy.engine import Engine
from sqlalchemy.ext.asyncio import AsyncSession, create_async_engine
from sqlalchemy.orm import Mapped, Session, joinedload, mapped_column, relationship, selectinload, subqueryload

from sa_envelope import EncryptedType, KeyManager, LocalKeyProvider
from support.backends import async_url
from support.models import new_base
from support.paths import ROWS, rows_as_dicts

PROVIDER = LocalKeyProvider(b"\x05" * 32)


def make_models(keys: KeyManager) -> tuple[Any, Any]:
    Base = new_base()

    class Owner(Base):
        __tablename__ = "owners"
        id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
        name: Mapped[str] = mapped_column(EncryptedType(String(50), keys, scope="row"))
        items: Mapped[list[Item]] = relationship(back_populates="owner", order_by="Item.id")

    class Item(Base):
        __tablename__ = "items"
        id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
        owner_id: Mapped[int] = mapped_column(ForeignKey("owners.id"))
        tbl: Mapped[str | None] = mapped_column(EncryptedType(String(100), keys))
        det: Mapped[str | None] = mapped_column(EncryptedType(String(20), keys, deterministic=True))
        row: Mapped[dict[str, Any] | None] = mapped_column(EncryptedType(JSON, keys, scope="row"))
        owner: Mapped[Owner] = relationship(back_populates="items")

    return Owner, Item


def stored(engine: Engine) -> None:
    keys = KeyManager(engine, PROVIDER)
    keys.create_table()
    Owner, Item = make_models(keys)
    Owner.metadata.create_all(engine)
    with Session(engine) as s:
        s.add_all([Owner(id=1, name="Ada's"), Owner(id=2, name="Others")])
        s.add_all([Item(owner_id=1 if r["id"] == 1 else 2, **r) for r in rows_as_dicts()])
        s.commit()


def reader(engine: Engine) -> tuple[Any, Any]:
    """Models on a new manager: nothing cached."""
    return make_models(KeyManager(engine, PROVIDER))


def as_tuples(items: Any) -> list[tuple[Any, ...]]:
    return [(i.id, i.tbl, i.det, i.row) for i in items]


def core_select(engine: Engine, Owner: Any, Item: Any) -> list[tuple[Any, ...]]:
    t = Item.__table__
    with engine.connect() as conn:
        return [tuple(r) for r in conn.execute(select(t.c.id, t.c.tbl, t.c.det, t.c.row).order_by(t.c.id))]


def core_mappings(engine: Engine, Owner: Any, Item: Any) -> list[tuple[Any, ...]]:
    t = Item.__table__
    with engine.connect() as conn:
        rows = conn.execute(select(t).order_by(t.c.id)).mappings().all()
    return [(m["id"], m["tbl"], m["det"], m["row"]) for m in rows]


def core_stream_results(engine: Engine, Owner: Any, Item: Any) -> list[tuple[Any, ...]]:
    t = Item.__table__
    with engine.connect() as conn:
        result = conn.execution_options(stream_results=True).execute(select(t.c.id, t.c.tbl, t.c.det, t.c.row).order_by(t.c.id))
        return [tuple(r) for r in result]


def orm_select(engine: Engine, Owner: Any, Item: Any) -> list[tuple[Any, ...]]:
    with Session(engine) as s:
        return as_tuples(s.scalars(select(Item).order_by(Item.id)))


def orm_get(engine: Engine, Owner: Any, Item: Any) -> list[tuple[Any, ...]]:
    with Session(engine) as s:
        return as_tuples(s.get(Item, r[0]) for r in ROWS)


def orm_mappings(engine: Engine, Owner: Any, Item: Any) -> list[tuple[Any, ...]]:
    with Session(engine) as s:
        rows = s.execute(select(Item.id, Item.tbl, Item.det, Item.row).order_by(Item.id)).mappings().all()
    return [(m["id"], m["tbl"], m["det"], m["row"]) for m in rows]


def orm_filter_deterministic(engine: Engine, Owner: Any, Item: Any) -> list[tuple[Any, ...]]:
    with Session(engine) as s:
        found = as_tuples(s.scalars(select(Item).where(Item.det == ROWS[0][2])))
        assert sorted(i for i, *_ in found) == [1, 3]  # rows 1 and 3 share a deterministic value
        return sorted(found + as_tuples(s.scalars(select(Item).where(Item.det == ROWS[1][2]))))


def orm_yield_per(engine: Engine, Owner: Any, Item: Any) -> list[tuple[Any, ...]]:
    with Session(engine) as s:
        return as_tuples(s.scalars(select(Item).order_by(Item.id).execution_options(yield_per=2)))


def _eager(option: Callable[[Any], Any]) -> Callable[[Engine, Any, Any], list[tuple[Any, ...]]]:
    def read(engine: Engine, Owner: Any, Item: Any) -> list[tuple[Any, ...]]:
        with Session(engine) as s:
            owners = s.scalars(select(Owner).options(option(Owner.items)).order_by(Owner.id)).unique().all()
            assert [o.name for o in owners] == ["Ada's", "Others"]
            s.expunge_all()  # loaded by the eager load, not lazily afterwards
        return as_tuples(i for o in owners for i in o.items)

    read.__name__ = f"eager_{option.__name__}"
    return read


def orm_many_to_one(engine: Engine, Owner: Any, Item: Any) -> list[tuple[Any, ...]]:
    with Session(engine) as s:
        items = s.scalars(select(Item).options(joinedload(Item.owner)).order_by(Item.id)).all()
        assert [i.owner.name for i in items] == ["Ada's", "Others", "Others"]
        return as_tuples(items)


READS = [
    core_select,
    core_mappings,
    core_stream_results,
    orm_select,
    orm_get,
    orm_mappings,
    orm_filter_deterministic,
    orm_yield_per,
    _eager(joinedload),
    _eager(selectinload),
    _eager(subqueryload),
    orm_many_to_one,
]


@pytest.mark.parametrize("read", READS, ids=[r.__name__ for r in READS])
def test_read_paths_decrypt(engine: Engine, read: Callable[..., list[tuple[Any, ...]]]) -> None:
    stored(engine)
    Owner, Item = reader(engine)
    assert read(engine, Owner, Item) == ROWS


def test_async_reads_and_writes(engine: Engine, db_url: str) -> None:
    """AsyncSession and AsyncConnection: add (row keys made in the flush), Core
    insert (row keys made by the Core hook), get, stream, stream_scalars."""
    url = async_url(db_url)

    async def main() -> list[list[tuple[Any, ...]]]:
        aengine = create_async_engine(url)
        keys = KeyManager(aengine, PROVIDER)
        await keys.create_table_async()
        Owner, Item = make_models(keys)
        async with aengine.begin() as conn:
            await conn.run_sync(Owner.metadata.create_all)
        try:
            async with AsyncSession(aengine) as s:
                s.add_all([Owner(id=1, name="Ada's"), Owner(id=2, name="Others")])
                s.add(Item(owner_id=1, **rows_as_dicts()[0]))
                await s.commit()
            async with aengine.begin() as conn:
                await conn.execute(Item.__table__.insert(), [{"owner_id": 2, **r} for r in rows_as_dicts()[1:]])
            out = []
            async with AsyncSession(aengine) as s:
                out.append(as_tuples([await s.get(Item, r[0]) for r in ROWS]))
                out.append(as_tuples([i async for i in await s.stream_scalars(select(Item).order_by(Item.id))]))
                stream = await s.stream(select(Item.id, Item.tbl, Item.det, Item.row).order_by(Item.id))
                out.append([tuple(r) async for r in stream])
            async with aengine.connect() as conn:
                t = Item.__table__
                stream = await conn.stream(select(t.c.id, t.c.tbl, t.c.det, t.c.row).order_by(t.c.id))
                out.append([tuple(r) async for r in stream])
            return out
        finally:
            await aengine.dispose()

    for got in asyncio.run(main()):
        assert got == ROWS
