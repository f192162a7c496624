"""Blind indexes: normalised, keyed, truncated HMACs kept in step by the ORM;
lookups return exactly the matching rows, never a colliding one."""

from __future__ import annotations

import random
from typing import Any, Iterator

import pytest
from sqlalchemy import Column, Integer, String, func, insert, select, text, update
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Mapped, Session, mapped_column

from sa_envelope import (
    BlindIndexType,
    ConfigurationError,
    EncryptedType,
    KeyManager,
    UnsupportedQueryError,
    lookup,
    normalize_email_folded as normalize_email,  # Unicode case folding (issue 12: an opt-in)
    normalize_phone,
)
from support.models import new_base

NAMES = ["ada", "alan", "grace", "édith", "ßtraße", "zoë", "o'neil", "李", "x_y", "a%b"]
DOMAINS = ["example.com", "EXAMPLE.org", "mail.test"]


def _variants(email: str) -> list[str]:
    """Spellings a user might type for the same address."""
    return [email, email.upper(), email.title(), f"  {email}\t", email.swapcase()]


def make_user(keys: KeyManager) -> type:
    Base = new_base()

    class User(Base):
        __tablename__ = "users"
        id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
        email: Mapped[str | None] = mapped_column(EncryptedType(String(200), keys))
        # 8 bits: collisions are certain, so the re-check is always exercised
        email_index: Mapped[bytes | None] = mapped_column(
            BlindIndexType("email", keys, normalizer=normalize_email, bits=8), index=True
        )
        email_index_wide: Mapped[bytes | None] = mapped_column(
            BlindIndexType("email", keys, normalizer=normalize_email, bits=64)
        )
        phone: Mapped[str | None] = mapped_column(EncryptedType(String(40), keys))
        phone_index: Mapped[bytes | None] = mapped_column(
            BlindIndexType("phone", keys, normalizer=normalize_phone, bits=32), index=True
        )

    return User


@pytest.fixture
def keys(local_keys: KeyManager) -> KeyManager:
    return local_keys


@pytest.fixture
def users(engine: Engine, keys: KeyManager) -> Iterator[tuple[type, list[str | None]]]:
    User = make_user(keys)
    User.metadata.create_all(engine)
    rng = random.Random(11)
    addresses = [f"{n}@{d}" for n in NAMES for d in DOMAINS]
    # repeated addresses in varied spellings, and ~80 one-off ones: with ~110
    # distinct values an 8-bit index collides (P(no collision) ~ e^-23)
    emails = [
        None if rng.random() < 0.08
        else f"user{i}@Example.com" if rng.random() < 0.4
        else rng.choice(_variants(rng.choice(addresses)))
        for i in range(200)
    ]
    with Session(engine) as session:
        session.add_all(
            User(id=i, email=e, phone=f"+1 (555) 01{i % 7}-00{i % 3}0" if i % 4 else None)
            for i, e in enumerate(emails)
        )
        session.commit()
    yield User, emails


def _ids(objs: list[Any]) -> list[int]:
    return sorted(o.id for o in objs)


def test_case_insensitive_email_lookup_finds_exactly_the_matching_rows(
    engine: Engine, users: tuple[type, list[Any]]
) -> None:
    User, emails = users
    probes = [f"{n}@{d}" for n in NAMES for d in DOMAINS] + ["nobody@example.com", "ADA@EXAMPLE.NET"] + [
        f"user{i}@example.com" for i in range(0, 200, 9)
    ]
    saw_false_positive = False
    with Session(engine) as session:
        for probe in probes:
            expected = sorted(
                i for i, e in enumerate(emails) if e is not None and normalize_email(e) == normalize_email(probe)
            )
            for spelling in _variants(probe):
                assert _ids(lookup(session, User.email_index, spelling)) == expected, spelling
            assert _ids(lookup(session, User.email_index_wide, probe)) == expected
            candidates = session.scalars(select(User).where(User.email_index.matches(probe))).all()
            assert set(expected) <= {c.id for c in candidates}
            saw_false_positive |= len(candidates) > len(expected)
    assert saw_false_positive, "8-bit index must collide, or the re-check is untested"


def test_phone_lookup_with_extra_criteria(engine: Engine, users: tuple[type, list[Any]]) -> None:
    User, _ = users
    with Session(engine) as session:
        all_users = session.scalars(select(User)).all()
        expected = sorted(u.id for u in all_users if u.phone and normalize_phone(u.phone) == "+15550130000")
        assert expected
        assert _ids(lookup(session, User.phone, "+1 555 013 0000")) == expected
        assert _ids(lookup(session, User.phone, "+1-555-013-0000", User.id >= 100)) == [
            i for i in expected if i >= 100
        ]
        both = session.scalars(select(User.id).where(User.phone_index.matches_any(["+15550130000", "+15550110010"])))
        assert set(expected) <= set(both)


def test_index_follows_inserts_updates_and_nulls(engine: Engine, users: tuple[type, list[Any]]) -> None:
    User, emails = users
    with Session(engine) as session:
        user = session.get(User, 0)
        assert user is not None
        user.email = "Brand.New@Example.com"
        session.commit()
        assert _ids(lookup(session, User.email_index, "brand.new@example.COM")) == [0]
        if emails[0] is not None:
            assert 0 not in _ids(lookup(session, User.email_index, emails[0]))
        user.email = None
        session.commit()
        assert session.scalar(select(User.email_index).where(User.id == 0)) is None
        assert lookup(session, User.email_index, "brand.new@example.com") == []
        user.phone = "+44 20 7946 0000"  # an update of another column keeps the email index
        session.add(User(id=500, email="late@example.com"))
        session.commit()
        assert _ids(lookup(session, User.email_index, "LATE@example.com")) == [500]
        assert _ids(lookup(session, User.phone, "+442079460000")) == [0]


def test_stored_index_reveals_only_a_truncated_keyed_digest(
    engine: Engine, keys: KeyManager, users: tuple[type, list[Any]]
) -> None:
    User, _ = users
    with Session(engine) as session:
        session.add(User(id=900, email="same@example.com"))
        session.add(User(id=901, email="SAME@example.com"))
        session.commit()
    with engine.connect() as conn:
        rows = conn.execute(
            text("SELECT email_index, email_index_wide FROM users WHERE id IN (900, 901) ORDER BY id")
        ).all()
        t = keys.table
        key_rows = conn.execute(select(t.c.scope, t.c.algorithm).where(t.c.owner_table == "users")).all()
    (narrow1, wide1), (narrow2, wide2) = [(bytes(a), bytes(b)) for a, b in rows]
    assert len(narrow1) == 1 and len(wide1) == 8
    assert narrow1 == narrow2 and wide1 == wide2  # same after normalising
    # each index column has its own subkey: the wide digest is no extension of the narrow one
    with engine.connect() as conn:
        pairs = conn.execute(text("SELECT email_index, email_index_wide FROM users WHERE email_index IS NOT NULL")).all()
    assert sum(bytes(w)[:1] == bytes(n) for n, w in pairs) < len(pairs) / 4
    assert sorted(key_rows) == [("blind-index", "HMAC-SHA256"), ("table", "AES-256-GCM")]
    # a fresh manager (another process) derives the same index from the stored key
    other = KeyManager(engine, keys.provider)
    User2 = make_user(other)
    with Session(engine) as session:
        assert _ids(lookup(session, User2.email_index, "same@EXAMPLE.com")) == [900, 901]


def test_index_misuse_is_refused(engine: Engine, users: tuple[type, list[Any]], keys: KeyManager) -> None:
    User, _ = users
    with Session(engine) as session:
        with pytest.raises(UnsupportedQueryError, match="matches"):
            session.execute(select(User).where(User.email_index == "ada@example.com"))
        session.rollback()
    with pytest.raises(ConfigurationError, match="bits"):
        BlindIndexType("email", keys, bits=12)
    with pytest.raises(ConfigurationError, match="context"):
        BlindIndexType("email", keys, context="no-dot")
    shared = BlindIndexType("email", keys)
    Column("a", shared)
    with pytest.raises(ConfigurationError, match="two columns"):
        Column("b", shared)
    with pytest.raises(ConfigurationError, match="blind indexes"):
        lookup(Session(engine), User.id, 1)
    with pytest.raises(UnsupportedQueryError):
        select(User).where(User.email.like("%@example.com"))
    assert session.scalar(select(func.count()).select_from(User)) == 200


def test_core_insert_sets_the_index_with_digest(engine: Engine, keys: KeyManager) -> None:
    User = make_user(keys)
    User.metadata.create_all(engine)
    users = User.__table__
    narrow, wide = users.c.email_index.type, users.c.email_index_wide.type
    email = "Core@Example.com"
    with engine.begin() as conn, keys.use_connection(conn):
        conn.execute(
            users.insert().values(id=1, email=email, email_index=narrow.digest(email), email_index_wide=wide.digest(email))
        )
    with Session(engine) as session:
        assert _ids(lookup(session, User.email_index, "core@example.com")) == [1]
        assert User.email_index.type is narrow


def test_statements_that_would_leave_an_index_stale_are_refused(engine: Engine, keys: KeyManager) -> None:
    """Core and ORM bulk statements skip the flush that keeps indexes in
    step: writing the source without the index raises instead of leaving
    rows that lookups silently miss."""
    User = make_user(keys)
    User.metadata.create_all(engine)
    users = User.__table__
    stale = [
        (users.insert().values(id=1, email="a@example.com"), None),
        (insert(User), [{"id": 2, "email": "b@example.com"}, {"id": 3, "email": "c@example.com"}]),
        (update(User).where(User.id == 1).values(email="d@example.com"), None),
        (update(User), [{"id": 1, "email": "e@example.com"}]),
    ]
    with Session(engine) as session:
        session.add(User(id=1, email="first@example.com", phone="+1 555"))
        session.commit()
        for stmt, rows in stale:
            with pytest.raises(UnsupportedQueryError, match="blind index"):
                session.execute(stmt, rows)
            session.rollback()
        # writes that do not touch an indexed source are fine
        session.execute(update(User).where(User.id == 1).values(id=1))
        # a change the index cannot see (case only) still goes through the ORM
        user = session.get(User, 1)
        user.email = "FIRST@example.com"
        session.commit()
        assert _ids(lookup(session, User.email_index, "first@EXAMPLE.com")) == [1]
        assert session.get(User, 1).email == "FIRST@example.com"


def test_a_rolled_back_first_index_key_is_never_used(engine: Engine, keys: KeyManager) -> None:
    User = make_user(keys)
    User.metadata.create_all(engine)
    with Session(engine) as session:
        session.add(User(id=1, email="gone@example.com"))
        session.flush()  # creates the blind-index key in this transaction
        session.rollback()
        session.add(User(id=2, email="kept@example.com"))
        session.commit()
        assert _ids(lookup(session, User.email_index, "KEPT@example.com")) == [2]
    fresh = KeyManager(engine, keys.provider)
    Fresh = make_user(fresh)
    with Session(engine) as session:
        assert _ids(lookup(session, Fresh.email_index, "kept@EXAMPLE.com")) == [2]


def test_pinned_context_survives_a_column_rename(engine: Engine, keys: KeyManager) -> None:
    """The subkey is derived from the index's table and column names;
    ``context=`` pins them, so a renamed index column keeps matching."""

    def model(column_name: str) -> type:
        Base = new_base()

        class User(Base):
            __tablename__ = "users"
            id: Mapped[int] = mapped_column(primary_key=True)
            email: Mapped[str] = mapped_column(EncryptedType(String(200), keys, context="users.email"))
            idx: Mapped[bytes | None] = mapped_column(
                column_name, BlindIndexType("email", keys, normalizer=normalize_email, context="users.email_index")
            )

        return User

    Before = model("email_index")
    Before.metadata.create_all(engine)
    with Session(engine) as session:
        session.add(Before(id=1, email="Pinned@example.com"))
        session.commit()
    with engine.begin() as conn:
        conn.execute(text("ALTER TABLE users RENAME COLUMN email_index TO email_bidx"))
    After = model("email_bidx")
    with Session(engine) as session:
        assert _ids(lookup(session, After.idx, "pinned@EXAMPLE.com")) == [1]
