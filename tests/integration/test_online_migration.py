"""Encrypting a column online: real Alembic runs (expand, contract, the reverse),
the CLI backfill, and the application's dual writes, reads and queries in between."""

from __future__ import annotations

import subprocess
import time
from datetime import datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from alembic import command
from alembic.config import Config
from sqlalchemy import (
    JSON, Column, DateTime, Integer, LargeBinary, MetaData, Numeric, String, Table, delete, insert, inspect, select, text, update,
)
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Mapped, Session, mapped_column

from sa_envelope import EncryptedType, KeyManager, LocalKeyProvider, MigrationIncompleteError, UnsupportedQueryError
from sa_envelope.cli import main as cli_main
from sa_envelope.errors import ClaimLostError
from sa_envelope.jobs.claims import Claims
from support.models import new_base
from support.rotation import PYTHON, ROOT, subprocess_env

INI = str(ROOT / "migrations_example" / "online.ini")
ROWS = 1200


def email(i: int) -> str | None:
    return f"user{i}@example.org" if i % 9 else None


def migrating_model(keys: KeyManager) -> Any:
    """The release deployed between expand and contract."""

    class User(new_base()):
        __tablename__ = "users"
        id: Mapped[int] = mapped_column(primary_key=True)
        email: Mapped[str | None] = mapped_column(
            "email__encrypted", EncryptedType(String(200), keys, deterministic=True, migrating_from="email")
        )
        email_plain: Mapped[str | None] = mapped_column("email", String(200))

    return User


def final_model(keys: KeyManager) -> Any:
    class User(new_base()):
        __tablename__ = "users"
        id: Mapped[int] = mapped_column(primary_key=True)
        email: Mapped[str | None] = mapped_column(EncryptedType(String(200), keys, deterministic=True))

    return User


def encrypt_column(db_url: str, key_file: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    args = ["encrypt-column", "--url", db_url, "--table", "users", "--column", "email", "--deterministic",
            "--cmk", f"local:{key_file}", "--batch", "100", *extra]
    result = subprocess.run([PYTHON, "-m", "sa_envelope", *args], env=subprocess_env(),
                            cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def test_online_encrypt_expand_backfill_contract_and_back(
    engine: Engine, db_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    key_file = tmp_path / "master.key"
    monkeypatch.setenv("SA_ENVELOPE_DATABASE_URL", db_url)
    monkeypatch.setenv("SA_ENVELOPE_CMK", f"local:{key_file}")
    config = Config(INI)
    command.upgrade(config, "o001")
    users = Table("users", MetaData(), autoload_with=engine)
    with engine.begin() as conn:
        conn.execute(insert(users), [{"id": i, "email": email(i)} for i in range(1, ROWS + 1)])

    command.upgrade(config, "o002")  # expand
    keys = KeyManager(engine, LocalKeyProvider.from_file(key_file))
    User = migrating_model(keys)
    expected = {i: email(i) for i in range(1, ROWS + 1)}
    with Session(engine) as session:  # the dual-writing release, before any backfill
        assert session.get(User, 5).email == "user5@example.org"  # read from the plaintext half
        session.get(User, 5).email = "changed5@example.org"
        session.add(User(id=ROWS + 1, email="new@example.org"))
        session.commit()
        expected[5], expected[ROWS + 1] = "changed5@example.org", "new@example.org"
        # equality matches both halves: a backfilled (dual-written) row and a plaintext-only one
        found = session.scalars(select(User.id).where(User.email.in_(["changed5@example.org", "user7@example.org"])))
        assert sorted(found) == [5, 7]
        assert session.scalars(select(User.id).where(User.email == "user5@example.org")).all() == []
    with engine.begin() as conn:  # Core: one half given, both written
        conn.execute(update(User.__table__).where(User.__table__.c.id == 8).values(email__encrypted="core8@example.org"))
        expected[8] = "core8@example.org"
    with engine.connect() as conn:
        row = conn.execute(text("SELECT email FROM users WHERE id = 8")).one()
        assert row.email == "core8@example.org"

    with pytest.raises(MigrationIncompleteError, match=r"users\.email: \d+ rows have no value in email__encrypted"):
        command.upgrade(config, "o003")  # contract too early: refused, nothing dropped
    assert "email" in {c["name"] for c in inspect(engine).get_columns("users")}

    workers = "1" if engine.dialect.name == "sqlite" else "2"
    first = encrypt_column(db_url, key_file, "--workers", workers)
    filled = sum(1 for i, v in expected.items() if v is not None) - 3  # rows 5, 8 and the new one were dual-written
    assert f": {filled} rows written" in first.stdout, first.stdout
    again = encrypt_column(db_url, key_file, "--workers", workers)
    assert ": 0 rows written" in again.stdout and "KMS calls: 0" in again.stdout, again.stdout

    with engine.begin() as conn:  # an instance of the old release, still running: plaintext only
        conn.execute(text("UPDATE users SET email = 'stale@example.org' WHERE id = 10"))
    with pytest.raises(MigrationIncompleteError, match=r"1 rows have no value, or another value than email"):
        command.upgrade(config, "o003")  # verify=True opened every shadow
    expected[10] = "stale@example.org"
    repaired = encrypt_column(db_url, key_file, "--restart")
    assert ": 1 rows written" in repaired.stdout, repaired.stdout

    command.upgrade(config, "o003")  # contract
    assert {c["name"] for c in inspect(engine).get_columns("users")} == {"id", "email"}
    keys = KeyManager(engine, LocalKeyProvider.from_file(key_file))
    Final = final_model(keys)
    with Session(engine) as session:
        assert {u.id: u.email for u in session.scalars(select(Final))} == expected
        assert session.scalars(select(Final.id).where(Final.email == "user7@example.org")).all() == [7]
        session.add(Final(id=ROWS + 2, email="user7@example.org"))
        with pytest.raises(IntegrityError):  # the unique index, recreated on the ciphertext
            session.commit()

    command.downgrade(config, "o002")  # the reverse: decrypted back, shadow empty again
    plain = Table("users", MetaData(), autoload_with=engine)
    with engine.connect() as conn:
        assert dict(conn.execute(select(plain.c.id, plain.c.email)).all()) == expected
        assert conn.execute(select(plain.c.email__encrypted).where(plain.c.email__encrypted.is_not(None))).all() == []
    command.downgrade(config, "o001")
    assert {c["name"] for c in inspect(engine).get_columns("users")} == {"id", "email"}


def test_dual_writes_refuse_what_they_cannot_copy(engine: Engine, tmp_path: Path) -> None:
    keys = KeyManager(engine, LocalKeyProvider.from_file(tmp_path / "k.key"))
    keys.create_table()
    User = migrating_model(keys)
    User.metadata.create_all(engine)
    table = User.__table__
    with engine.begin() as conn:
        conn.execute(insert(table), [{"id": 1, "email__encrypted": "a@x"}, {"id": 2, "email": "b@x"}])
        with pytest.raises(UnsupportedQueryError, match="multi-row VALUES"):
            conn.execute(insert(table).values([{"id": 3, "email": "c@x"}, {"id": 4, "email": "d@x"}]))
        with pytest.raises(UnsupportedQueryError, match="different values"):
            conn.execute(insert(table), [{"id": 5, "email": "e@x", "email__encrypted": "f@x"}])
        with pytest.raises(UnsupportedQueryError, match="SQL expression"):
            conn.execute(update(table).values(email=table.c.email + "x"))
    with engine.connect() as conn:
        rows = conn.execute(text("SELECT id, email, email__encrypted FROM users ORDER BY id")).all()
    assert [(r.id, r.email, r.email__encrypted is not None) for r in rows] == [(1, "a@x", True), (2, "b@x", True)]


def test_decrypting_reads_prefer_the_plaintext_shadow(engine: Engine, tmp_path: Path) -> None:
    keys = KeyManager(engine, LocalKeyProvider.from_file(tmp_path / "k.key"))
    keys.create_table()

    class Doc(new_base()):
        __tablename__ = "docs"
        id: Mapped[int] = mapped_column(primary_key=True)
        code: Mapped[str | None] = mapped_column(
            EncryptedType(String(20), keys, deterministic=True, migrating_to="code__plaintext")
        )
        code_plain: Mapped[str | None] = mapped_column("code__plaintext", String(20))

    Doc.metadata.create_all(engine)
    with Session(engine) as session:
        session.add_all([Doc(id=1, code="one"), Doc(id=2, code="two")])
        session.commit()
    with engine.begin() as conn:  # as rows written before the release: ciphertext only
        conn.execute(text("UPDATE docs SET code__plaintext = NULL WHERE id = 2"))
    with Session(engine) as session:
        assert [(d.id, d.code, d.code_plain) for d in session.scalars(select(Doc).order_by(Doc.id))] == [
            (1, "one", "one"), (2, "two", None)]
        assert sorted(session.scalars(select(Doc.id).where(Doc.code.in_(["one", "two"])))) == [1, 2]
        assert session.scalars(select(Doc.id).where(Doc.code.is_(None))).all() == []
    assert cli_main(["decrypt-column", "--url", str(engine.url.render_as_string(hide_password=False)),
                     "--table", "docs", "--column", "code", "--deterministic", "--cmk",
                     f"local:{tmp_path / 'k.key'}"]) == 0
    with engine.connect() as conn:
        assert conn.execute(text("SELECT code__plaintext FROM docs WHERE id = 2")).scalar() == "two"


def test_a_stolen_range_rolls_the_stalled_workers_batch_back(engine: Engine) -> None:
    """Worker A stalls past its lease; B takes the range over from its cursor;
    A's next batch fails its advance and commits nothing."""
    claims = Claims(engine, "test-job", lease=0.05)
    claims.create()
    assert claims.plan(0, 100, 50) and not claims.plan(0, 100, 50)  # planned once
    a = claims.claim("A")
    assert a is not None and (a.lo, a.hi, a.cursor) == (0, 50, 0)
    with engine.begin() as conn:
        claims.advance(conn, a, 20, written=20)
    time.sleep(0.1)  # A stalls: its lease runs out
    b = claims.claim("B")
    assert b is not None and (b.lo, b.cursor) == (0, 20)  # B resumes at A's cursor
    with engine.connect() as conn, pytest.raises(ClaimLostError, match="range 0-50"):
        with conn.begin():
            claims.advance(conn, a, 40, written=20)
    with engine.begin() as conn:
        claims.advance(conn, b, 50, written=30)
    table = claims.table
    with engine.connect() as conn:
        row = conn.execute(select(table.c.cursor, table.c.done, table.c.written).where(table.c.lo == 0)).one()
    assert tuple(row) == (50, True, 50)
    claims.release(b)
    assert claims.pending()[0] == 1 and claims.span_left() == 50


def test_core_selects_read_the_merged_value(engine: Engine, tmp_path: Path) -> None:
    """select(t), select(t.c.shadow), an alias, a subquery and RETURNING return
    the encrypted value where it is set and the plaintext twin's elsewhere, for
    twins of several types; Core equality matches both halves."""
    keys = KeyManager(engine, LocalKeyProvider.from_file(tmp_path / "k.key"))
    keys.create_table()
    t = Table(
        "merged", MetaData(),
        Column("id", Integer, primary_key=True, autoincrement=False),
        Column("email__encrypted", EncryptedType(String(200), keys, deterministic=True, migrating_from="email")),
        Column("email", String(200)),
        Column("doc__encrypted", EncryptedType(JSON, keys, migrating_from="doc")),
        Column("doc", JSON),
        Column("amount__encrypted", EncryptedType(Numeric(10, 2), keys, migrating_from="amount")),
        Column("amount", Numeric(10, 2)),
        Column("seen__encrypted", EncryptedType(DateTime, keys, migrating_from="seen")),
        Column("seen", DateTime),
        Column("n__encrypted", EncryptedType(Integer, keys, scope="row", migrating_from="n")),
        Column("n", Integer),
    )  # fmt: skip
    t.create(engine)
    values = {
        1: ("dual'\"é@x", {"a": [1, "x"]}, Decimal("5.10"), datetime(2024, 1, 2, 3, 4, 5), 7),
        2: ("plain@x", {"b": {"c": None}}, Decimal("3.25"), datetime(2023, 5, 6, 7, 8, 9), -3),
        3: (None, None, None, None, None),
    }
    names = ["email", "doc", "amount", "seen", "n"]
    with engine.begin() as conn:  # row 1 through the dual writes; rows 2 and 3 as written before the release
        conn.execute(t.insert(), [{"id": 1, **dict(zip(names, values[1]))}])
        plain = raw_merged()
        conn.execute(insert(plain), [{"id": i, **dict(zip(names, values[i]))} for i in (2, 3)])
    with engine.connect() as conn:
        assert conn.execute(select(plain.c.email__encrypted).where(plain.c.id == 2)).scalar() is None  # stored: empty
        shadows = [t.c[f"{n}__encrypted"] for n in names]
        merged = {r.id: tuple(r[1:]) for r in conn.execute(select(t.c.id, *shadows))}
        assert merged == values
        whole = {r.id: tuple(getattr(r, f"{n}__encrypted") for n in names) for r in conn.execute(select(t))}
        assert whole == values
        assert conn.execute(select(t.c.email__encrypted).where(t.c.id == 2)).scalar_one() == "plain@x"
        a = t.alias("a")
        assert conn.execute(select(a.c.doc__encrypted).where(a.c.id == 2)).scalar_one() == values[2][1]
        sub = select(t).where(t.c.id > 1).subquery()
        assert dict(conn.execute(select(sub.c.id, sub.c.amount__encrypted)).all()) == {2: values[2][2], 3: None}
        # Core equality matches both halves
        found = conn.execute(select(t.c.id).where(t.c.email__encrypted.in_(["plain@x", "dual'\"é@x"]))).scalars()
        assert sorted(found) == [1, 2]
        assert conn.execute(select(t.c.id).where(t.c.email__encrypted == "plain@x")).scalars().all() == [2]
        assert conn.execute(select(t.c.id).where(t.c.email__encrypted.is_(None))).scalars().all() == [3]
    with Session(engine) as session:  # the ORM reads the same through a mapped class of the table
        class M(new_base()):
            __table__ = t

        assert {m.id: m.email__encrypted for m in session.scalars(select(M))} == {i: v[0] for i, v in values.items()}
    assert engine.dialect.delete_returning  # PostgreSQL, SQLite and MariaDB: RETURNING is merged too
    with engine.begin() as conn:
        gone = conn.execute(delete(t).where(t.c.id == 2).returning(t.c.email__encrypted, t.c.doc__encrypted)).one()
        assert tuple(gone) == values[2][:2]


def raw_merged() -> Table:
    return Table(
        "merged", MetaData(),
        Column("id", Integer, primary_key=True, autoincrement=False),
        *(Column(n, type_) for n, type_ in [("email", String(200)), ("doc", JSON), ("amount", Numeric(10, 2)),
                                            ("seen", DateTime), ("n", Integer)]),
        *(Column(f"{n}__encrypted", LargeBinary) for n in ["email", "doc", "amount", "seen", "n"]),
    )  # fmt: skip
