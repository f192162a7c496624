"""Issue 16: the uniqueness guards' table follows a custom key-table name, as
the token table does: ``KeyManager(..., table_name="app_keys")`` keeps its
guards in ``app_guards`` (never in the default ``sa_envelope_guards``), made by
``keys.create_table()``, ``rotate_table_key`` and the Alembic operations
(``create_key_table`` / ``drop_key_table``, ``create_guard_table`` /
``drop_guard_table`` with ``table_name=``), locked by a rotation's checked
writes and removed from there when the rotation ends. Adding it to a
deployment is refused while a deterministic key is being rotated: the
running processes lock the old table (or the key row) meanwhile."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from alembic.migration import MigrationContext
from alembic.operations import Operations
from sqlalchemy import Column, Integer, LargeBinary, MetaData, String, Table, func, inspect, select, type_coerce
from sqlalchemy.engine import Engine

import sa_envelope.alembic  # noqa: F401  (registers the operations)
from sa_envelope import DuplicateValueError, EncryptedType, EnvelopeError, KeyManager, LivePolicy, LocalKeyProvider
from sa_envelope.columns.guardrows import GUARD_TABLE, guard_table, guard_table_name
from sa_envelope.envelope import format as fmt
from sa_envelope.keys import table as kt

FAST = LivePolicy(ttl=0.2, grace=1.0)


def _tables(engine: Engine) -> set[str]:
    return set(inspect(engine).get_table_names())


def _ops(conn: object) -> Operations:
    return Operations(MigrationContext.configure(conn))  # type: ignore[arg-type]


def test_the_name_follows_the_key_table() -> None:
    assert guard_table_name() == GUARD_TABLE == "sa_envelope_guards"
    assert guard_table_name("app_keys") == guard_table_name("app") == "app_guards"
    assert guard_table(MetaData(schema="s"), "app_keys").fullname == "s.app_guards"


def _rotating(engine: Engine, tmp_path: Path) -> tuple[KeyManager, Table, int]:
    """``logins.email`` (unique, deterministic) mid-rotation under key table ``app_keys``."""
    keys = KeyManager(engine, LocalKeyProvider.from_file(tmp_path / "k.key"), live=FAST, table_name="app_keys")
    keys.create_table()
    table = Table(
        "logins", MetaData(),
        Column("id", Integer, primary_key=True, autoincrement=False),
        Column("email", EncryptedType(String(100), keys, deterministic=True), unique=True),
    )  # fmt: skip
    table.create(engine)
    with engine.begin() as conn:
        conn.execute(table.insert(), [{"id": 1, "email": "a@x"}])
    with engine.connect() as conn:
        old = fmt.key_id_of(bytes(conn.execute(select(type_coerce(table.c.email, LargeBinary))).scalar_one()))
    keys.rotate_table_key("logins", scope=kt.SCOPE_DETERMINISTIC)
    time.sleep(max(0.0, keys.live.switched_at("logins", kt.SCOPE_DETERMINISTIC) - time.time()))
    keys.live.invalidate()
    return keys, table, old


def test_a_custom_key_table_keeps_its_guards_beside_it(engine: Engine, tmp_path: Path) -> None:
    keys, table, old = _rotating(engine, tmp_path)
    assert {"app_keys", "app_search", "app_guards"} <= _tables(engine)
    assert GUARD_TABLE not in _tables(engine)
    with pytest.raises(DuplicateValueError):
        with engine.begin() as conn:
            conn.execute(table.insert(), [{"id": 2, "email": "a@x"}])
    with engine.begin() as conn:
        conn.execute(table.insert(), [{"id": 3, "email": "b@x"}])
    guards = guard_table(MetaData(), "app_keys")
    count = select(func.count()).select_from(guards).where(guards.c.owner_table == "logins")
    with engine.connect() as conn:
        made = conn.execute(count).scalar_one()
    assert made == {"sqlite": 0, "postgresql": 2}.get(engine.dialect.name, 4)  # SQLite locks nothing
    assert GUARD_TABLE not in _tables(engine)

    report = keys.reencrypt([table.c.email], key_id=old)
    assert report.retired
    with engine.connect() as conn:
        assert conn.execute(count).scalar_one() == 0  # removed from app_guards when the rotation ended


def test_alembic_operations_follow_the_key_table_name(engine: Engine) -> None:
    with engine.begin() as conn:
        _ops(conn).create_key_table(table_name="app_keys")
    assert {"app_keys", "app_search", "app_guards"} <= _tables(engine)
    assert GUARD_TABLE not in _tables(engine)
    assert "ix_app_guards_owner_table" in {i["name"] for i in inspect(engine).get_indexes("app_guards")}
    with engine.begin() as conn:
        _ops(conn).drop_guard_table(table_name="app_keys")
    assert "app_guards" not in _tables(engine) and "app_keys" in _tables(engine)
    with engine.begin() as conn:
        _ops(conn).create_guard_table(table_name="app_keys")  # an upgrade: the table beside app_keys
    assert "app_guards" in _tables(engine)
    with engine.begin() as conn:
        _ops(conn).drop_key_table(table_name="app_keys")
    assert not {"app_keys", "app_search", "app_guards"} & _tables(engine)


def test_the_upgrade_is_refused_during_a_rotation(engine: Engine, tmp_path: Path) -> None:
    """A deployment of the version before keeps ``sa_envelope_guards``; the
    new ``app_guards`` is made between rotations, never during one."""
    keys, table, old = _rotating(engine, tmp_path)
    with engine.begin() as conn:
        _ops(conn).drop_guard_table(table_name="app_keys")
    with pytest.raises(EnvelopeError, match="logins is being rotated"):
        with engine.begin() as conn:
            _ops(conn).create_guard_table(table_name="app_keys")
    assert "app_guards" not in _tables(engine)
    assert keys.reencrypt([table.c.email], key_id=old).retired
    with engine.begin() as conn:
        _ops(conn).create_guard_table(table_name="app_keys")
    assert "app_guards" in _tables(engine)
