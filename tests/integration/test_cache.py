"""The plaintext key cache: bounded by size, age and uses; safe across threads."""

from __future__ import annotations

import os
import threading
import time

import pytest
from sqlalchemy import Column, Integer, MetaData, String, Table, select
from sqlalchemy.engine import Engine

from sa_envelope import CacheLimits, EncryptedType, KeyManager, LocalKeyProvider
from sa_envelope.columns import encrypted


def build(engine: Engine, limits: CacheLimits, tables: int = 1) -> tuple[KeyManager, list[Table]]:
    keys = KeyManager(engine, LocalKeyProvider(os.urandom(32)), cache=limits)
    meta = MetaData()
    made = [
        Table(f"kc_{n}", meta, Column("id", Integer, primary_key=True), Column("v", EncryptedType(String(20), keys)))
        for n in range(tables)
    ]
    keys.create_table()
    meta.create_all(engine)
    return keys, made


def write_and_read(engine: Engine, table: Table, n: int = 10) -> list[str]:
    with engine.begin() as conn:
        conn.execute(table.insert(), [{"v": f"v{i}"} for i in range(n)])
    with engine.connect() as conn:
        return list(conn.execute(select(table.c.v)).scalars())


def test_max_uses_forces_a_fresh_unwrap(engine: Engine) -> None:
    keys, (table,) = build(engine, CacheLimits(max_uses=25))
    write_and_read(engine, table, 10)
    before = keys.stats()["provider_calls"]
    for _ in range(3):
        write_and_read(engine, table, 10)
    assert keys.stats()["provider_calls"] > before  # re-unwrapped after 25 uses
    assert keys.stats()["keys_created"] == 1  # but still the same stored key


def test_max_age_expires_keys(engine: Engine, monkeypatch: pytest.MonkeyPatch) -> None:
    """The clock jumps past ``max_age`` instead of sleeping: a loaded machine
    can take longer than a short age between two statements, never a minute."""
    real, skipped = time.monotonic, [0.0]

    def clock() -> float:
        return real() + skipped[0]

    monkeypatch.setattr(time, "monotonic", clock)
    monkeypatch.setattr(encrypted, "_monotonic", clock)
    keys, (table,) = build(engine, CacheLimits(max_age=60))
    write_and_read(engine, table)
    calls = keys.stats()["provider_calls"]
    write_and_read(engine, table)
    assert keys.stats()["provider_calls"] == calls  # still fresh
    skipped[0] = 61
    write_and_read(engine, table)
    assert keys.stats()["provider_calls"] == calls + 1


def test_max_size_bounds_the_cache(engine: Engine) -> None:
    keys, tables = build(engine, CacheLimits(max_size=2), tables=4)
    for table in tables:
        assert len(write_and_read(engine, table)) == 10
    assert keys.stats()["cached_keys"] <= 2
    for table in tables:  # evicted keys come back through the provider
        assert len(write_and_read(engine, table)) == 20


def test_threads_share_one_cache(engine: Engine) -> None:
    keys, (table,) = build(engine, CacheLimits())
    write_and_read(engine, table, 1)
    errors: list[BaseException] = []

    def work(n: int) -> None:
        try:
            for _ in range(5):
                with engine.begin() as conn:
                    conn.execute(table.insert(), [{"v": f"t{n}"} for _ in range(20)])
                with engine.connect() as conn:
                    conn.execute(select(table.c.v)).all()
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    with engine.connect() as conn:
        assert len(conn.execute(select(table.c.v)).all()) == 1 + 4 * 5 * 20
    assert keys.stats()["keys_created"] == 1
