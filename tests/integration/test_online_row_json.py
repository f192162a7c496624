"""Online migrations of row-scoped and JSON columns, and of a deterministic
column while its key rotates: dual writes, the backfill's compare-and-set,
merged reads and equality on both halves."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import JSON, Column, Integer, LargeBinary, MetaData, String, Table, bindparam, insert, select, text, update
from sqlalchemy.dialects import mysql, postgresql, sqlite
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Mapped, Session, mapped_column

from sa_envelope import DecryptionError, EncryptedType, KeyManager, LivePolicy, LocalKeyProvider, UnsupportedQueryError, faults
from sa_envelope.cli import main as cli_main
from sa_envelope.jobs.backfill import backfill, disagreeing
from sa_envelope.keys import table as kt
from support.models import new_base

ROWS = 40


def _profiles(keys: KeyManager) -> Any:
    class Profile(new_base()):
        __tablename__ = "profiles"
        id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
        notes: Mapped[Any] = mapped_column(
            "notes__encrypted", EncryptedType(JSON, keys, scope="row", migrating_from="notes")
        )
        notes_plain: Mapped[Any] = mapped_column("notes", JSON)

    return Profile


def _raw(metadata: MetaData) -> Table:
    return Table(
        "profiles", metadata,
        Column("id", Integer, primary_key=True, autoincrement=False),
        Column("notes", JSON),
        Column("notes__encrypted", LargeBinary),
    )  # fmt: skip


def test_row_scoped_json_column_migrates_online(engine: Engine, db_url: str, tmp_path: Path, capsys: Any) -> None:
    key_file = tmp_path / "k.key"
    keys = KeyManager(engine, LocalKeyProvider.from_file(key_file))
    keys.create_table()
    raw = _raw(MetaData())
    raw.create(engine)
    expected: dict[int, Any] = {}
    with engine.begin() as conn:  # written before the release, as text with its own spacing (PostgreSQL's json keeps it)
        for i in range(1, ROWS + 1):
            value = None if i % 7 == 0 else {"n": i, "tags": ["a", "b"]}
            notes = None if value is None else f'{{"n":  {i}, "tags": ["a",  "b"]}}'
            conn.execute(text("INSERT INTO profiles (id, notes) VALUES (:id, :notes)"), {"id": i, "notes": notes})
            expected[i] = value
    Profile = _profiles(keys)
    with Session(engine) as session:  # the dual-writing release: ORM update and insert, row keys on each
        assert session.get(Profile, 3).notes == expected[3]  # merged: from the plaintext half
        session.get(Profile, 3).notes = {"changed": 3}
        session.add(Profile(id=ROWS + 1, notes={"new": True}))
        session.commit()
        expected[3], expected[ROWS + 1] = {"changed": 3}, {"new": True}
    with engine.begin() as conn:  # Core: one half set, both written, the row key made by the Core hook
        conn.execute(update(Profile.__table__).where(Profile.__table__.c.id == 5).values(notes={"core": 5}))
        expected[5] = {"core": 5}

    raced: list[int] = []

    def race(point: str) -> None:  # an application write lands between the batch's read and its compare-and-set
        if point == "backfill.batch.before_update" and not raced:
            raced.append(1)
            with engine.begin() as other:
                other.execute(update(Profile.__table__).where(Profile.__table__.c.id == 1).values(notes={"raced": 1}))

    enc = EncryptedType(JSON, keys, scope="row", context="profiles.notes")
    sqlite = engine.dialect.name == "sqlite"  # one writer: no write can land inside a batch's transaction
    with faults.inject(lambda point: None if sqlite else race(point)):
        report = backfill(keys.store, enc, "profiles", "notes", "notes__encrypted", batch_size=10)
    if not sqlite:
        expected[1] = {"raced": 1}
    filled = sum(1 for i, v in expected.items() if v is not None and i not in (3, 5, ROWS + 1))
    assert (report.written, report.conceded) == (filled - (0 if sqlite else 1), 0 if sqlite else 1), str(report)
    assert disagreeing(keys.store, enc, "profiles", "notes", "notes__encrypted", direction="encrypt") == 0

    url = engine.url.render_as_string(hide_password=False)
    args = ["encrypt-column", "--url", url, "--table", "profiles", "--column", "notes", "--scope", "row",
            "--type", "json", "--cmk", f"local:{key_file}"]
    assert cli_main(args) == 0  # a rerun from the CLI: nothing left
    assert ": 0 rows written" in capsys.readouterr().out

    with engine.connect() as conn:
        shadows = dict(conn.execute(select(raw.c.id, raw.c.notes__encrypted)).all())
        assert {i for i, s in shadows.items() if s is not None} == {i for i, v in expected.items() if v is not None}
        assert dict(conn.execute(select(Profile.__table__.c.id, Profile.__table__.c.notes__encrypted)).all()) == expected
    with Session(engine) as session:
        assert {p.id: p.notes for p in session.scalars(select(Profile))} == expected
    keys.shred_row("profiles", 2)  # the backfilled value is under the row's own key
    with engine.connect() as conn:
        notes = Profile.__table__.c.notes__encrypted
        assert conn.execute(select(notes).where(Profile.__table__.c.id == 2)).scalar() is None
        assert conn.execute(select(notes).where(Profile.__table__.c.id == 4)).scalar() == expected[4]


def test_deterministic_migration_matches_both_halves_during_a_rotation(engine: Engine, tmp_path: Path) -> None:
    keys = KeyManager(engine, LocalKeyProvider.from_file(tmp_path / "k.key"), live=LivePolicy(ttl=0.2, grace=1.0))
    keys.create_table()

    class User(new_base()):
        __tablename__ = "people"
        id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
        email: Mapped[str | None] = mapped_column(
            "email__encrypted", EncryptedType(String(100), keys, deterministic=True, migrating_from="email")
        )
        email_plain: Mapped[str | None] = mapped_column("email", String(100))

    User.metadata.create_all(engine)
    t = User.__table__
    with engine.begin() as conn:
        conn.execute(t.insert(), [{"id": i, "email": f"u{i % 5}@x"} for i in range(1, 11)])  # dual: under the old key
        conn.execute(text("INSERT INTO people (id, email) VALUES (11, 'u1@x'), (12, 'u2@x')"))  # plaintext only
    keys.rotate_table_key("people", scope="deterministic")
    time.sleep(max(0.0, keys.live.switched_at("people", kt.SCOPE_DETERMINISTIC) - time.time()))
    keys.live.invalidate()
    with engine.begin() as conn:  # now under the new key
        conn.execute(t.insert(), [{"id": i, "email": f"u{i % 5}@x"} for i in range(13, 21)])
    with Session(engine) as session:
        for value in ["u0@x", "u1@x", "u2@x", "nobody@x"]:
            twin = sorted(session.scalars(select(User.id).where(User.email_plain == value)))
            assert sorted(session.scalars(select(User.id).where(User.email == value))) == twin, value
            assert sorted(session.scalars(select(User.id).where(t.c.email__encrypted == value))) == twin, value
        both = sorted(session.scalars(select(User.id).where(User.email_plain.in_(["u1@x", "u3@x"]))))
        assert sorted(session.scalars(select(User.id).where(User.email.in_(["u1@x", "u3@x"])))) == both
        assert {1, 11, 13} <= set(both)  # a row under each key, and a plaintext-only one
        with pytest.raises(UnsupportedQueryError, match="cannot cover both halves"):  # not expandable: refused, not half answered
            session.execute(select(User.id).where(User.email == bindparam("e")), {"e": "u1@x"}).all()


def _notes_model(keys: KeyManager) -> Any:
    class Note(new_base()):
        __tablename__ = "notes"
        id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
        body: Mapped[str | None] = mapped_column(
            "body__encrypted", EncryptedType(String(50), keys, scope="row", migrating_from="body")
        )
        body_plain: Mapped[str | None] = mapped_column("body", String(50))

    return Note


def test_row_scoped_dual_writes_get_row_keys_on_every_write_path(engine: Engine, tmp_path: Path) -> None:
    keys = KeyManager(engine, LocalKeyProvider.from_file(tmp_path / "k.key"))
    keys.create_table()
    Note = _notes_model(keys)
    Note.metadata.create_all(engine)
    t = Note.__table__
    expected: dict[int, str] = {}
    with Session(engine) as session:
        session.add(Note(id=1, body="orm add"))
        session.add(Note(id=2, body_plain="orm add, plaintext attribute"))
        session.merge(Note(id=3, body="orm merge"))
        session.bulk_insert_mappings(Note, [{"id": 4, "body": "bulk insert mappings"}])
        session.execute(insert(Note), [{"id": 5, "body": "orm bulk insert"}, {"id": 6, "body_plain": "orm bulk 2"}])
        session.commit()
        session.get(Note, 1).body = "orm update"
        session.bulk_update_mappings(Note, [{"id": 4, "body": "bulk update mappings"}])
        session.commit()
    expected |= {1: "orm update", 2: "orm add, plaintext attribute", 3: "orm merge", 4: "bulk update mappings",
                 5: "orm bulk insert", 6: "orm bulk 2"}  # fmt: skip
    with engine.begin() as conn:
        conn.execute(insert(t), [{"id": 7, "body": "core executemany"}, {"id": 8, "body__encrypted": "core 8"}])
        conn.execute(insert(t).values(id=9, body="core values"))
        conn.execute(update(t).where(t.c.id == 9).values(body__encrypted="core update"))
        conn.execute(update(t).where(t.c.id == bindparam("pid")).values(body=bindparam("b")),
                     [{"pid": 7, "b": "core update many 7"}, {"pid": 8, "b": "core update many 8"}])  # fmt: skip
    expected |= {7: "core update many 7", 8: "core update many 8", 9: "core update"}
    with engine.begin() as conn:  # an upsert whose SET writes both halves from the proposed row
        proposed = [{"id": 9, "body": "upsert update"}, {"id": 10, "body": "upsert insert"}]
        for row in proposed:
            conn.execute(_upsert(engine, t, row, both=True))
        expected |= {9: "upsert update", 10: "upsert insert"}
        with pytest.raises(UnsupportedQueryError, match="upsert's SET writes body without body__encrypted"):
            conn.execute(_upsert(engine, t, {"id": 9, "body": "one half"}, both=False))
    with engine.connect() as conn:
        rows = conn.execute(select(t.c.id, t.c.body, t.c.body__encrypted)).all()
        assert {r.id: (r.body, r.body__encrypted) for r in rows} == {i: (v, v) for i, v in expected.items()}
        raw = _raw_notes()
        assert conn.execute(select(raw.c.id).where(raw.c.body__encrypted.is_(None))).all() == []
    with Session(engine) as session:
        assert {n.id: n.body for n in session.scalars(select(Note))} == expected
    with engine.begin() as conn:  # a value copied from another row: its key is bound to that row
        conn.execute(update(raw).where(raw.c.id == 2).values(body__encrypted=select(raw.c.body__encrypted)
                                                                .where(raw.c.id == 1).scalar_subquery()))  # fmt: skip
    with engine.connect() as conn, pytest.raises(DecryptionError, match="bound to another row"):
        conn.execute(select(t.c.id, t.c.body__encrypted)).all()
    with engine.begin() as conn:
        conn.execute(update(t).where(t.c.id == 2).values(body=expected[2]))  # rewritten: both halves, row 2's key
    for i in expected:  # each value is under its own row's key: shredding the row erases it
        keys.shred_row("notes", i)
    with engine.connect() as conn:
        assert set(conn.execute(select(t.c.body__encrypted)).scalars()) == {None}


def _raw_notes() -> Table:
    return Table(
        "notes", MetaData(),
        Column("id", Integer, primary_key=True, autoincrement=False),
        Column("body", String(50)),
        Column("body__encrypted", LargeBinary),
    )  # fmt: skip


def _upsert(engine: Engine, t: Table, row: dict[str, Any], both: bool) -> Any:
    """INSERT ... ON CONFLICT (id) DO UPDATE / ON DUPLICATE KEY UPDATE of ``body`` (and its shadow)."""
    if engine.dialect.name == "mysql":
        stmt = mysql.insert(t).values(row)
        proposed = stmt.inserted
        halves = {"body": proposed.body, **({"body__encrypted": proposed.body__encrypted} if both else {})}
        return stmt.on_duplicate_key_update(halves)
    pg_or_sqlite = {"postgresql": postgresql.insert, "sqlite": sqlite.insert}[engine.dialect.name](t).values(row)
    excluded = pg_or_sqlite.excluded
    halves = {"body": excluded.body, **({"body__encrypted": excluded.body__encrypted} if both else {})}
    return pg_or_sqlite.on_conflict_do_update(index_elements=[t.c.id], set_=halves)


def test_row_scoped_column_decrypts_online(engine: Engine, tmp_path: Path) -> None:
    key_file = tmp_path / "k.key"
    keys = KeyManager(engine, LocalKeyProvider.from_file(key_file))
    keys.create_table()

    class Doc(new_base()):
        __tablename__ = "docs"
        id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
        code: Mapped[str | None] = mapped_column(
            EncryptedType(String(20), keys, scope="row", migrating_to="code__plaintext")
        )
        code_plain: Mapped[str | None] = mapped_column("code__plaintext", String(20))

    Doc.metadata.create_all(engine)
    with Session(engine) as session:
        session.add_all([Doc(id=i, code=f"code {i}" if i % 4 else None) for i in range(1, 21)])
        session.commit()
    with engine.begin() as conn:  # as rows written before the release: ciphertext only
        conn.execute(text("UPDATE docs SET code__plaintext = NULL WHERE id > 10"))
    expected = {i: f"code {i}" if i % 4 else None for i in range(1, 21)}
    with engine.connect() as conn:  # merged: the plaintext shadow where set, else the row's own ciphertext
        assert dict(conn.execute(select(Doc.__table__.c.id, Doc.__table__.c.code)).all()) == expected
    url = engine.url.render_as_string(hide_password=False)
    assert cli_main(["decrypt-column", "--url", url, "--table", "docs", "--column", "code", "--scope", "row",
                     "--cmk", f"local:{key_file}", "--batch", "4"]) == 0  # fmt: skip
    with engine.connect() as conn:
        assert dict(conn.execute(text("SELECT id, code__plaintext FROM docs")).all()) == expected
