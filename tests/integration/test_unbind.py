"""``keys.unbind(engine)``: the engine is served no more, as if never bound.

What is checked, on every backend, sync and async: every event listener
``bind`` installed on the engine (and its pool) is gone, and only those
(another manager bound to the same engine keeps the listeners it shares);
the engine's plaintext table keys, row keys and the columns' read memos are
dropped; a statement on it then gets the ``ConfigurationError`` naming it
(password hidden) that an engine never bound gets, and writes nothing; the
other bound engines keep working; binding again serves it, stored values
included.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import JSON, LargeBinary, String, create_engine, event, func, insert, select, type_coerce
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.ext.asyncio import AsyncSession, create_async_engine
from sqlalchemy.orm import Mapped, Session, mapped_column

from sa_envelope import ConfigurationError, EncryptedType, KeyManager, LocalKeyProvider
from sa_envelope.columns import dualwrite, uniqueness
from sa_envelope.envelope import format as fmt
from support.backends import async_url
from support.databases import second_database
from support.models import new_base

PASSWORD = "s3cret-pw"


def make_model(keys: KeyManager) -> Any:
    class Patient(new_base()):
        __tablename__ = "patients"
        id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
        name: Mapped[str] = mapped_column(EncryptedType(String(100), keys))
        ssn: Mapped[str | None] = mapped_column(EncryptedType(String(11), keys, deterministic=True))
        notes: Mapped[dict | None] = mapped_column(EncryptedType(JSON, keys, scope="row"))

    return Patient


def with_password(url: str) -> str:
    """``url`` with a password on PostgreSQL (trust auth ignores it): errors must hide it."""
    parsed = make_url(url)
    if parsed.get_backend_name() == "postgresql":
        parsed = parsed.set(password=PASSWORD)
    return parsed.render_as_string(hide_password=False)


@pytest.fixture
def url_b(db_url: str, tmp_path: Path) -> Iterator[str]:
    with second_database(db_url, tmp_path) as url:
        yield with_password(url)


def listeners(engine: Engine) -> dict[str, list[Any]]:
    """Every listener the engine's and its pool's events call (class-level ones included)."""
    out: dict[str, list[Any]] = {}
    for prefix, dispatch in (("engine", engine.dispatch), ("pool", engine.pool.dispatch)):
        for name in dispatch._event_names:
            out[f"{prefix}.{name}"] = list(getattr(dispatch, name))
    return out


def never_bound_error(keys: KeyManager, url: str) -> str:
    """The error a statement on a fresh engine of ``url``, never bound, gets."""
    stranger = create_engine(url)
    try:
        with Session(stranger) as session:
            session.add(make_model(keys)(id=99, name="x"))  # a model of its own: same table, same error
            with pytest.raises(ConfigurationError) as err:
                session.commit()
    finally:
        stranger.dispose()
    return str(err.value)


def counts(engine: Engine, keys: KeyManager, Patient: Any) -> tuple[int, int]:
    with engine.connect() as conn:
        rows = conn.execute(select(func.count()).select_from(Patient.__table__)).scalar_one()
        key_rows = conn.execute(select(func.count()).select_from(keys.table)).scalar_one()
    return rows, key_rows


def write(engine: Engine, Patient: Any, pk: int, name: str) -> None:
    with Session(engine) as session:
        session.add(Patient(id=pk, name=name, ssn="123-45-6789", notes={"who": name}))
        session.commit()


def read(engine: Engine, Patient: Any) -> list[tuple[Any, ...]]:
    with Session(engine) as session:
        found = session.scalars(select(Patient).where(Patient.ssn == "123-45-6789").order_by(Patient.id))
        return [(p.id, p.name, p.notes) for p in found]


def test_unbind_removes_listeners_keys_and_service(engine: Engine, url_b: str) -> None:
    keys = KeyManager(None, LocalKeyProvider(os.urandom(32)))
    Patient = make_model(keys)
    engine_b = create_engine(url_b)
    try:
        keys.bind(engine)  # the first bind installs the class-level listeners (every engine's)
        before = listeners(engine_b)
        for eng in (engine, engine_b):
            keys.bind(eng)
            keys.create_table(engine=eng)
            Patient.metadata.create_all(eng)
            write(eng, Patient, 1, f"p {eng.dialect.name}")
        assert listeners(engine_b) != before
        binding = keys.engines.select(engine_b)
        vias = [Patient.__table__.c[c].type._vias for c in ("name", "ssn", "notes")]
        assert read(engine_b, Patient) == [(1, f"p {engine_b.dialect.name}", {"who": f"p {engine_b.dialect.name}"})]
        assert len(binding.store.cache) and len(binding.rows.cache) and all(binding in v for v in vias)
        memo = vias[0][binding].memo
        assert memo  # the read memo holds an opener of B's table key

        assert keys.unbind(engine_b) is engine_b
        assert listeners(engine_b) == before  # every listener bind installed, and only those, is gone
        assert len(keys.engines) == 1 and keys.engine is engine
        assert len(binding.store.cache) == 0 and len(binding.rows.cache) == 0 and not memo
        assert all(binding not in v for v in vias)
        assert keys.stats()["cached_keys"] == sum(len(b.store.cache) for b in keys.engines)

        rows_b = counts(engine_b, keys, Patient)
        expected = never_bound_error(keys, url_b)
        name = engine_b.url.render_as_string(hide_password=True)
        with Session(engine_b) as session:
            session.add(Patient(id=2, name="Eve", notes={"x": 1}))
            with pytest.raises(ConfigurationError) as err:
                session.commit()
        assert str(err.value) == expected and name in expected and PASSWORD not in expected
        with engine_b.begin() as conn, pytest.raises(ConfigurationError, match="not bound"):
            conn.execute(insert(Patient.__table__), [{"id": 3, "name": "Eve", "notes": {"x": 1}}])
        with Session(engine_b) as session, pytest.raises(ConfigurationError, match="not bound"):
            session.execute(select(Patient.name)).all()  # stored values are not opened either
        assert counts(engine_b, keys, Patient) == rows_b  # nothing written, no key made

        write(engine, Patient, 2, "still served")  # the other engine keeps working
        assert [r[1] for r in read(engine, Patient)] == [f"p {engine.dialect.name}", "still served"]

        keys.bind(engine_b)  # bound again: its keys come back from its own key table
        write(engine_b, Patient, 2, "again")
        assert [r[1] for r in read(engine_b, Patient)] == [f"p {engine_b.dialect.name}", "again"]
        assert keys.unbind(engine_b) is engine_b and keys.unbind(engine_b) is engine_b  # idempotent
    finally:
        engine_b.dispose()


def test_unbinding_the_last_engine_is_never_having_bound(engine: Engine) -> None:
    keys = KeyManager(engine, LocalKeyProvider(os.urandom(32)))
    keys.create_table()
    Patient = make_model(keys)
    Patient.metadata.create_all(engine)
    write(engine, Patient, 1, "Ada")
    keys.unbind(engine)
    with Session(engine) as session:
        session.add(Patient(id=2, name="Bea"))
        with pytest.raises(ConfigurationError) as err:
            session.commit()
    assert str(err.value) == "this KeyManager is bound to no engine: call keys.bind(engine) first"
    with pytest.raises(ConfigurationError, match="bound to no engine"):
        keys.warm()
    keys.bind(engine)
    assert read(engine, Patient) == [(1, "Ada", {"who": "Ada"})]


def test_shared_listeners_stay_while_another_manager_is_bound(engine: Engine) -> None:
    """Two managers on one engine share the dual-write and uniqueness hooks:
    unbinding one keeps them for the other; unbinding both removes them."""
    first = KeyManager(engine, LocalKeyProvider(os.urandom(32)))
    second = KeyManager(engine, LocalKeyProvider(os.urandom(32)))
    shared = (("before_execute", dualwrite.rewrite), ("after_execute", uniqueness._check))
    assert all(event.contains(engine, n, fn) for n, fn in shared)
    first.unbind(engine)
    assert all(event.contains(engine, n, fn) for n, fn in shared)
    second.create_table()
    Patient = make_model(second)
    Patient.metadata.create_all(engine)
    write(engine, Patient, 1, "Ada")
    assert read(engine, Patient) == [(1, "Ada", {"who": "Ada"})]
    second.unbind(engine)
    assert not any(event.contains(engine, n, fn) for n, fn in shared)


def test_async_engines_unbind(engine: Engine, url_b: str) -> None:
    """aiosqlite, asyncpg, asyncmy: an AsyncEngine unbinds as its sync engine does."""
    keys = KeyManager(None, LocalKeyProvider(os.urandom(32)))
    Patient = make_model(keys)
    url_a = engine.url.render_as_string(hide_password=False)

    async def refused(aeng: Any, model: Any) -> str:
        async with AsyncSession(aeng) as session:
            session.add(model(id=2, name="Eve"))
            with pytest.raises(ConfigurationError) as err:
                await session.commit()
        return str(err.value)

    async def run() -> list[Any]:
        engines = [create_async_engine(async_url(u)) for u in (url_a, url_b)]
        out: list[Any] = []
        try:
            keys.bind(engines[0])  # the class-level listeners are installed by the first bind
            before = listeners(engines[1].sync_engine)
            for i, aeng in enumerate(engines):
                keys.bind(aeng)
                await keys.create_table_async(engine=aeng)
                async with aeng.begin() as conn:
                    await conn.run_sync(Patient.metadata.create_all)
                async with AsyncSession(aeng) as session:
                    session.add(Patient(id=1, name=f"p{i}", notes={"i": i}))
                    await session.commit()
            stranger = create_async_engine(async_url(url_b))  # never bound
            out.insert(0, await refused(stranger, make_model(keys)))
            await stranger.dispose()
            binding = keys.engines.select(engines[1])
            assert keys.unbind(engines[1]) is engines[1]
            out.append(listeners(engines[1].sync_engine) == before)
            out.append((len(binding.store.cache), len(binding.rows.cache)))
            out.append(await refused(engines[1], Patient))
            async with AsyncSession(engines[0]) as session:  # the other engine keeps working
                session.add(Patient(id=2, name="a2"))
                await session.commit()
                out.append(sorted((await session.scalars(select(Patient.name))).all()))
            keys.bind(engines[1])
            async with AsyncSession(engines[1]) as session:
                out.append((await session.get(Patient, 1)).notes)
        finally:
            for aeng in engines:
                await aeng.dispose()
        return out

    expected, *got = asyncio.run(run())
    assert got == [True, (0, 0), expected, ["a2", "p0"], {"i": 1}]
    name = make_url(async_url(url_b)).render_as_string(hide_password=True)
    assert name in expected and PASSWORD not in expected
    check = create_engine(url_b)
    try:
        with check.connect() as conn:  # B holds its one row, sealed under a key of its own table
            raw = conn.execute(select(type_coerce(Patient.__table__.c.name, LargeBinary()))).scalars().all()
            ids = set(conn.execute(select(keys.table.c.id)).scalars())
        assert len(raw) == 1 and fmt.key_id_of(bytes(raw[0])) in ids
    finally:
        check.dispose()


def test_a_statement_compiled_before_unbind_is_refused(engine: Engine) -> None:
    """A compiled cache of the application's own keeps processors built for
    the binding: with its keys dropped, they refuse as a statement on an
    engine never bound does, reads and writes alike."""
    keys = KeyManager(engine, LocalKeyProvider(os.urandom(32)))
    keys.create_table()
    Patient = make_model(keys)
    Patient.metadata.create_all(engine)
    t, cache = Patient.__table__, {}  # type: ignore[var-annotated]
    with engine.begin() as conn:
        conn.execution_options(compiled_cache=cache).execute(insert(t), {"id": 1, "name": "Ada", "ssn": "1"})
        conn.execution_options(compiled_cache=cache).execute(select(t.c.name, t.c.ssn)).all()
    keys.unbind(engine)
    expected = "this KeyManager is bound to no engine: call keys.bind(engine) first"
    with engine.begin() as conn, pytest.raises(ConfigurationError) as err:
        conn.execution_options(compiled_cache=cache).execute(insert(t), {"id": 2, "name": "Bea", "ssn": "2"})
    assert str(err.value) == expected
    with engine.connect() as conn, pytest.raises(ConfigurationError) as err:
        conn.execution_options(compiled_cache=cache).execute(select(t.c.name, t.c.ssn)).all()
    assert str(err.value) == expected
    assert counts(engine, keys, Patient)[0] == 1
