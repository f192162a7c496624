"""Issue 16: the uniqueness guards' table (``sa_envelope_guards``) is made by
``op.create_key_table()`` and dropped by ``op.drop_key_table()`` (real Alembic
runs of migrations_example), by ``keys.create_table()``, and added to a
deployment whose key table predates it by ``op.create_guard_table()``; a
rotation's UNIQUE checks then lock guard rows instead of the key row."""

from __future__ import annotations

import time
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.migration import MigrationContext
from alembic.operations import Operations
from sqlalchemy import Column, Integer, MetaData, String, Table, func, inspect, select
from sqlalchemy.engine import Engine

import sa_envelope.alembic  # noqa: F401  (registers the operations)
from sa_envelope import DuplicateValueError, EncryptedType, KeyManager, LivePolicy, LocalKeyProvider
from sa_envelope.columns.guardrows import GUARD_TABLE, guard_table
from sa_envelope.keys import table as kt
from sa_envelope.search.tokens import token_table
from support.rotation import ROOT

import pytest

INI = str(ROOT / "migrations_example" / "alembic.ini")
FAST = LivePolicy(ttl=0.2, grace=1.0)


def _tables(engine: Engine) -> set[str]:
    return set(inspect(engine).get_table_names())


def _index_names(engine: Engine) -> set[str]:
    return {str(i["name"]) for i in inspect(engine).get_indexes(GUARD_TABLE)}


def test_create_key_table_makes_the_guard_table_and_drop_key_table_drops_it(
    engine: Engine, db_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SA_ENVELOPE_DATABASE_URL", db_url)
    monkeypatch.setenv("SA_ENVELOPE_CMK", f"local:{tmp_path / 'k.key'}")
    config = Config(INI)
    command.upgrade(config, "0001")
    assert {kt.KEY_TABLE_NAME, GUARD_TABLE} <= _tables(engine)
    assert f"ix_{GUARD_TABLE}_owner_table" in _index_names(engine)
    command.downgrade(config, "base")
    assert not {kt.KEY_TABLE_NAME, GUARD_TABLE} & _tables(engine)


def test_keys_create_table_makes_the_guard_table(engine: Engine, tmp_path: Path) -> None:
    KeyManager(engine, LocalKeyProvider.from_file(tmp_path / "k.key")).create_table()
    assert GUARD_TABLE in _tables(engine)
    assert f"ix_{GUARD_TABLE}_owner_table" in _index_names(engine)


def test_create_guard_table_upgrades_a_deployment_made_before_it(engine: Engine, tmp_path: Path) -> None:
    kt.key_table(MetaData()).create(engine)  # as an older create_key_table left it
    token_table(MetaData()).create(engine)
    assert GUARD_TABLE not in _tables(engine)
    with engine.begin() as conn:
        Operations(MigrationContext.configure(conn)).create_guard_table()
    assert GUARD_TABLE in _tables(engine)
    assert f"ix_{GUARD_TABLE}_owner_table" in _index_names(engine)

    # a rotation's checked writes now lock guard rows (digests, no value)
    keys = KeyManager(engine, LocalKeyProvider.from_file(tmp_path / "k.key"), live=FAST)
    table = Table(
        "logins", MetaData(),
        Column("id", Integer, primary_key=True, autoincrement=False),
        Column("email", EncryptedType(String(100), keys, deterministic=True), unique=True),
    )  # fmt: skip
    table.create(engine)
    with engine.begin() as conn:
        conn.execute(table.insert(), [{"id": 1, "email": "a@x"}])
    keys.rotate_table_key("logins", scope=kt.SCOPE_DETERMINISTIC)
    time.sleep(max(0.0, keys.live.switched_at("logins", kt.SCOPE_DETERMINISTIC) - time.time()))
    keys.live.invalidate()
    with pytest.raises(DuplicateValueError):
        with engine.begin() as conn:
            conn.execute(table.insert(), [{"id": 2, "email": "a@x"}])
    with engine.begin() as conn:
        conn.execute(table.insert(), [{"id": 3, "email": "b@x"}])
    guards = guard_table(MetaData())
    with engine.connect() as conn:
        count = conn.execute(select(func.count()).select_from(guards).where(guards.c.owner_table == "logins"))
        # b@x under two live keys; MariaDB also keeps those of the refused a@x (made on a
        # connection of their own, committed); PostgreSQL's rolled back; SQLite locks nothing
        expected = {"sqlite": 0, "postgresql": 2}.get(engine.dialect.name, 4)
        assert count.scalar_one() == expected

    with engine.begin() as conn:
        Operations(MigrationContext.configure(conn)).drop_guard_table()
    assert GUARD_TABLE not in _tables(engine)
