"""Issue 16: an UPDATE that changes only the *other* columns of a unique
constraint holding a deterministic column is checked across the live keys.

``UniqueConstraint("tenant", "email")``, email deterministic and mid-rotation:
row 1 is (t1, x) under the old key, row 2 is (t2, x) under the new key (two
tuples, two byte strings). Moving row 2 to t1 writes no email, so the
statement has no value to check: the library reads the email each row keeps
(before the write, row-locked, by the statement's WHERE clause) and checks
it. Core, executemany, ORM flush and ORM bulk update by primary key, on
every backend; a writer on another connection between the read and the
UPDATE (refused on PostgreSQL, made to wait elsewhere). The race (two
writers on two connections) is in test_unique_race.py.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Column, Integer, LargeBinary, MetaData, String, Table, UniqueConstraint, bindparam
from sqlalchemy import event, select, type_coerce, update
from sqlalchemy.engine import Engine
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Mapped, Session, mapped_column

from sa_envelope import (
    DuplicateValueError,
    EncryptedType,
    KeyManager,
    LivePolicy,
    LocalKeyProvider,
    UncheckedUpdateError,
)
from sa_envelope.envelope import format as fmt
from sa_envelope.keys import table as kt
from support.models import new_base

FAST = LivePolicy(ttl=0.2, grace=1.0)


def _setup(engine: Engine, tmp_path: Path) -> tuple[KeyManager, Any, int, int]:
    """Row 1 (t1, x) under the old key, row 2 (t2, x) and row 3 (t3, y) under the new one."""
    keys = KeyManager(engine, LocalKeyProvider.from_file(tmp_path / "master.key"), live=FAST)
    keys.create_table()
    Base = new_base()

    class Member(Base):
        __tablename__ = "members"
        __table_args__ = (UniqueConstraint("tenant", "email"),)
        id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
        tenant: Mapped[str] = mapped_column(String(20))
        email: Mapped[str] = mapped_column(EncryptedType(String(100), keys, deterministic=True))

    Base.metadata.create_all(engine)
    with engine.begin() as conn:
        conn.execute(Member.__table__.insert(), [{"id": 1, "tenant": "t1", "email": "x@example.org"}])
    old = _key(engine, Member.__table__, 1)
    new = keys.rotate_table_key("members", scope=kt.SCOPE_DETERMINISTIC)
    time.sleep(max(0.0, keys.live.switched_at("members", kt.SCOPE_DETERMINISTIC) - time.time()))
    keys.live.invalidate()
    with engine.begin() as conn:
        conn.execute(Member.__table__.insert(), [
            {"id": 2, "tenant": "t2", "email": "x@example.org"},
            {"id": 3, "tenant": "t3", "email": "y@example.org"},
        ])  # fmt: skip
    assert (_key(engine, Member.__table__, 2), _key(engine, Member.__table__, 3)) == (new, new) != (old, old)
    return keys, Member, old, new


def _key(engine: Engine, table: Table, row_id: int) -> int:
    with engine.connect() as conn:
        raw = conn.execute(select(type_coerce(table.c.email, LargeBinary)).where(table.c.id == row_id)).scalar()
    return fmt.key_id_of(bytes(raw))


def _tenants(engine: Engine, table: Table) -> dict[int, str]:
    with engine.connect() as conn:
        return dict(conn.execute(select(table.c.id, table.c.tenant)).all())  # type: ignore[arg-type]


UNCHANGED = {1: "t1", 2: "t2", 3: "t3"}


def _refused(exc: pytest.ExceptionInfo[DuplicateValueError]) -> None:
    assert exc.value.table == "members" and exc.value.column == "email"
    assert "x@example.org" not in str(exc.value)


def test_core_update_of_the_other_column_is_refused(engine: Engine, tmp_path: Path) -> None:
    _, Member, _, _ = _setup(engine, tmp_path)
    table = Member.__table__
    with pytest.raises(DuplicateValueError) as exc:
        with engine.begin() as conn:
            conn.execute(update(table).where(table.c.id == 2).values(tenant="t1"))
    _refused(exc)
    assert _tenants(engine, table) == UNCHANGED
    with engine.begin() as conn:  # a tuple of its own passes; so does the row moving back
        conn.execute(update(table).where(table.c.id == 3).values(tenant="t1"))
        conn.execute(update(table).where(table.c.tenant == "t1", table.c.id == 3).values(tenant="t3"))
    assert _tenants(engine, table) == UNCHANGED


def test_executemany_update_of_the_other_column_is_refused(engine: Engine, tmp_path: Path) -> None:
    _, Member, _, _ = _setup(engine, tmp_path)
    table = Member.__table__
    stmt = update(table).where(table.c.id == bindparam("row")).values(tenant=bindparam("to"))
    with pytest.raises(DuplicateValueError) as exc:
        with engine.begin() as conn:
            conn.execute(stmt, [{"row": 3, "to": "t9"}, {"row": 2, "to": "t1"}])
    _refused(exc)
    assert _tenants(engine, table) == UNCHANGED
    with engine.begin() as conn:
        conn.execute(stmt, [{"row": 3, "to": "t9"}, {"row": 2, "to": "t8"}])
    assert _tenants(engine, table) == {1: "t1", 2: "t8", 3: "t9"}


def test_orm_flush_of_the_other_column_is_refused(engine: Engine, tmp_path: Path) -> None:
    _, Member, _, _ = _setup(engine, tmp_path)
    with Session(engine) as session:
        session.get(Member, 2).tenant = "t1"
        with pytest.raises(DuplicateValueError) as exc:
            session.commit()
        _refused(exc)
    assert _tenants(engine, Member.__table__) == UNCHANGED


def test_orm_bulk_update_by_primary_key_is_refused(engine: Engine, tmp_path: Path) -> None:
    _, Member, _, _ = _setup(engine, tmp_path)
    with Session(engine) as session:
        with pytest.raises(DuplicateValueError) as exc:
            session.execute(update(Member), [{"id": 3, "tenant": "t7"}, {"id": 2, "tenant": "t1"}])
        _refused(exc)
        session.rollback()
    assert _tenants(engine, Member.__table__) == UNCHANGED
    with Session(engine) as session:
        session.execute(update(Member), [{"id": 3, "tenant": "t7"}, {"id": 2, "tenant": "t6"}])
        session.commit()
    assert _tenants(engine, Member.__table__) == {1: "t1", 2: "t6", 3: "t7"}


def test_orm_update_with_a_where_clause_is_refused(engine: Engine, tmp_path: Path) -> None:
    _, Member, _, _ = _setup(engine, tmp_path)
    with Session(engine) as session:
        with pytest.raises(DuplicateValueError) as exc:
            session.execute(update(Member).where(Member.tenant == "t2").values(tenant="t1"))
        _refused(exc)
        session.rollback()
    assert _tenants(engine, Member.__table__) == UNCHANGED


def test_outside_a_rotation_nothing_is_read(engine: Engine, tmp_path: Path) -> None:
    keys = KeyManager(engine, LocalKeyProvider.from_file(tmp_path / "master.key"), live=FAST)
    keys.create_table()
    table = Table(
        "solo", MetaData(),
        Column("id", Integer, primary_key=True, autoincrement=False),
        Column("tenant", String(20)),
        Column("email", EncryptedType(String(100), keys, deterministic=True)),
        UniqueConstraint("tenant", "email"),
    )  # fmt: skip
    table.create(engine)
    with engine.begin() as conn:
        conn.execute(table.insert(), [{"id": 1, "tenant": "a", "email": "x"}, {"id": 2, "tenant": "b", "email": "x"}])
    seen: list[str] = []
    event.listen(engine, "before_cursor_execute", lambda *a: seen.append(a[2]))
    with engine.begin() as conn:
        conn.execute(update(table).where(table.c.id == 2).values(tenant="c"))
    assert [s for s in seen if s.lstrip().upper().startswith("SELECT") and "solo" in s] == []


_LOCK_WAIT = {  # the other writer gives up at once rather than wait for us (in our own thread)
    "postgresql": ("SET LOCAL lock_timeout = '1s'", None),
    "mysql": ("SET SESSION innodb_lock_wait_timeout = 1", "SET SESSION innodb_lock_wait_timeout = DEFAULT"),
    "sqlite": ("PRAGMA busy_timeout = 0", "PRAGMA busy_timeout = 5000"),
}


def _meanwhile(engine: Engine, write: Any, landed: list[Any]) -> Any:
    """A listener that, when the UPDATE reaches the cursor (after the
    library's read), runs ``write`` on another connection and commits; what
    happened lands in ``landed`` (True, or the error the writer got)."""

    def run(conn: Any, cursor: Any, statement: str, *_: Any) -> None:
        if landed or not statement.lstrip().upper().startswith("UPDATE MEMBERS SET TENANT"):
            return
        landed.append(None)  # once: the other writer's own UPDATE comes through here too
        with engine.connect() as other:
            give_up, restore = _LOCK_WAIT[other.dialect.name]
            try:
                with other.begin():
                    other.exec_driver_sql(give_up)
                    write(other)
                landed[0] = True
            except OperationalError as exc:
                landed[0] = exc
            finally:
                if restore:
                    other.exec_driver_sql(restore)
                    other.commit()

    return run


def _row_4(table: Table) -> Any:
    return lambda other: other.execute(table.insert(), [{"id": 4, "tenant": "t4", "email": "x@example.org"}])


def _waited(landed: list[Any]) -> bool:
    """The other writer waited for our transaction (and gave up)."""
    if len(landed) != 1 or not isinstance(landed[0], OperationalError):
        return False
    message = str(landed[0].orig)
    return (
        landed[0].orig.args[0] == 1205
        if "mysql" in type(landed[0].orig).__module__
        else ("database is locked" in message or "lock timeout" in message)
    )


@pytest.mark.backends("postgresql")
def test_a_row_that_begins_to_match_the_where_clause_meanwhile_is_refused(engine: Engine, tmp_path: Path) -> None:
    """PostgreSQL's READ COMMITTED UPDATE sees a row committed after the
    library's read of the values its rows keep: row 4 (t4, x) lands in
    between and would become (t1, x), row 1's tuple under the other key.
    (MariaDB's locking read holds the gap and SQLite's write lock is taken
    before the read: the other writer waits, see below.)"""
    _, Member, _, _ = _setup(engine, tmp_path)
    table = Member.__table__
    landed: list[Any] = []
    listener = _meanwhile(engine, _row_4(table), landed)
    event.listen(engine, "before_cursor_execute", listener)
    try:
        with pytest.raises(UncheckedUpdateError) as exc:
            with engine.begin() as conn:
                conn.execute(update(table).where(table.c.id >= 3).values(tenant="t1"))
    finally:
        event.remove(engine, "before_cursor_execute", listener)
    assert landed == [True]
    assert exc.value.table == "members" and "x@example.org" not in str(exc.value)
    assert _tenants(engine, table) == {**UNCHANGED, 4: "t4"}


def _members(engine: Engine, tmp_path: Path) -> Any:
    _, Member, _, _ = _setup(engine, tmp_path)
    return Member.__table__


@contextlib.contextmanager
def _row_4_lands_meanwhile(engine: Engine, table: Any, landed: list[Any]) -> Iterator[Any]:
    """An executemany UPDATE by ``id >= :low``; another connection tries to
    commit row 4 just before it runs (``landed`` says how that went)."""
    listener = _meanwhile(engine, _row_4(table), landed)
    event.listen(engine, "before_cursor_execute", listener)
    try:
        yield update(table).where(table.c.id >= bindparam("low")).values(tenant=bindparam("to"))
    finally:
        event.remove(engine, "before_cursor_execute", listener)


@pytest.mark.backends("postgresql")
def test_a_row_that_begins_to_match_an_executemany_meanwhile_is_refused(engine: Engine, tmp_path: Path) -> None:
    """The same with an executemany: its row count is the sum over its
    parameter sets, compared with the sum of the rows they read (the first
    set reads row 3, the second none; row 4 lands and the first set changes
    it too)."""
    table, landed = _members(engine, tmp_path), []
    with _row_4_lands_meanwhile(engine, table, landed) as stmt:
        with pytest.raises(UncheckedUpdateError) as exc:
            with engine.begin() as conn:
                conn.execute(stmt, [{"low": 3, "to": "t1"}, {"low": 9, "to": "t1"}])
    assert landed == [True]
    assert exc.value.table == "members" and "x@example.org" not in str(exc.value)
    assert _tenants(engine, table) == {**UNCHANGED, 4: "t4"}


@pytest.mark.backends("mysql", "sqlite")
def test_elsewhere_a_row_cannot_begin_to_match_meanwhile(engine: Engine, tmp_path: Path) -> None:
    """MariaDB: the library's locking read (``FOR UPDATE``) holds the gap its
    WHERE covers; SQLite: the library takes the write lock before its read.
    Either way the other writer's row waits for our transaction (here it
    gives up) and the executemany changes only the row it read."""
    table, landed = _members(engine, tmp_path), []
    with _row_4_lands_meanwhile(engine, table, landed) as stmt:
        with engine.begin() as conn:
            conn.execute(stmt, [{"low": 3, "to": "t1"}, {"low": 9, "to": "t1"}])
    assert _waited(landed), landed
    assert _tenants(engine, table) == {**UNCHANGED, 3: "t1"}


def test_a_row_read_cannot_change_meanwhile(engine: Engine, tmp_path: Path) -> None:
    """The rows read stay as read until the UPDATE: another writer's change
    of row 3 to (t3, x) would, once row 3 moves to t1, store (t1, x) twice
    without the check seeing x. It waits for our transaction (PostgreSQL,
    MariaDB: the row lock of ``FOR UPDATE``; SQLite: the write lock taken
    before the read) and gives up here."""
    _, Member, _, _ = _setup(engine, tmp_path)
    table = Member.__table__
    landed: list[Any] = []
    change = lambda other: other.execute(update(table).where(table.c.id == 3).values(email="x@example.org"))  # noqa: E731
    listener = _meanwhile(engine, change, landed)
    event.listen(engine, "before_cursor_execute", listener)
    try:
        with engine.begin() as conn:
            conn.execute(update(table).where(table.c.id == 3).values(tenant="t1"))
    finally:
        event.remove(engine, "before_cursor_execute", listener)
    assert _waited(landed), landed
    assert _tenants(engine, table) == {**UNCHANGED, 3: "t1"}


@pytest.mark.backends("postgresql")
def test_an_executemany_whose_sets_cancel_out_is_refused(engine: Engine, tmp_path: Path) -> None:
    """The first set moves row 3 out of the second set's WHERE (both read
    it) while row 4 (t3, x) lands and joins the first: the sum of the rows
    each set read (2) equals the rows changed (2), and (t1, x) would be
    stored under both keys, x never read. The distinct rows read (1) do not."""
    table, landed = _members(engine, tmp_path), []
    listener = _meanwhile(
        engine, lambda o: o.execute(table.insert(), [{"id": 4, "tenant": "t3", "email": "x@example.org"}]), landed
    )
    event.listen(engine, "before_cursor_execute", listener)
    stmt = update(table).where(table.c.tenant == bindparam("was")).values(tenant=bindparam("to"))
    try:
        with pytest.raises(UncheckedUpdateError) as exc:
            with engine.begin() as conn:
                conn.execute(stmt, [{"was": "t3", "to": "t1"}, {"was": "t3", "to": "t9"}])
    finally:
        event.remove(engine, "before_cursor_execute", listener)
    assert landed == [True]
    assert exc.value.table == "members" and "x@example.org" not in str(exc.value)
    assert _tenants(engine, table) == {**UNCHANGED, 4: "t3"}


def _partners(engine: Engine, rows: list[dict[str, int]]) -> Table:
    partners = Table("partners", MetaData(), Column("id", Integer, primary_key=True), Column("member", Integer))
    partners.create(engine)
    with engine.begin() as conn:
        conn.execute(partners.insert(), rows)
    return partners


@pytest.mark.backends("postgresql")
def test_an_update_joining_another_table_counts_each_row_once(engine: Engine, tmp_path: Path) -> None:
    """``UPDATE members ... FROM partners``: row 3 has two partners, so the
    read (a join) returns it twice; row 4 (t4, x), whose partner is already
    there, lands meanwhile and would become (t1, x). Counted by primary key,
    two rows changed against one read: refused."""
    table, landed = _members(engine, tmp_path), []
    partners = _partners(engine, [{"id": 1, "member": 3}, {"id": 2, "member": 3}, {"id": 3, "member": 4}])
    listener = _meanwhile(engine, _row_4(table), landed)
    event.listen(engine, "before_cursor_execute", listener)
    try:
        with pytest.raises(UncheckedUpdateError):
            with engine.begin() as conn:
                conn.execute(update(table).where(table.c.id == partners.c.member).values(tenant="t1"))
    finally:
        event.remove(engine, "before_cursor_execute", listener)
    assert landed == [True]
    assert _tenants(engine, table) == {**UNCHANGED, 4: "t4"}


def test_an_update_joining_another_table_is_checked(engine: Engine, tmp_path: Path) -> None:
    """Without a writer in between, the joined UPDATE is checked like any:
    row 2 moving to t1 is refused, row 3 passes (the partners' rows are
    locked by the read, so none can leave the join meanwhile)."""
    table = _members(engine, tmp_path)
    partners = _partners(engine, [{"id": 1, "member": 2}, {"id": 2, "member": 3}, {"id": 3, "member": 3}])
    with pytest.raises(DuplicateValueError) as exc:
        with engine.begin() as conn:
            conn.execute(update(table).where(table.c.id == partners.c.member, partners.c.id == 1).values(tenant="t1"))
    _refused(exc)
    with engine.begin() as conn:
        conn.execute(update(table).where(table.c.id == partners.c.member, partners.c.id >= 2).values(tenant="t1"))
    assert _tenants(engine, table) == {**UNCHANGED, 3: "t1"}


def test_an_update_by_a_subquery_is_refused_where_its_rows_cannot_be_locked(engine: Engine, tmp_path: Path) -> None:
    """``WHERE id IN (SELECT ...)``: neither PostgreSQL's nor InnoDB's locking
    read locks the subquery's rows, so a row could leave the WHERE while
    another joins it, the count unchanged. Refused before it runs there;
    SQLite holds its write lock from before the read, so it is checked."""
    table = _members(engine, tmp_path)
    partners = _partners(engine, [{"id": 1, "member": 2}])
    stmt = update(table).where(table.c.id.in_(select(partners.c.member))).values(tenant="t1")
    if engine.dialect.name == "sqlite":
        with pytest.raises(DuplicateValueError):
            with engine.begin() as conn:
                conn.execute(stmt)
    else:
        with pytest.raises(UncheckedUpdateError, match="subquery") as exc:
            with engine.begin() as conn:
                conn.execute(stmt)
        assert exc.value.table == "members" and "x@example.org" not in str(exc.value)
    assert _tenants(engine, table) == UNCHANGED


def test_an_update_without_where_reads_and_checks_every_row(engine: Engine, tmp_path: Path) -> None:
    """No WHERE: every row's email is read (the whole table, locked) and
    checked; moving all to t1 stores (t1, x) twice: refused."""
    table = _members(engine, tmp_path)
    with pytest.raises(DuplicateValueError) as exc:
        with engine.begin() as conn:
            conn.execute(update(table).values(tenant="t1"))
    _refused(exc)
    assert _tenants(engine, table) == UNCHANGED


@pytest.mark.backends("postgresql")
def test_asyncpg_executemany_is_checked_by_primary_key_or_refused(engine: Engine, db_url: str, tmp_path: Path) -> None:
    """asyncpg reports no row count for an executemany, so nothing shows a row
    that began to match meanwhile. By primary key (the ORM's form), each set
    matches at most the row it read and locked: checked. By anything else:
    refused before it runs."""
    import asyncio

    from sqlalchemy.ext.asyncio import create_async_engine

    from support.backends import async_url

    keys, Member, _, _ = _setup(engine, tmp_path)
    table = Member.__table__
    aengine = keys.bind(create_async_engine(async_url(db_url)))
    by_key = update(table).where(table.c.id == bindparam("row")).values(tenant=bindparam("to"))
    by_tenant = update(table).where(table.c.tenant == bindparam("was")).values(tenant=bindparam("to"))

    async def run(stmt: Any, rows: list[dict[str, Any]]) -> None:
        async with aengine.begin() as conn:
            await conn.execute(stmt, rows)

    async def main() -> None:
        try:
            with pytest.raises(UncheckedUpdateError, match="no row count"):
                await run(by_tenant, [{"was": "t3", "to": "t8"}, {"was": "t9", "to": "t7"}])
            with pytest.raises(DuplicateValueError):
                await run(by_key, [{"row": 3, "to": "t9"}, {"row": 2, "to": "t1"}])
            assert _tenants(engine, table) == UNCHANGED
            await run(by_key, [{"row": 3, "to": "t9"}, {"row": 2, "to": "t8"}])
        finally:
            await aengine.dispose()

    asyncio.run(main())
    assert _tenants(engine, table) == {1: "t1", 2: "t8", 3: "t9"}


def test_values_are_checked_and_locked_in_chunks(engine: Engine, tmp_path: Path, monkeypatch: Any) -> None:
    """A write of many values is checked and its guards locked in chunks (a
    PostgreSQL statement takes at most 65,535 parameters: an UPDATE of every
    row of a 40,000-row table failed before). Chunks of 2 here: a duplicate
    found in a later chunk is refused; a row found by two chunks is one row."""
    from sa_envelope.columns import guardrows, uniqueness

    monkeypatch.setattr(uniqueness, "CHUNK", 2)
    monkeypatch.setattr(guardrows, "_CHUNK", 2)
    table = _members(engine, tmp_path)
    with engine.begin() as conn:
        conn.execute(table.insert(), [{"id": 10 + i, "tenant": "t5", "email": f"u{i}@example.org"} for i in range(5)])
    with pytest.raises(DuplicateValueError) as exc:
        with engine.begin() as conn:  # no WHERE: every email read; rows 1 and 2 would be (t6, x)
            conn.execute(update(table).values(tenant="t6"))
    _refused(exc)
    with pytest.raises(DuplicateValueError) as exc:
        with engine.begin() as conn:
            rows = [{"id": 20 + i, "tenant": "t1", "email": f"v{i}@example.org"} for i in range(4)]
            conn.execute(table.insert(), [*rows, {"id": 30, "tenant": "t1", "email": "x@example.org"}])
    _refused(exc)
    assert _tenants(engine, table) == {**UNCHANGED, **{10 + i: "t5" for i in range(5)}}
