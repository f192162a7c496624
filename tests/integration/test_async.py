"""AsyncSession with aiosqlite, asyncpg and asyncmy: encrypted columns, queries, warming,
and a key-provider call that does not stall the event loop."""

from __future__ import annotations

import asyncio
import os
import threading
from typing import Any

import pytest
from sqlalchemy import String, select
from sqlalchemy.engine import Engine
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, create_async_engine
from sqlalchemy.orm import Mapped, mapped_column

from sa_envelope import (
    AwsKmsProvider,
    BlindIndexType,
    EncryptedType,
    KeyManager,
    LocalKeyProvider,
    UnsupportedQueryError,
    lookup,
    normalize_email,
)
from sa_envelope.providers.base import Context
from support.backends import async_url
from support.models import new_base


def make_model(keys: KeyManager) -> type:
    Base = new_base()

    class Patient(Base):
        __tablename__ = "patients"
        id: Mapped[int] = mapped_column(primary_key=True)
        name: Mapped[str] = mapped_column(EncryptedType(String(100), keys))
        ssn: Mapped[str | None] = mapped_column(EncryptedType(String(11), keys, deterministic=True), index=True)
        email: Mapped[str | None] = mapped_column(EncryptedType(String(100), keys))
        email_index: Mapped[bytes | None] = mapped_column(
            BlindIndexType("email", keys, normalizer=normalize_email, bits=16)
        )

    return Patient


ROWS = [
    ("Ada", "123-45-6789", "Ada@Example.com"),
    ("Alan", "987-65-4321", "alan@example.com"),
    ("Grace", "123-45-6789", None),
    ("Émile", None, "EMILE@example.com"),
]


async def create_patients(engine: AsyncEngine, keys: KeyManager) -> type:
    """Create the key table and ``patients`` with ``ROWS``; returns the Patient model."""
    Patient = make_model(keys)
    await keys.create_table_async()
    async with engine.begin() as conn:
        await conn.run_sync(Patient.metadata.create_all)
    async with AsyncSession(engine) as session:
        session.add_all(Patient(name=n, ssn=s, email=e) for n, s, e in ROWS)
        await session.commit()
    return Patient


@pytest.fixture
def aengine(engine: Engine, db_url: str) -> Any:
    """The async engine; ``engine`` (sync) is requested so its teardown empties the database."""
    return create_async_engine(async_url(db_url))


def test_async_round_trip_with_deterministic_filter(aengine: AsyncEngine) -> None:
    async def main() -> None:
        keys = KeyManager(aengine, LocalKeyProvider(os.urandom(32)))
        Patient = await create_patients(aengine, keys)
        async with AsyncSession(aengine) as session:
            found = (await session.scalars(select(Patient).where(Patient.ssn == "123-45-6789"))).all()
            assert sorted(p.name for p in found) == ["Ada", "Grace"]
            assert (await session.scalars(select(Patient.name).filter_by(ssn="987-65-4321"))).one() == "Alan"
            names = (await session.scalars(select(Patient.name).where(Patient.ssn.in_(["987-65-4321", "x"])))).all()
            assert names == ["Alan"]
            assert (await session.scalars(select(Patient.name).where(Patient.ssn.is_(None)))).all() == ["Émile"]
            hits = await session.run_sync(lambda s: lookup(s, Patient.email, "emile@EXAMPLE.com"))
            assert [p.name for p in hits] == ["Émile"]
            with pytest.raises(UnsupportedQueryError, match="patients.ssn"):
                await session.execute(select(Patient).order_by(Patient.ssn))
            (await session.scalars(select(Patient).where(Patient.name.is_not(None)))).all()[0].ssn = "000-00-0000"
            await session.commit()
            assert len((await session.scalars(select(Patient).where(Patient.ssn == "000-00-0000"))).all()) == 1
        await aengine.dispose()

    asyncio.run(main())


class GatedProvider(LocalKeyProvider):
    """Unwraps only once another task has run on the event loop.

    ``unwrap`` announces itself and then waits for ``release``, which a
    separate asyncio task sets. If the provider call ran on the event loop
    thread, that task could never run: the wait times out and the test fails
    (a deadlock guard, not a timing assertion).
    """

    def __init__(self, key: bytes) -> None:
        super().__init__(key)
        self.started = threading.Event()
        self.release = threading.Event()
        self.threads: set[int] = set()

    def unwrap(self, wrapped: bytes, context: Context, wrapping_key_id: str) -> bytes:
        self.threads.add(threading.get_ident())
        self.started.set()
        if not self.release.wait(timeout=20):
            raise AssertionError("the event loop did not run another task during the provider call")
        return super().unwrap(wrapped, context, wrapping_key_id)


def test_provider_call_does_not_stall_the_event_loop(aengine: AsyncEngine) -> None:
    master = os.urandom(32)

    async def main() -> None:
        writer = KeyManager(aengine, LocalKeyProvider(master))
        await create_patients(aengine, writer)
        gated = GatedProvider(master)
        reader = KeyManager(aengine, gated)  # a fresh process: empty cache
        Patient = make_model(reader)

        async def query() -> list[str]:
            async with AsyncSession(aengine) as session:
                return list(await session.scalars(select(Patient.name).where(Patient.ssn == "987-65-4321")))

        async def other_task() -> None:
            while not gated.started.is_set():
                await asyncio.sleep(0.005)
            gated.release.set()  # runs only if the loop is free while unwrap waits

        names, _ = await asyncio.gather(query(), other_task())
        assert names == ["Alan"]
        assert threading.get_ident() not in gated.threads  # never on the loop's thread
        await aengine.dispose()

    asyncio.run(main())


def test_warm_async_preloads_keys_from_kms(aengine: AsyncEngine, kms_client: Any, cmk: str) -> None:
    async def main() -> None:
        writer = KeyManager(aengine, AwsKmsProvider(cmk, client=kms_client))
        await create_patients(aengine, writer)
        kms_client.calls.clear()
        reader = KeyManager(aengine, AwsKmsProvider(cmk, client=kms_client))
        Patient = make_model(reader)
        loaded = await reader.warm_async(["patients"])
        assert loaded == 3  # table, deterministic and blind-index keys
        assert kms_client.calls["Decrypt"] == 3
        async with AsyncSession(aengine) as session:
            found = (await session.scalars(select(Patient).where(Patient.ssn == "123-45-6789"))).all()
            assert sorted(p.name for p in found) == ["Ada", "Grace"]
            session.add(Patient(name="New", ssn="111-11-1111", email="n@example.com"))
            await session.commit()  # writes under the warmed keys: no new key, no KMS call
        assert kms_client.calls["Decrypt"] == 3 and kms_client.calls["GenerateDataKey"] == 0
        assert reader.stats()["keys_created"] == 0
        await aengine.dispose()

    asyncio.run(main())


def make_notes(keys: KeyManager) -> type:
    """Autoincrement primary key, a table-scoped and a row-scoped column."""
    from sqlalchemy import JSON

    class Note(new_base()):
        __tablename__ = "items"
        id: Mapped[int] = mapped_column(primary_key=True)
        tbl: Mapped[str | None] = mapped_column(EncryptedType(String(100), keys))
        row: Mapped[dict[str, Any] | None] = mapped_column(EncryptedType(JSON, keys, scope="row"))

    return Note


@pytest.mark.parametrize(
    "path", ["orm", "executemany", "return_defaults", "return_defaults_many", "multi_values", "returning"]
)
def test_async_autoincrement_writes_bind_row_keys(aengine: AsyncEngine, engine: Engine, path: str) -> None:
    """The database makes the primary key, through asyncpg and aiosqlite: table-scoped
    values under the table key, each row-scoped value under a key bound to its row."""
    from sqlalchemy import insert

    from sqlalchemy import LargeBinary, column, table

    from support.paths import assert_bound

    rows = [{"tbl": f"table value {i}", "row": {"i": i, "text": "ünï ✓"}} for i in range(1, 4)]

    async def main() -> Any:
        keys = KeyManager(aengine, LocalKeyProvider(os.urandom(32)))
        Note = make_notes(keys)
        await keys.create_table_async()
        async with aengine.begin() as conn:
            await conn.run_sync(Note.metadata.create_all)
        t = Note.__table__
        if path == "orm":
            async with AsyncSession(aengine) as session:
                session.add_all(Note(**r) for r in rows)
                await session.commit()
        else:
            async with aengine.begin() as conn:
                if path == "executemany":
                    await conn.execute(insert(t), rows)
                elif path == "return_defaults":
                    for r in rows:
                        result = await conn.execute(insert(t).return_defaults(), r)
                        assert result.inserted_primary_key[0] is not None
                elif path == "return_defaults_many":
                    result = await conn.execute(insert(t).return_defaults(t.c.id), rows)
                    assert [tuple(pk) for pk in result.inserted_primary_key_rows] == [(1,), (2,), (3,)]
                elif path == "multi_values":
                    result = await conn.execute(insert(t).values(rows))
                    assert result.rowcount == 3
                else:
                    result = await conn.execute(insert(t).returning(t.c.row, t.c.tbl), rows)
                    assert [tuple(r) for r in result] == [(r["row"], r["tbl"]) for r in rows]
        async with AsyncSession(aengine) as session:
            got = [(n.id, n.tbl, n.row) for n in (await session.scalars(select(Note).order_by(Note.id))).all()]
        await aengine.dispose()
        return keys, got

    keys, got = asyncio.run(main())
    assert got == [(i, r["tbl"], r["row"]) for i, r in enumerate(rows, 1)]
    from sa_envelope.envelope import format as fmt

    raw = table("items", column("tbl", LargeBinary), column("row", LargeBinary))
    with engine.connect() as conn:
        stored = [(bytes(tbl), bytes(row)) for tbl, row in conn.execute(select(raw))]
        scopes = dict(conn.execute(select(keys.table.c.id, keys.table.c.scope)).all())
    assert len(stored) == 3
    for tbl, row in stored:
        assert scopes[fmt.read_header(tbl)[1]] == "table" and b"table value" not in tbl
        assert scopes[fmt.read_header(row)[1]] == "row"
    keys.bind(engine)
    assert sorted(assert_bound(engine, keys)) == [1, 2, 3]


@pytest.mark.backends("postgresql")
def test_psycopg_async_inserts_many_row_scoped_rows(engine: Engine, db_url: str) -> None:
    """psycopg's async dialect (``postgresql+psycopg_async``) names its driver
    ``psycopg`` too: from 100 new row keys in one statement the key rows went
    to the sync driver's COPY path, which failed with a TypeError on its
    AsyncCursor. They now take the executemany path; Core and ORM, read back."""
    from sqlalchemy import Integer, insert
    from sqlalchemy.engine import make_url

    url = make_url(db_url).set(drivername="postgresql+psycopg_async").render_as_string(hide_password=False)
    aengine = create_async_engine(url)

    async def main() -> None:
        keys = KeyManager(aengine, LocalKeyProvider(os.urandom(32)))
        Base = new_base()

        class Note(Base):
            __tablename__ = "async_row_notes"
            id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
            body: Mapped[str] = mapped_column(EncryptedType(String(60), keys, scope="row"))

        await keys.create_table_async()
        async with aengine.begin() as conn:
            await conn.run_sync(Base.metadata.create_all)
            await conn.execute(insert(Note.__table__), [{"id": i, "body": f"core {i}"} for i in range(150)])
        async with AsyncSession(aengine) as session:
            session.add_all(Note(id=i, body=f"orm {i}") for i in range(150, 300))
            await session.commit()
        async with AsyncSession(aengine) as session:
            bodies = {n.id: n.body for n in (await session.scalars(select(Note))).all()}
        assert bodies == {i: f"core {i}" if i < 150 else f"orm {i}" for i in range(300)}
        await aengine.dispose()

    asyncio.run(main())
