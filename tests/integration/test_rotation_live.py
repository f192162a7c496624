"""Deterministic and blind-index keys rotate while queries keep matching.

Half-way through the re-encryption (``max_batches``), equality queries,
``in_``, ``!=`` and ``lookup()`` return exactly what a plaintext twin
column returns; a unique column still refuses a duplicate across the two
keys; afterwards the old key is retired, the SQL carries one ciphertext
again, and a rerun changes nothing and calls no KMS.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest
from sqlalchemy import Column, Integer, LargeBinary, MetaData, String, Table, event, select, text, type_coerce, update
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Mapped, Session, mapped_column

from sa_envelope import (
    AwsKmsProvider,
    BlindIndexType,
    DuplicateValueError,
    EncryptedType,
    KeyManager,
    LivePolicy,
    lookup,
    normalize_email,
)
from sa_envelope import faults
from sa_envelope.envelope import format as fmt
from sa_envelope.keys import table as kt
from support.models import new_base
from support.rotation import key_statuses, stored_hash

FAST = LivePolicy(ttl=0.2, grace=1.0)  # the switch within seconds, not the default minute
CITIES = ["oslo", "lima", "rome", "kyiv", "bern", "nuuk", "riga"]


def _manager(engine: Engine, kms_client: Any, cmk: str) -> KeyManager:
    keys = KeyManager(engine, AwsKmsProvider(cmk, client=kms_client), live=FAST)
    keys.create_table()
    return keys


def _people(keys: KeyManager) -> Table:
    return Table(
        "people", MetaData(),
        Column("id", Integer, primary_key=True, autoincrement=False),
        Column("ssn", EncryptedType(String(11), keys, deterministic=True), unique=True),
        Column("city", EncryptedType(String(20), keys, deterministic=True)),
        Column("city_plain", String(20)),  # the plaintext twin of city
    )  # fmt: skip


def _row(i: int) -> dict[str, Any]:
    city = CITIES[i % len(CITIES)]
    return {"id": i, "ssn": f"{i:03d}-00-0000", "city": city, "city_plain": city}


def _header_keys(engine: Engine, column: Any) -> set[int]:
    with engine.connect() as conn:
        raws = conn.execute(select(type_coerce(column, LargeBinary))).scalars().all()
    return {fmt.read_header(bytes(r))[1] for r in raws}


def _wait_for_switch(keys: KeyManager, owner: str, scope: str) -> None:
    """Sleep until every process writes under the newest key (grace + ttl)."""
    time.sleep(max(0.0, keys.live.switched_at(owner, scope) - time.time()))
    keys.live.invalidate()


def _assert_like_twin(engine: Engine, table: Table) -> None:
    """Every equality form on the encrypted column returns the plaintext twin's rows."""
    with engine.connect() as conn:

        def ids(where: Any) -> list[int]:
            return sorted(conn.execute(select(table.c.id).where(where)).scalars())

        for city in [*CITIES, "nowhere"]:
            assert ids(table.c.city == city) == ids(table.c.city_plain == city), city
            assert ids(table.c.city != city) == ids(table.c.city_plain != city), city
        pairs = [CITIES[:2], CITIES[2:5], ["nowhere", CITIES[6]]]
        for values in pairs:
            assert ids(table.c.city.in_(values)) == ids(table.c.city_plain.in_(values))
            assert ids(table.c.city.not_in(values)) == ids(table.c.city_plain.not_in(values))


def test_deterministic_rotation_keeps_queries_matching(engine: Engine, kms_client: Any, cmk: str) -> None:
    keys = _manager(engine, kms_client, cmk)
    table = _people(keys)
    table.create(engine)
    with engine.begin() as conn:
        conn.execute(table.insert(), [_row(i) for i in range(1, 61)])
    (old,) = _header_keys(engine, table.c.city)

    new = keys.rotate_table_key("people", scope="deterministic")
    assert key_statuses(engine, "people", kt.SCOPE_DETERMINISTIC) == {old: kt.DRAINING, new: kt.ACTIVE}
    with engine.begin() as conn:  # pending: matched by queries, not yet written under
        conn.execute(table.insert(), [_row(61)])
    assert _header_keys(engine, table.c.city) == {old}
    _assert_like_twin(engine, table)

    _wait_for_switch(keys, "people", kt.SCOPE_DETERMINISTIC)
    with engine.begin() as conn:  # now under the new key
        conn.execute(table.insert(), [_row(i) for i in range(62, 71)])
    report = keys.reencrypt([table.c.ssn, table.c.city], key_id=old, batch_size=10, max_batches=2)
    assert report.stopped and not report.retired and report.remaining > 0
    assert _header_keys(engine, table.c.city) == {old, new}  # half done
    _assert_like_twin(engine, table)

    # UNIQUE across keys: a value stored under the old key, written again under the new one
    (under_old,) = [i for i in range(1, 62) if i not in _moved_ids(engine, table, new)][:1]
    with pytest.raises(DuplicateValueError) as refused:
        with engine.begin() as conn:
            conn.execute(table.insert(), [{**_row(500), "ssn": _row(under_old)["ssn"]}])
    assert refused.value.table == "people" and refused.value.column == "ssn"
    assert _row(under_old)["ssn"] not in str(refused.value)
    with pytest.raises((DuplicateValueError, IntegrityError)):  # the same key: the database refuses
        with engine.begin() as conn:
            conn.execute(table.insert(), [{**_row(501), "ssn": _row(65)["ssn"]}])
    with engine.begin() as conn:  # a value of its own passes
        conn.execute(table.insert(), [{**_row(502), "ssn": "999-99-9999"}])

    report = keys.reencrypt([table.c.ssn, table.c.city], key_id=old, batch_size=10, workers=2)
    assert (report.remaining, report.failed, report.retired) == (0, 0, True)
    assert key_statuses(engine, "people", kt.SCOPE_DETERMINISTIC) == {old: kt.RETIRED, new: kt.ACTIVE}
    assert _header_keys(engine, table.c.city) == {new}
    _assert_like_twin(engine, table)
    assert _bound_ciphertexts(engine, table) == 1  # one ciphertext again

    # A rerun from a fresh process: no change, no KMS call.
    before = stored_hash(engine)
    kms_client.calls.clear()
    fresh = KeyManager(engine, AwsKmsProvider(cmk, client=kms_client), live=FAST)
    again = fresh.reencrypt([_people(fresh).c.ssn, _people(fresh).c.city], key_id=old)
    assert (again.reencrypted, again.remaining) == (0, 0)
    assert stored_hash(engine) == before
    assert sum(kms_client.calls.values()) == 0, kms_client.calls


def _moved_ids(engine: Engine, table: Table, new: int) -> set[int]:
    needle = fmt.key_id_bytes(new)
    with engine.connect() as conn:
        rows = conn.execute(select(table.c.id, type_coerce(table.c.ssn, LargeBinary))).all()
    return {i for i, raw in rows if bytes(raw)[1:9] == needle}


def _bound_ciphertexts(engine: Engine, table: Table) -> int:
    """How many parameters an equality query on the column sends."""
    sent: list[Any] = []

    def capture(conn: Any, cursor: Any, statement: str, parameters: Any, context: Any, executemany: bool) -> None:
        sent.append(parameters)

    event.listen(engine, "before_cursor_execute", capture)
    try:
        with engine.connect() as conn:
            conn.execute(select(table.c.id).where(table.c.city == "oslo")).all()
    finally:
        event.remove(engine, "before_cursor_execute", capture)
    return len(sent[-1])


# -- blind indexes -----------------------------------------------------------------------------


def _users(keys: KeyManager) -> Any:
    class User(new_base()):
        __tablename__ = "users"
        id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
        email: Mapped[str] = mapped_column(EncryptedType(String(100), keys))
        email_index: Mapped[bytes | None] = mapped_column(
            BlindIndexType("email", keys, normalizer=normalize_email, bits=16), index=True
        )
        email_plain: Mapped[str] = mapped_column(String(100))

    return User


EMAILS = [f"user{i % 13}@example.org" for i in range(1, 41)]


def _assert_lookup_like_twin(engine: Engine, User: Any) -> None:
    with Session(engine) as session:
        for email in [*sorted(set(EMAILS)), "nobody@example.org"]:
            found = sorted(u.id for u in lookup(session, User.email, email.upper()))
            twin = sorted(session.scalars(select(User.id).where(User.email_plain == email)))
            assert found == twin, email


def test_blind_index_rotation_keeps_lookups_matching(engine: Engine, kms_client: Any, cmk: str) -> None:
    keys = _manager(engine, kms_client, cmk)
    User = _users(keys)
    User.metadata.create_all(engine)
    with Session(engine) as session:
        session.add_all([User(id=i, email=e, email_plain=e) for i, e in enumerate(EMAILS[:30], start=1)])
        session.commit()
    with engine.connect() as conn:
        (old,) = conn.execute(
            select(keys.table.c.id).where(keys.table.c.scope == kt.SCOPE_BLIND_INDEX)
        ).scalars().all()

    new = keys.rotate_table_key("users", scope="blind-index")
    _assert_lookup_like_twin(engine, User)
    _wait_for_switch(keys, "users", kt.SCOPE_BLIND_INDEX)
    with Session(engine) as session:  # digests under the new key
        session.add_all([User(id=i, email=e, email_plain=e) for i, e in enumerate(EMAILS[30:], start=31)])
        session.commit()
    _assert_lookup_like_twin(engine, User)

    table = User.__table__
    report = keys.reencrypt([table.c.email_index], key_id=old, batch_size=8, max_batches=2)
    assert report.stopped and not report.retired and report.reencrypted > 0
    _assert_lookup_like_twin(engine, User)

    report = keys.reencrypt([table.c.email_index], key_id=old, batch_size=8, workers=2, rate=100_000)
    assert (report.failed, report.retired) == (0, True)
    assert key_statuses(engine, "users", kt.SCOPE_BLIND_INDEX) == {old: kt.RETIRED, new: kt.ACTIVE}
    assert keys.live.keys("users", kt.SCOPE_BLIND_INDEX)[0].key_id == new
    assert len(keys.live.keys("users", kt.SCOPE_BLIND_INDEX)) == 1
    _assert_lookup_like_twin(engine, User)

    before = stored_hash(engine)
    kms_client.calls.clear()
    fresh = KeyManager(engine, AwsKmsProvider(cmk, client=kms_client), live=FAST)
    again = fresh.reencrypt([_users(fresh).__table__.c.email_index], key_id=old)
    assert (again.reencrypted, again.retired) == (0, True)
    assert stored_hash(engine) == before
    assert sum(kms_client.calls.values()) == 0, kms_client.calls


# -- workers ------------------------------------------------------------------------------------


def test_two_workers_write_each_row_once(engine: Engine, kms_client: Any, cmk: str) -> None:
    keys = _manager(engine, kms_client, cmk)
    table = Table(
        "notes", MetaData(),
        Column("id", Integer, primary_key=True, autoincrement=False),
        Column("body", EncryptedType(String(50), keys)),
    )  # fmt: skip
    table.create(engine)
    with engine.begin() as conn:
        conn.execute(table.insert(), [{"id": i, "body": f"note {i}"} for i in range(1, 401)])
    (old,) = _header_keys(engine, table.c.body)
    raw = type_coerce(table.c.body, LargeBinary)
    with engine.begin() as conn:  # one tampered value: reported once, left in place
        stored = bytes(conn.execute(select(raw).where(table.c.id == 5)).scalar_one())
        broken = stored[:-1] + bytes([stored[-1] ^ 1])
        conn.execute(update(Table("notes", MetaData(), Column("id", Integer), Column("body", LargeBinary)))
                     .where(text("id = 5")).values(body=broken))  # fmt: skip
    writers: list[str] = []

    def log(point: str) -> None:
        if point == "reencrypt.row.after_update":
            writers.append(threading.current_thread().name)

    kms_client.calls.clear()
    keys.clear_cache()
    with faults.inject(log):
        report = keys.reencrypt([table.c.body], key_id=old, batch_size=20, workers=2)
    assert (report.reencrypted, report.remaining, report.failed) == (399, 1, 1)  # each row written once
    assert [where for where, _ in report.failures] == ["notes.body"]
    assert _header_keys(engine, table.c.body) == {old, keys.live.store.encryption_key("notes").key_id}
    if engine.dialect.name != "sqlite":  # SQLite has one writer: one worker
        assert len(set(writers)) == 2
    # KMS: the new key made and the old one unwrapped, whatever the rows and workers
    assert sum(kms_client.calls.values()) <= 3, kms_client.calls
    with engine.connect() as conn:
        assert conn.execute(select(table.c.body).where(table.c.id == 7)).scalar_one() == "note 7"


def test_first_key_made_outside_a_statement_is_stored(engine: Engine, kms_client: Any, cmk: str) -> None:
    """A digest or value computed before any statement runs makes the table's
    first key in a transaction of its own, committed: another process finds it."""
    keys = _manager(engine, kms_client, cmk)
    index_type = BlindIndexType("v", keys)
    Table("firsts", MetaData(), Column("id", Integer, primary_key=True), Column("v_index", index_type))
    digest = index_type.digest("x")
    (made,) = key_statuses(engine, "firsts", kt.SCOPE_BLIND_INDEX)
    other = KeyManager(engine, AwsKmsProvider(cmk, client=kms_client), live=FAST)
    other_type = BlindIndexType("v", other)
    Table("firsts", MetaData(), Column("id", Integer, primary_key=True), Column("v_index", other_type))
    assert other_type.digest("x") == digest
    assert other.live.write_key("firsts", kt.SCOPE_BLIND_INDEX).key_id == made


@pytest.mark.backends("postgresql", "mysql")
def test_a_worker_process_starts_in_its_own_slice(engine: Engine, kms_client: Any, cmk: str) -> None:
    """Worker 2 of 2 takes its first batch from the second half of the keys:
    the workers do not all start at the first row and read each other's."""
    from sa_envelope.jobs.reencrypt import prepare_move, reencrypt_columns

    keys = _manager(engine, kms_client, cmk)
    table = Table(
        "notes", MetaData(),
        Column("id", Integer, primary_key=True, autoincrement=False),
        Column("body", EncryptedType(String(50), keys)),
    )  # fmt: skip
    table.create(engine)
    with engine.begin() as conn:
        conn.execute(table.insert(), [{"id": i, "body": f"note {i}"} for i in range(1, 101)])
    (old,) = _header_keys(engine, table.c.body)
    prepare_move(keys.store, keys.live, [table.c.body], old)
    report = reencrypt_columns(keys.store, keys.live, [table.c.body], key_id=old, batch_size=10, max_batches=1,
                               partition=(1, 2), progress=False)  # fmt: skip
    raw = type_coerce(table.c.body, LargeBinary)
    with engine.connect() as conn:
        moved = [i for i, v in conn.execute(select(table.c.id, raw).order_by(table.c.id)) if fmt.read_header(bytes(v))[1] != old]
    assert report.reencrypted == 10
    assert moved == list(range(51, 61))
    report = reencrypt_columns(keys.store, keys.live, [table.c.body], key_id=old, batch_size=10, partition=(1, 2),
                               progress=False)  # fmt: skip
    assert report.reencrypted == 90  # then the rest of the table, the other slice too
    assert _header_keys(engine, table.c.body) == {keys.live.store.encryption_key("notes").key_id}


@pytest.mark.backends("postgresql")
def test_a_page_is_read_in_key_order_on_postgresql(engine: Engine, kms_client: Any, cmk: str) -> None:
    """The page query of a batch, explained in the batch's own transaction,
    is an index scan in key order that stops at the page: no sort of every
    row after the cursor (the planner has no statistics on the header
    expression and would pick that)."""
    keys = _manager(engine, kms_client, cmk)
    table = Table(
        "notes", MetaData(),
        Column("id", Integer, primary_key=True, autoincrement=False),
        Column("body", EncryptedType(String(50), keys)),
    )  # fmt: skip
    table.create(engine)
    with engine.begin() as conn:
        conn.execute(table.insert(), [{"id": i, "body": f"note {i}"} for i in range(1, 20_001)])
        conn.exec_driver_sql("ANALYZE notes")
    (old,) = _header_keys(engine, table.c.body)
    plans: list[str] = []

    def explain(conn: Any, cursor: Any, statement: str, parameters: Any, context: Any, many: bool) -> None:
        if "SKIP LOCKED" in statement and not plans:
            with cursor.connection.cursor() as explaining:  # the same transaction, its settings
                explaining.execute("EXPLAIN " + statement, parameters)
                plans.append("\n".join(row[0] for row in explaining.fetchall()))

    event.listen(engine, "after_cursor_execute", explain)
    try:
        report = keys.reencrypt([table.c.body], key_id=old, batch_size=100)
    finally:
        event.remove(engine, "after_cursor_execute", explain)
    assert report.reencrypted == 20_000
    assert plans and "Index Scan using notes_pkey" in plans[0] and "Sort" not in plans[0], plans
