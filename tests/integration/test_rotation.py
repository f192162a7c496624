"""Table-key roll-over (explicit and automatic) and re-encryption off a key."""

from __future__ import annotations

import datetime as dt
import os
from typing import Any

import pytest
from sqlalchemy import LargeBinary, select, type_coerce
from sqlalchemy.engine import Engine

from sa_envelope import KeyManager, LocalKeyProvider, RolloverPolicy
from sa_envelope.keys.live import LivePolicy
from sa_envelope import faults
from sa_envelope.envelope import format as fmt
from sa_envelope.keys import table as kt
from support.keyrows import age_keys
from support.models import data_tables
from support.rotation import expected_row, fill, key_statuses, read_all


@pytest.fixture
def provider() -> LocalKeyProvider:
    return LocalKeyProvider(os.urandom(32))


def header_key_ids(engine: Engine, table: Any, column: str) -> list[int]:
    """The key id in the header of each stored value, in primary-key order."""
    raw = type_coerce(table.c[column], LargeBinary)
    with engine.connect() as conn:
        values = conn.execute(select(raw).order_by(table.c.id)).scalars().all()
    return [fmt.read_header(bytes(v))[1] for v in values]


def test_rotate_table_key(engine: Engine, provider: LocalKeyProvider) -> None:
    keys = KeyManager(engine, provider)
    (table,) = fill(engine, keys, tables=1, rows=10)
    (old,) = set(header_key_ids(engine, table, "name"))
    (det,) = set(header_key_ids(engine, table, "ssn"))

    new = keys.rotate_table_key("data_0")
    with engine.begin() as conn:
        conn.execute(table.insert(), [expected_row(i) for i in range(10, 20)])

    assert key_statuses(engine, "data_0") == {old: kt.RETIRED, new: kt.ACTIVE}
    assert header_key_ids(engine, table, "name") == [old] * 10 + [new] * 10
    # Deterministic keys do not roll over: equality queries still match old rows.
    assert set(header_key_ids(engine, table, "ssn")) == {det}
    assert key_statuses(engine, "data_0", kt.SCOPE_DETERMINISTIC) == {det: kt.ACTIVE}
    with engine.connect() as conn:
        assert conn.execute(select(table.c.id).where(table.c.ssn == "003-00-0000")).scalars().all() == [3]
    fresh = KeyManager(engine, provider)
    assert read_all(engine, fresh, 1) == [[expected_row(i) for i in range(20)]]
    # Another process, whose cache is cold, writes under the new key too.
    with engine.begin() as conn:
        conn.execute(data_tables(fresh, 1)[0].insert(), [expected_row(20)])
    assert header_key_ids(engine, table, "name")[-1] == new


def test_rollover_by_number_of_encryptions(engine: Engine, provider: LocalKeyProvider) -> None:
    keys = KeyManager(engine, provider, rollover=RolloverPolicy(max_encryptions=5))
    (table,) = fill(engine, keys, tables=1, rows=1)
    for i in range(1, 20):  # one transaction per row, like a busy application
        with engine.begin() as conn:
            conn.execute(table.insert(), [expected_row(i)])

    used = header_key_ids(engine, table, "name")
    assert len(set(used)) >= 3  # 20 encryptions, about 5 per key (+2 on the slow path)
    assert max(used.count(k) for k in set(used)) <= 7
    state = key_statuses(engine, "data_0")
    assert list(state.values()).count(kt.ACTIVE) == 1 and state[used[-1]] == kt.ACTIVE
    assert len(set(header_key_ids(engine, table, "ssn"))) == 1  # deterministic: never
    assert read_all(engine, KeyManager(engine, provider), 1) == [[expected_row(i) for i in range(20)]]


def test_rollover_rolled_back_with_the_transaction(engine: Engine, provider: LocalKeyProvider) -> None:
    keys = KeyManager(engine, provider, rollover=RolloverPolicy(max_encryptions=1))
    (table,) = fill(engine, keys, tables=1, rows=1)
    (old,) = key_statuses(engine, "data_0")
    with pytest.raises(RuntimeError), engine.begin() as conn:
        conn.execute(table.insert(), [expected_row(1)])  # rolls over: new key, old retired
        raise RuntimeError("application error")
    assert key_statuses(engine, "data_0") == {old: kt.ACTIVE}
    with engine.begin() as conn:
        conn.execute(table.insert(), [expected_row(2)])
    assert read_all(engine, KeyManager(engine, provider), 1) == [[expected_row(0), expected_row(2)]]


def test_rollover_by_age(engine: Engine, provider: LocalKeyProvider) -> None:
    keys = KeyManager(engine, provider, rollover=RolloverPolicy(max_age=3600))
    (table,) = fill(engine, keys, tables=1, rows=3)
    (old,) = key_statuses(engine, "data_0")
    age_keys(engine, keys, dt.timedelta(hours=2))  # the key was made two hours ago
    restarted = KeyManager(engine, provider, rollover=RolloverPolicy(max_age=3600))
    with engine.begin() as conn:
        conn.execute(data_tables(restarted, 1)[0].insert(), [expected_row(3)])
    new = header_key_ids(engine, table, "name")[-1]
    assert new != old and key_statuses(engine, "data_0") == {old: kt.RETIRED, new: kt.ACTIVE}
    assert len(set(header_key_ids(engine, table, "ssn"))) == 1
    assert read_all(engine, restarted, 1) == [[expected_row(i) for i in range(4)]]


def test_reencrypt_off_a_key(engine: Engine, provider: LocalKeyProvider) -> None:
    keys = KeyManager(engine, provider, live=LivePolicy(ttl=0.2, grace=1.5))  # the deterministic switch
    (table,) = fill(engine, keys, tables=1, rows=60)
    (old,) = set(header_key_ids(engine, table, "name"))
    (old_det,) = set(header_key_ids(engine, table, "ssn"))
    failures = []

    def crash(name: str) -> None:  # the first run dies in its third batch
        if name == "reencrypt.batch.before_commit":
            failures.append(name)
            if len(failures) == 3:
                raise ConnectionError("simulated crash")

    with faults.inject(crash), pytest.raises(ConnectionError):
        keys.reencrypt([table.c.name], key_id=old, batch_size=10)
    assert header_key_ids(engine, table, "name").count(old) == 40  # two batches committed

    report = keys.reencrypt([table.c.name], key_id=f"{old:016x}", batch_size=10)
    assert (report.reencrypted, report.failed, report.remaining) == (40, 0, 0)
    assert old not in header_key_ids(engine, table, "name")
    assert key_statuses(engine, "data_0")[old] == kt.RETIRED

    report = keys.reencrypt([table.c.ssn], key_id=old_det, batch_size=25)
    assert (report.reencrypted, report.remaining) == (60, 0)
    assert old_det not in header_key_ids(engine, table, "ssn")
    with engine.connect() as conn:  # still queryable by equality after the move
        assert conn.execute(select(table.c.id).where(table.c.ssn == "007-00-0000")).scalars().all() == [7]
    assert read_all(engine, KeyManager(engine, provider), 1) == [[expected_row(i) for i in range(60)]]
    again = keys.reencrypt([table.c.name, table.c.ssn], key_id=old)
    assert (again.reencrypted, again.remaining) == (0, 0)
