"""Search indexes under a KeyManager bound to several engines (``KeyManager(None, provider)``).

Each database keeps its own blind-index key and its own tokens, written in
the row's transaction; a lookup, a candidate expression built once and run
on each engine, and ``verify_index`` use the key of the database the
statement runs on, never another's; a statement on an engine the manager is
not bound to is refused with the library's ConfigurationError and writes
nothing. Two databases of one backend, the three backends at once, and
async engines.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import os
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, insert, select
from sqlalchemy.engine import Engine, create_engine, make_url
from sqlalchemy.ext.asyncio import AsyncSession, create_async_engine
from sqlalchemy.orm import Session

from sa_envelope import ConfigurationError, KeyManager, LocalKeyProvider, lookup
from sa_envelope.keys import table as kt
from support.databases import second_database
from support.search import case_sensitive_like, rows, search_models, twin_ids

NEEDLES = {
    "startswith": ["A", "Ad", "Ada", "Émile", "李", "O'", "Ana_", "50%", "Zz"],
    "contains": ["pen", "penicillin", "cillin", "asthma", " ß ", "日本 a", "lin pen", "qqq"],
    "between": [
        (dt.date(1900, 1, 1), dt.date(1950, 1, 1)),
        (dt.date(1999, 12, 31), dt.date(2001, 1, 1)),
        (dt.date(1850, 1, 1), dt.date(1850, 3, 31)),
    ],
}
ATTRIBUTE = {"startswith": "name", "contains": "notes", "between": "born"}


@pytest.fixture
def engine_b(db_url: str, tmp_path: Path) -> Iterator[Engine]:
    """An engine on a second database of the same backend (dropped after)."""
    with second_database(db_url, tmp_path) as url:
        eng = create_engine(url)
        try:
            yield eng
        finally:
            eng.dispose()


def _setup(keys: KeyManager, engines: list[Engine], count: int = 300) -> tuple[Any, Any]:
    """Bind, create and fill each engine with different rows (seeded per engine)."""
    Patient, twin = search_models(keys)
    for n, eng in enumerate(engines):
        keys.bind(eng)
        keys.create_table(engine=eng)
        Patient.metadata.create_all(eng)
        data = rows(count + 50 * n, seed=7 + n)
        with eng.begin() as conn:
            conn.execute(insert(Patient.__table__), data)
            conn.execute(insert(twin), data)
    return Patient, twin


def _assert_like_twin(eng: Engine, Patient: Any, twin: Any) -> None:
    with Session(eng) as session, eng.connect() as plain:
        case_sensitive_like(plain)
        for kind, needles in NEEDLES.items():
            for needle in needles:
                found = {p.id for p in lookup(session, getattr(Patient, ATTRIBUTE[kind]), **{kind: needle})}
                assert found == twin_ids(plain, twin, **{kind: needle}), (eng.dialect.name, kind, needle)


def _blind_keys(eng: Engine, keys: KeyManager) -> list[int]:
    t = keys.table
    with eng.connect() as conn:
        return list(conn.execute(select(t.c.id).where(t.c.scope == kt.SCOPE_BLIND_INDEX)).scalars())


def _tokens(eng: Engine, keys: KeyManager, row_key: str, name: str) -> set[int]:
    t = keys.search_table
    with eng.connect() as conn:
        return set(conn.execute(select(t.c.token).where(t.c.row_key == row_key, t.c.name == name)).scalars())


def _check_per_engine(keys: KeyManager, engines: list[Engine], Patient: Any, twin: Any) -> None:
    """Exact lookups, one candidate statement for every engine, keys and tokens per database."""
    candidates = select(Patient.id).where(Patient.name.matches_prefix("Ad"))  # built once
    for eng in engines:
        _assert_like_twin(eng, Patient, twin)
        with eng.connect() as conn:
            case_sensitive_like(conn)
            found = set(conn.execute(candidates).scalars())
            assert twin_ids(conn, twin, startswith="Ad") <= found
        assert [r.ok for r in keys.verify_index(Patient.__table__, engine=eng)] == [True, True, True]
        assert len(_blind_keys(eng, keys)) == 1
    for eng in engines:  # one value in every database: its tokens differ (a key per database)
        with Session(eng) as session:
            session.add(Patient(id=10_000, name="Same Name"))
            session.commit()
    tokens = [_tokens(eng, keys, "10000", "name/prefix") for eng in engines]
    assert all(tokens) and len({frozenset(t) for t in tokens}) == len(engines)
    with pytest.raises(ConfigurationError, match="pass engine="):
        keys.verify_index(Patient.__table__)


def test_two_databases_of_one_backend(engine: Engine, engine_b: Engine) -> None:
    keys = KeyManager(None, LocalKeyProvider(os.urandom(32)))
    Patient, twin = _setup(keys, [engine, engine_b])
    _check_per_engine(keys, [engine, engine_b], Patient, twin)
    with Session(engine_b) as session:  # ORM writes on one engine touch only its tokens
        patient = session.get(Patient, 1)
        patient.name = "Adalbert"
        session.delete(session.get(Patient, 2))
        session.commit()
    with Session(engine) as session:
        assert lookup(session, Patient.name, startswith="Adalbert") == []
        assert session.get(Patient, 2) is not None
    with Session(engine_b) as session:
        assert {p.id for p in lookup(session, Patient.name, startswith="Adalbert")} == {1}
    assert _tokens(engine_b, keys, "2", "notes/substring") == set()
    assert _tokens(engine, keys, "2", "name/prefix") or rows(2)[1]["name"] is None
    for eng in (engine, engine_b):
        assert all(r.ok for r in keys.verify_index(Patient.__table__, engine=eng))


def test_a_statement_on_an_unbound_engine_is_refused(engine: Engine, engine_b: Engine) -> None:
    keys = KeyManager(None, LocalKeyProvider(os.urandom(32)))
    Patient, twin = _setup(keys, [engine])
    Patient.metadata.create_all(engine_b)
    keys.table.create(engine_b)
    keys.search_table.create(engine_b)
    other = create_engine(engine_b.url)  # never bound
    try:
        name = other.url.render_as_string(hide_password=True)
        with other.connect() as conn, pytest.raises(ConfigurationError, match="not bound") as err:
            conn.execute(select(Patient.id).where(Patient.name.matches_prefix("Ad"))).all()
        assert name in str(err.value) and "keys.bind(engine)" in str(err.value)
        with Session(other) as session, pytest.raises(ConfigurationError, match="not bound"):
            lookup(session, Patient.notes, contains="penicillin")
        with other.begin() as conn, pytest.raises(ConfigurationError, match="not bound"):
            conn.execute(insert(Patient.__table__), [{"id": 1, "name": "Ada", "notes": "pen", "born": None}])
        with other.connect() as conn:
            for table in (Patient.__table__, keys.table, keys.search_table):
                assert conn.execute(select(func.count()).select_from(table)).scalar_one() == 0
    finally:
        other.dispose()
    _assert_like_twin(engine, Patient, twin)  # the bound one is unaffected


def test_one_manager_over_the_three_backends(server_backends: Any, tmp_path: Path) -> None:
    urls = [f"sqlite:///{tmp_path}/search.db", server_backends.url("postgresql"), server_backends.url("mysql")]
    with second_database(urls[1], tmp_path) as pg, second_database(urls[2], tmp_path) as my:
        engines = [create_engine(u) for u in (urls[0], pg, my)]
        try:
            keys = KeyManager(None, LocalKeyProvider(os.urandom(32)))
            Patient, twin = _setup(keys, engines, count=200)
            _check_per_engine(keys, engines, Patient, twin)
        finally:
            for eng in engines:
                eng.dispose()


ASYNC_DRIVERS = {"sqlite": "sqlite+aiosqlite", "postgresql": "postgresql+asyncpg"}


def _as_async(eng: Engine) -> str:
    url = make_url(eng.url.render_as_string(hide_password=False))
    return url.set(drivername=ASYNC_DRIVERS[url.get_backend_name()]).render_as_string(hide_password=False)


@pytest.mark.backends("sqlite", "postgresql")  # no async MariaDB driver in the test group
def test_async_engines(engine: Engine, engine_b: Engine) -> None:
    keys = KeyManager(None, LocalKeyProvider(os.urandom(32)))
    Patient, twin = search_models(keys)

    async def run() -> list[set[int]]:
        out = []
        aengines = [create_async_engine(_as_async(e)) for e in (engine, engine_b)]
        try:
            for n, aeng in enumerate(aengines):
                keys.bind(aeng)
                await keys.create_table_async(engine=aeng)
                async with aeng.begin() as conn:
                    await conn.run_sync(Patient.metadata.create_all)
                rng = random.Random(n)
                async with AsyncSession(aeng) as session:
                    names = ["Ada", "Adele", "Bob", "Adam"][: 3 + n]
                    session.add_all([Patient(id=i, name=f"{x} {rng.random():.3f}") for i, x in enumerate(names, 1)])
                    await session.commit()
                async with AsyncSession(aeng) as session:
                    found = await session.run_sync(lambda s: lookup(s, Patient.name, startswith="Ad"))
                    out.append({p.id for p in found})
                    stmt = select(Patient.id).where(Patient.name.matches_prefix("Bo"))
                    out.append(set((await session.execute(stmt)).scalars()))
        finally:
            for aeng in aengines:
                await aeng.dispose()
        return out

    ada_a, bob_a, ada_b, bob_b = asyncio.run(run())
    assert (ada_a, ada_b) == ({1, 2}, {1, 2, 4})
    assert 3 in bob_a and 3 in bob_b
    for eng in (engine, engine_b):
        keys.bind(eng)  # the sync engines on the same databases: their own bindings
        assert [r.ok for r in keys.verify_index(Patient.__table__, engine=eng)] == [True, True, True]
        assert len(_blind_keys(eng, keys)) == 1
