"""The rule of keys.engines, without a database: which bound engine a
management call uses, and how an engine is named (never its password)."""

from __future__ import annotations

import os

import pytest
from sqlalchemy import create_engine
from sqlalchemy.ext.asyncio import create_async_engine

from sa_envelope import ConfigurationError, KeyManager, LocalKeyProvider

SECRET_URL = "postgresql+psycopg://app:s3cret-pw@db.invalid:5432/app"  # never connected


def manager() -> KeyManager:
    return KeyManager(None, LocalKeyProvider(os.urandom(32)))


def test_no_engine_one_engine_several_engines() -> None:
    keys = manager()
    with pytest.raises(ConfigurationError, match=r"^this KeyManager is bound to no engine: call keys.bind\(engine\) first$"):
        keys.engines.select()
    first = create_engine("sqlite://")
    keys.bind(first)
    assert keys.engines.select() is keys.engines.select(first) and keys.engine is first
    keys.bind(first.execution_options(isolation_level="AUTOCOMMIT"))  # the same engine and dialect
    assert len(keys.engines) == 1
    second = create_engine(SECRET_URL)
    keys.bind(second)
    with pytest.raises(ConfigurationError) as err:
        keys.engines.select()
    message = str(err.value)
    assert "bound to 2 engines" in message and "pass engine=" in message
    assert "app:***@db.invalid" in message and "s3cret-pw" not in message
    assert keys.engines.select(second).engine is second and keys.store_for(first) is not keys.store_for(second)


def test_an_unbound_engine_is_named_without_its_password() -> None:
    keys = manager()
    keys.bind(create_engine("sqlite://"))
    other = create_engine(SECRET_URL)
    with pytest.raises(ConfigurationError) as err:
        keys.engines.select(other)
    assert "not bound to engine 'postgresql+psycopg://app:***@db.invalid:5432/app'" in str(err.value)
    assert "s3cret-pw" not in str(err.value) and "keys.bind(engine)" in str(err.value)


def test_async_engines_bind_their_sync_engine() -> None:
    keys = manager()
    async_engine = create_async_engine("sqlite+aiosqlite://")
    assert keys.bind(async_engine) is async_engine
    assert keys.engines.select(async_engine) is keys.engines.select(async_engine.sync_engine)
    assert keys.engine is async_engine.sync_engine
    with pytest.raises(ConfigurationError, match="takes an Engine or an AsyncEngine"):
        keys.bind("sqlite://")


def test_each_engine_has_its_own_key_cache() -> None:
    keys = manager()
    a, b = create_engine("sqlite://"), create_engine("sqlite://")
    keys.bind(a)
    keys.bind(b)
    store_a, store_b = keys.store_for(a), keys.store_for(b)
    assert store_a.cache is not store_b.cache and store_a.tracker is not store_b.tracker
    assert store_a.engine is a and store_b.engine is b
