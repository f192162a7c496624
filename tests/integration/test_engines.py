"""Application shapes: ``KeyManager(None, provider)`` plus ``keys.bind(engine)``.

The rule under test: a value is sealed under a key stored in the same
database, in the same transaction, as its row, whatever number of engines
the manager serves; a statement on an engine it is not bound to is refused
by name and writes nothing; two databases may hold the same key id and are
never confused.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import (
    JSON,
    Column,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    bindparam,
    create_engine,
    func,
    insert,
    select,
    text,
    type_coerce,
)
from sqlalchemy.engine import Engine
from sqlalchemy.ext.asyncio import AsyncSession, create_async_engine
from sqlalchemy.orm import Mapped, Session, mapped_column

from sa_envelope import (
    BlindIndexType,
    ConfigurationError,
    DecryptionError,
    EncryptedType,
    KeyManager,
    LocalKeyProvider,
    lookup,
)
from sa_envelope.envelope import format as fmt
from sa_envelope.keys import table as kt
from support.backends import async_url
from support.databases import second_database
from support.models import new_base


def make_model(keys: KeyManager) -> Any:
    class Patient(new_base()):
        __tablename__ = "patients"
        id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
        name: Mapped[str] = mapped_column(EncryptedType(String(100), keys))
        ssn: Mapped[str | None] = mapped_column(EncryptedType(String(11), keys, deterministic=True))
        notes: Mapped[dict | None] = mapped_column(EncryptedType(JSON, keys, scope="row"))

    return Patient


@pytest.fixture
def engine_b(db_url: str, tmp_path: Path) -> Iterator[Engine]:
    """An engine on a second database of the same backend (dropped after)."""
    with second_database(db_url, tmp_path) as url:
        eng = create_engine(url)
        try:
            yield eng
        finally:
            eng.dispose()


def key_rows(engine: Engine, keys: KeyManager) -> list[tuple[int, str, str]]:
    """(id, owner, scope) of every key row in ``engine``'s database."""
    t = keys.table
    with engine.connect() as conn:
        return sorted((r.id, r.owner_table, r.scope) for r in conn.execute(select(t.c.id, t.c.owner_table, t.c.scope)))


def stored(engine: Engine, Patient: Any, column: str, pk: int) -> bytes:
    col = Patient.__table__.c[column]
    with engine.connect() as conn:
        return bytes(conn.execute(select(type_coerce(col, LargeBinary())).where(Patient.id == pk)).scalar_one())


def raw_update(column: str) -> Any:
    """``UPDATE patients SET <column> = :v WHERE id = :id`` as raw SQL (a database writer)."""
    sql = text(f"UPDATE patients SET {column} = :v WHERE id = :id")
    return sql.bindparams(bindparam("v", type_=LargeBinary()))


def two_databases(engine: Engine, engine_b: Engine) -> tuple[KeyManager, Any]:
    keys = KeyManager(None, LocalKeyProvider(os.urandom(32)))
    Patient = make_model(keys)
    for eng in (engine, engine_b):
        keys.bind(eng)
        keys.create_table(engine=eng)
        Patient.metadata.create_all(eng)
    return keys, Patient


def test_each_engine_writes_its_keys_in_its_own_database(engine: Engine, engine_b: Engine) -> None:
    keys, Patient = two_databases(engine, engine_b)
    for eng, name in ((engine, "Ada"), (engine_b, "Bea")):
        with Session(eng) as session:
            session.add(Patient(id=1, name=name, ssn="123-45-6789", notes={"who": name}))
            session.commit()
    rows_a, rows_b = key_rows(engine, keys), key_rows(engine_b, keys)
    scopes = {kt.SCOPE_TABLE, kt.SCOPE_DETERMINISTIC, kt.SCOPE_ROW}
    assert {s for _, _, s in rows_a} >= scopes and {s for _, _, s in rows_b} >= scopes
    for eng, rows in ((engine, rows_a), (engine_b, rows_b)):  # each value's key is in its own database
        ids = {i for i, _, _ in rows}
        for column in ("name", "ssn", "notes"):
            value = stored(eng, Patient, column, 1)
            assert value[0] in (fmt.VERSION_GCM, fmt.VERSION_SIV) and fmt.key_id_of(value) in ids
    for eng, name in ((engine, "Ada"), (engine_b, "Bea")):
        with Session(eng) as session:
            got = session.get(Patient, 1)
            assert (got.name, got.ssn, got.notes) == (name, "123-45-6789", {"who": name})
            found = session.scalars(select(Patient).where(Patient.ssn == "123-45-6789")).one()
            assert found.id == 1


def test_keys_roll_back_with_the_rows_of_their_engine(engine: Engine, engine_b: Engine) -> None:
    keys, Patient = two_databases(engine, engine_b)
    with Session(engine) as session:
        session.add(Patient(id=1, name="Ada", notes={"a": 1}))
        session.commit()
    before_a = key_rows(engine, keys)
    with Session(engine_b) as session:  # B's first write: its keys are made in B's transaction
        session.add(Patient(id=1, name="Bea", notes={"b": 1}))
        session.flush()
        session.rollback()
    assert key_rows(engine_b, keys) == [] and key_rows(engine, keys) == before_a
    with Session(engine_b) as session:
        session.add(Patient(id=2, name="Bea", notes={"b": 2}))
        session.commit()
    with Session(engine_b) as session:
        assert session.get(Patient, 2).notes == {"b": 2}
    assert key_rows(engine, keys) == before_a
    ids_b = {i for i, _, _ in key_rows(engine_b, keys)}
    assert fmt.key_id_of(stored(engine_b, Patient, "name", 2)) in ids_b


def test_same_key_id_in_two_databases_is_never_confused(engine: Engine, engine_b: Engine) -> None:
    """The first deterministic key of a table has a fixed id: both databases hold one, different keys."""
    keys, Patient = two_databases(engine, engine_b)
    for eng in (engine, engine_b):
        with Session(eng) as session:
            session.add_all([Patient(id=1, name="n", ssn="111-11-1111"), Patient(id=2, name="m", ssn="222-22-2222")])
            session.commit()
    a1, b1 = stored(engine, Patient, "ssn", 1), stored(engine_b, Patient, "ssn", 1)
    assert fmt.key_id_of(a1) == fmt.key_id_of(b1) and a1 != b1  # same key id, different keys
    for _ in range(2):  # cold caches, then warm ones (the per-column read memo)
        for eng in (engine, engine_b, engine):
            with Session(eng) as session:
                assert [p.ssn for p in session.scalars(select(Patient).order_by(Patient.id))] == [
                    "111-11-1111",
                    "222-22-2222",
                ]
    with engine_b.begin() as conn:  # a value copied from database A into database B (raw SQL)
        conn.execute(raw_update("ssn"), {"v": a1, "id": 2})
    with Session(engine_b) as session, pytest.raises(DecryptionError):
        session.execute(select(Patient.ssn).where(Patient.id == 2)).all()
    with Session(engine) as session:
        assert session.get(Patient, 1).ssn == "111-11-1111"


def _unbound_url(db_url: str, engine_b: Engine) -> str:
    """engine_b's database, with a password on PostgreSQL (trust auth ignores it)."""
    url = engine_b.url
    if url.get_backend_name() == "postgresql":
        url = url.set(password="s3cret-pw")
    return url.render_as_string(hide_password=False)


def test_a_session_on_an_unbound_engine_is_refused_by_name(engine: Engine, engine_b: Engine, db_url: str) -> None:
    keys = KeyManager(engine, LocalKeyProvider(os.urandom(32)))
    keys.create_table()
    Patient = make_model(keys)
    Patient.metadata.create_all(engine)
    with Session(engine) as session:
        session.add(Patient(id=1, name="Ada", notes={"a": 1}))
        session.commit()
    before = key_rows(engine, keys)
    other = create_engine(_unbound_url(db_url, engine_b))
    try:
        Patient.metadata.create_all(other)
        keys.table.create(other)  # so that a key written there would be seen
        name = other.url.render_as_string(hide_password=True)
        for obj in (Patient(id=5, name="Eve"), Patient(id=6, name="Eve", notes={"x": 1})):
            with Session(other) as session:
                session.add(obj)
                with pytest.raises(ConfigurationError) as err:
                    session.commit()
            assert name in str(err.value) and "keys.bind(engine)" in str(err.value)
            assert "s3cret-pw" not in str(err.value) and "\n" not in str(err.value)
        with other.begin() as conn, pytest.raises(ConfigurationError, match="not bound"):
            conn.execute(insert(Patient.__table__), [{"id": 7, "name": "Eve"}])
        with other.connect() as conn:
            assert conn.execute(select(func.count()).select_from(Patient.__table__)).scalar_one() == 0
            assert conn.execute(select(func.count()).select_from(keys.table)).scalar_one() == 0
        with other.begin() as conn:  # a stored value is not opened there either (raw SQL)
            sql = text("INSERT INTO patients (id, name) VALUES (:id, :v)")
            conn.execute(sql.bindparams(bindparam("v", type_=LargeBinary())), {"id": 8, "v": b"\x01" + bytes(40)})
        with Session(other) as session, pytest.raises(ConfigurationError, match="not bound"):
            session.execute(select(Patient.name)).all()
        assert key_rows(engine, keys) == before
        keys.bind(other)  # bound late: the processors built before serve it now
        with Session(other) as session:
            session.add(Patient(id=9, name="Eve", notes={"x": 1}))
            session.commit()
            assert session.get(Patient, 9).name == "Eve"
        assert len(key_rows(other, keys)) >= 2 and key_rows(engine, keys) == before
    finally:
        other.dispose()


def test_no_engine_bound_says_to_call_bind(engine: Engine) -> None:
    keys = KeyManager(None, LocalKeyProvider(os.urandom(32)))
    Patient = make_model(keys)
    Patient.metadata.create_all(engine)
    for attempt in (keys.create_table, keys.warm, lambda: keys.rotate_table_key("patients")):
        with pytest.raises(
            ConfigurationError, match=r"^this KeyManager is bound to no engine: call keys.bind\(engine\)"
        ):
            attempt()
    with Session(engine) as session:
        session.add(Patient(id=1, name="Ada"))
        with pytest.raises(ConfigurationError) as err:
            session.commit()
    assert str(err.value) == "this KeyManager is bound to no engine: call keys.bind(engine) first"
    assert keys.bind(engine) is engine
    keys.create_table()
    with Session(engine) as session:
        session.add(Patient(id=1, name="Ada", notes={"a": 1}))
        session.commit()
        assert session.get(Patient, 1).notes == {"a": 1}


def test_management_calls_name_their_engine_when_several_are_bound(engine: Engine, engine_b: Engine) -> None:
    keys, Patient = two_databases(engine, engine_b)
    with pytest.raises(ConfigurationError, match="bound to 2 engines.*pass engine="):
        keys.create_table()
    with pytest.raises(ConfigurationError, match="pass engine="):
        keys.rewrap()
    for eng in (engine, engine_b):
        with Session(eng) as session:
            session.add(Patient(id=1, name="Ada"))
            session.commit()
    before_a = key_rows(engine, keys)
    new_id = keys.rotate_table_key("patients", engine=engine_b)
    assert key_rows(engine, keys) == before_a and new_id in {i for i, _, _ in key_rows(engine_b, keys)}
    keys.clear_cache()
    assert keys.warm(engine=engine) == 1 and keys.warm(engine=engine_b) == 2
    report = keys.rewrap(engine=engine_b)
    assert report.complete
    with Session(engine_b) as session:
        session.add(Patient(id=2, name="Bea"))
        session.commit()
    assert fmt.key_id_of(stored(engine_b, Patient, "name", 2)) == new_id
    with pytest.raises(ConfigurationError, match="not bound"):
        keys.create_table(engine=create_engine("sqlite://"))


def test_one_session_over_two_engines(engine: Engine, engine_b: Engine) -> None:
    """``Session(binds=...)``: each table's keys go to the database its rows go to."""
    keys = KeyManager(None, LocalKeyProvider(os.urandom(32)))
    Base = new_base()

    class Person(Base):
        __tablename__ = "people"
        id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
        name: Mapped[str] = mapped_column(EncryptedType(String(100), keys))

    class Note(Base):
        __tablename__ = "notes"
        id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
        body: Mapped[dict] = mapped_column(EncryptedType(JSON, keys, scope="row"))

    for eng, model in ((engine, Person), (engine_b, Note)):
        keys.bind(eng)
        keys.create_table(engine=eng)
        model.__table__.create(eng)
    with Session(binds={Person: engine, Note: engine_b}) as session:
        session.add_all([Person(id=1, name="Ada"), Note(id=1, body={"n": 1})])
        session.commit()
    assert {o for _, o, _ in key_rows(engine, keys)} == {"people"}
    assert {o for _, o, _ in key_rows(engine_b, keys)} == {"notes"}
    with Session(binds={Person: engine, Note: engine_b}) as session:
        assert (session.get(Person, 1).name, session.get(Note, 1).body) == ("Ada", {"n": 1})


def test_async_engines_bound_later(engine: Engine, engine_b: Engine) -> None:
    keys = KeyManager(None, LocalKeyProvider(os.urandom(32)))
    Patient = make_model(keys)

    async def run() -> list[tuple[str, dict[str, int]]]:
        engines = [create_async_engine(async_url(e.url)) for e in (engine, engine_b)]
        out = []
        try:
            for i, aeng in enumerate(engines):
                keys.bind(aeng)
                await keys.create_table_async(engine=aeng)
                async with aeng.begin() as conn:
                    await conn.run_sync(Patient.metadata.create_all)
                async with AsyncSession(aeng) as session:
                    session.add(Patient(id=1, name=f"p{i}", notes={"i": i}))
                    await session.commit()
            for aeng in engines:
                await keys.warm_async(engine=aeng)
                async with AsyncSession(aeng) as session:
                    got = await session.get(Patient, 1)
                    out.append((got.name, got.notes))
        finally:
            for aeng in engines:
                await aeng.dispose()
        return out

    assert asyncio.run(run()) == [("p0", {"i": 0}), ("p1", {"i": 1})]
    ids_a, ids_b = ({i for i, _, _ in key_rows(e, keys)} for e in (engine, engine_b))
    table_key_b = fmt.key_id_of(stored(engine_b, Patient, "name", 1))  # a random id: in B's table only
    assert table_key_b in ids_b and table_key_b not in ids_a
    assert fmt.key_id_of(stored(engine, Patient, "name", 1)) in ids_a - ids_b


def test_key_manager_of_one_engine_keeps_its_shape(engine: Engine) -> None:
    """``KeyManager(engine, provider)`` is bind(engine) done for you."""
    keys = KeyManager(engine, LocalKeyProvider(os.urandom(32)))
    assert keys.engine is engine and len(keys.engines) == 1
    assert keys.store is keys.store_for(engine) and keys.bind(engine) is engine and len(keys.engines) == 1
    assert keys.engines.select(engine.execution_options(isolation_level="AUTOCOMMIT")) is keys.engines.select()
    keys.create_table()
    with engine.connect() as conn:
        assert conn.execute(text(f"SELECT COUNT(*) FROM {keys.table.name}")).scalar_one() == 0


def test_a_migration_runs_on_its_own_connection(engine: Engine, engine_b: Engine) -> None:
    """The sa-envelope Alembic operations use the migration's engine: a
    manager bound to two app engines encrypts B's column with B's keys."""
    from alembic.migration import MigrationContext
    from alembic.operations import Operations

    import sa_envelope.alembic  # noqa: F401  (registers the operations)

    keys, _ = two_databases(engine, engine_b)
    plain = Table("t", MetaData(), Column("id", Integer, primary_key=True), Column("v", String(40)))
    plain.create(engine_b)
    with engine_b.begin() as conn:
        conn.execute(plain.insert(), [{"id": i, "v": f"secret {i}"} for i in range(1, 6)])
    before_a = key_rows(engine, keys)
    migration = create_engine(engine_b.url.render_as_string(hide_password=False))  # as env.py makes its own
    try:
        with migration.connect() as conn:
            context = MigrationContext.configure(conn, opts={"transaction_per_migration": True})
            with context.begin_transaction(_per_migration=True):
                Operations(context).encrypt_column("t", "v", EncryptedType(String(40)), keys=keys, batch_size=2)
    finally:
        migration.dispose()
    encrypted = Table(
        "t", MetaData(), Column("id", Integer, primary_key=True), Column("v", EncryptedType(String(40), keys))
    )
    with engine_b.connect() as conn:
        assert conn.execute(select(encrypted.c.v).order_by(encrypted.c.id)).scalars().all() == [
            f"secret {i}" for i in range(1, 6)
        ]
        raw = conn.execute(select(type_coerce(encrypted.c.v, LargeBinary()))).scalars().all()
    assert {fmt.key_id_of(bytes(v)) for v in raw} <= {i for i, o, _ in key_rows(engine_b, keys) if o == "t"}
    assert key_rows(engine, keys) == before_a


def test_equality_while_sessions_on_both_engines_are_open(engine: Engine, engine_b: Engine) -> None:
    """A deterministic equality and a blind-index lookup on one engine, while a
    session on the other still holds its connection: each query's keys are
    those of the engine it executes on (not a guess among open connections)."""
    keys = KeyManager(None, LocalKeyProvider(os.urandom(32)))

    class User(new_base()):
        __tablename__ = "users"
        id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
        city: Mapped[str] = mapped_column(EncryptedType(String(50), keys, deterministic=True))
        email: Mapped[str] = mapped_column(EncryptedType(String(100), keys))
        email_index: Mapped[bytes | None] = mapped_column(BlindIndexType("email", keys))

    for n, eng in enumerate((engine, engine_b)):
        keys.bind(eng)
        keys.create_table(engine=eng)
        User.metadata.create_all(eng)
        with Session(eng) as session:
            session.add_all([User(id=i, city="oslo" if i % 2 else "lima", email=f"u{i}@x.org") for i in range(4 + n)])
            session.commit()
    with Session(engine) as first, Session(engine_b) as second:
        for session, count in ((first, 4), (second, 5)):
            assert len(session.scalars(select(User).where(User.city == "oslo")).all()) == count // 2
            assert [u.id for u in lookup(session, User.email, "u3@x.org")] == [3]
        assert [u.id for u in lookup(first, User.email, "u4@x.org")] == []
        assert [u.id for u in lookup(second, User.email, "u4@x.org")] == [4]


def test_binding_while_another_thread_declares_a_model(engine: Engine) -> None:
    """A class under declaration is registered before its mapper exists:
    binding then (an application starting threads, a test suite in
    parallel) must not fail. The declaration pauses while SQLAlchemy reads
    its ``__tablename__`` and the other thread binds; it then completes and
    writes through the binding."""
    import threading

    from sqlalchemy.orm import declared_attr

    keys = KeyManager(None, LocalKeyProvider(os.urandom(32)))
    declaring, bound = threading.Event(), threading.Event()
    failures: list[BaseException] = []

    def bind() -> None:
        declaring.wait(10)
        try:
            keys.bind(engine)
        except BaseException as exc:  # reported below, in the test's thread
            failures.append(exc)
        bound.set()

    binder = threading.Thread(target=bind)
    binder.start()

    class Half(new_base()):
        id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
        name: Mapped[str] = mapped_column(EncryptedType(String(40), keys))

        @declared_attr.directive
        def __tablename__(cls) -> str:  # read while the class is registered, unmapped
            declaring.set()
            assert bound.wait(10), "the binding thread never finished"
            return "half_declared"

    binder.join(10)
    assert not failures, failures
    keys.create_table()
    Half.__table__.create(engine)
    with Session(engine) as s:
        s.add(Half(id=1, name="Ada"))
        s.commit()
    with Session(engine) as s:
        assert s.get(Half, 1).name == "Ada"
