"""The compiled cache never shares a bind processor between columns or modes.

SQLAlchemy caches a compiled statement under a key that includes each type's
``_static_cache_key``. Its default reads only a type's positional
constructor arguments, so two ``EncryptedType(String(...), keys)`` columns
(or a randomised and a deterministic one, or two blind indexes with other
bits or tables) would share one cache entry, and a statement whose SQL does
not name the column would seal the second column's values under the first
column's context. Each statement below has the same SQL for both types.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy import Column, Integer, LargeBinary, MetaData, String, Table, bindparam, create_engine, select, type_coerce
from sqlalchemy.engine import Engine

from sa_envelope import BlindIndexType, EncryptedType, KeyManager, LocalKeyProvider


@pytest.fixture
def keys(engine: Engine, tmp_path: Path) -> KeyManager:
    manager = KeyManager(engine, LocalKeyProvider.from_file(tmp_path / "master.key"))
    manager.create_table()
    return manager


def _attached(keys: KeyManager) -> dict[str, EncryptedType]:
    """Four types of equal inner type, each attached to its own column."""
    meta = MetaData()
    types = {
        "a.v": EncryptedType(String(50), keys),
        "b.v": EncryptedType(String(50), keys),
        "a.w": EncryptedType(String(50), keys, deterministic=True),
        "a.x": EncryptedType(String(50), keys, context="pinned.name"),
    }
    tables: dict[str, Table] = {}
    for name, type_ in types.items():
        table, column = name.split(".")
        if table not in tables:
            tables[table] = Table(table, meta, Column("id", Integer, primary_key=True))
        tables[table].append_column(Column(column, type_))
    return types


def _sealed(engine: Engine, type_: EncryptedType, value: str) -> bytes:
    """What ``type_``'s bind processor makes of ``value``, read back raw;
    the SQL (``SELECT ? AS anon``) is the same for every type. In a
    transaction that commits: a table's first key is stored with it."""
    stmt = select(type_coerce(type_coerce(bindparam("x", value), type_), LargeBinary))
    with engine.begin() as conn:
        return bytes(conn.execute(stmt).scalar_one())


def test_same_sql_for_two_columns_seals_each_under_its_own_context(engine: Engine, keys: KeyManager) -> None:
    types = _attached(keys)
    for name, type_ in types.items():  # the cache is warm after the first
        assert type_.decrypt(_sealed(engine, type_, f"value of {name}")) == f"value of {name}", name
    assert _sealed(engine, types["a.w"], "same") == _sealed(engine, types["a.w"], "same")  # deterministic
    assert _sealed(engine, types["a.v"], "same") != _sealed(engine, types["a.v"], "same")  # randomised


def test_cache_keys_differ_by_everything_that_changes_the_bytes(keys: KeyManager, tmp_path: Path) -> None:
    types = _attached(keys)
    other = KeyManager(create_engine(f"sqlite:///{tmp_path}/other.db"), LocalKeyProvider.from_file(tmp_path / "o.key"))
    unattached = EncryptedType(String(50), other)
    cache_keys = [t._static_cache_key for t in [*types.values(), unattached]]
    assert len(set(cache_keys)) == len(cache_keys)


def test_blind_index_cache_keys_differ_by_table_bits_and_normaliser(keys: KeyManager) -> None:
    meta = MetaData()
    made = [
        BlindIndexType("email", keys, bits=32),
        BlindIndexType("email", keys, bits=64),
        BlindIndexType("email", keys, bits=32, normalizer=str.lower),
        BlindIndexType("email", keys, bits=32),
    ]
    for i, type_ in enumerate(made):
        Table(f"t{i}", meta, Column("id", Integer, primary_key=True), Column("email_index", type_))
    cache_keys = [t._static_cache_key for t in made]
    assert len(set(cache_keys)) == len(cache_keys)


def test_decrypt_takes_any_bytes_like_value(engine: Engine, keys: KeyManager) -> None:
    """Raw SQL on PostgreSQL gives ``memoryview``s; a fresh type (no read memo) opens them."""
    types = _attached(keys)
    for name, type_ in types.items():
        stored = _sealed(engine, type_, name)
        fresh = type_.copy()
        fresh._bind_names(*(type_.bound_context or "").rsplit(".", 1))
        assert fresh.decrypt(memoryview(stored)) == name  # type: ignore[arg-type]
        assert fresh.decrypt(bytearray(stored)) == name  # type: ignore[arg-type]
