"""The peers' own test cases, re-expressed against sa-envelope, on every backend.

From sqlalchemy-utils' tests/types/test_encrypted.py (its ``User`` model:
Unicode, a 60-character String token, Boolean, Integer, ``PhoneNumberType``
and ``ColorType`` given as classes, Date, Time, DateTime with microseconds,
``Enum('One')``, ``JSONType``; lookup by an encrypted string; a randomised
column found by no lookup; tampered IV, tag, ciphertext and truncation; two
encryptions of one value differ), and the cases sqlalchemy-encrypted-field,
sqlmodel-encrypted-fields and ormar's encrypted fields test (update a value,
None round trip, unicode, long values), each through the ORM and Core.
"""

from __future__ import annotations

import os
import random
import string
from datetime import date, datetime, time
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session
from sqlalchemy_utils import ColorType, JSONType, PhoneNumberType

from sa_envelope import DecryptionError, EncryptedType, KeyManager, LocalKeyProvider, UnsupportedQueryError
from sa_envelope.envelope import format as fmt
from support.models import new_base

TOKEN = "".join(random.Random(7).choice(string.ascii_letters + string.digits) for _ in range(60))
VALUES = {
    "username": "someone",
    "username_det": "someone",
    "access_token": TOKEN,
    "is_active": True,
    "accounts_num": 2,
    "phone": "(555) 555-5555",
    "color": "#fff",
    "date": date(2010, 10, 2),
    "time": time(10, 12),
    "datetime": datetime(2010, 10, 2, 10, 12, 45, 2334),
    "enum": "One",
    "json": {"key": "value"},
    "notes": "ünïcødé ✓ " * 2000,  # a long value, row-scoped
}


def user_model(keys: KeyManager) -> Any:
    class User(new_base()):
        __tablename__ = "user"
        id = sa.Column(sa.Integer, primary_key=True)
        username = sa.Column(EncryptedType(sa.Unicode(100), keys))
        username_det = sa.Column(EncryptedType(sa.Unicode(100), keys, deterministic=True))
        access_token = sa.Column(EncryptedType(sa.String(60), keys))
        is_active = sa.Column(EncryptedType(sa.Boolean, keys))
        accounts_num = sa.Column(EncryptedType(sa.Integer, keys, deterministic=True))
        phone = sa.Column(EncryptedType(PhoneNumberType, keys))
        color = sa.Column(EncryptedType(ColorType, keys, scope="row"))
        date = sa.Column(EncryptedType(sa.Date, keys))
        time = sa.Column(EncryptedType(sa.Time, keys))
        datetime = sa.Column(EncryptedType(sa.DateTime, keys))
        enum = sa.Column(EncryptedType(sa.Enum("One", name="user_enum_t"), keys))
        json = sa.Column(EncryptedType(JSONType, keys, scope="row"))
        notes = sa.Column(EncryptedType(sa.UnicodeText, keys, scope="row"))

    return User


def setup(engine: Engine) -> tuple[KeyManager, Any]:
    keys = KeyManager(engine, LocalKeyProvider(os.urandom(32)))
    keys.create_table()
    User = user_model(keys)
    User.metadata.create_all(engine)
    return keys, User


def readable(user: Any) -> dict[str, Any]:
    out = {name: getattr(user, name) for name in VALUES}
    out["phone"], out["color"] = str(out["phone"]), out["color"].hex
    return out


@pytest.mark.parametrize("path", ["orm", "core"])
def test_sqlalchemy_utils_user_round_trips(engine: Engine, path: str) -> None:
    keys, User = setup(engine)
    if path == "orm":
        with Session(engine) as s:
            s.add(User(**VALUES))
            s.commit()
    else:
        with engine.begin() as conn:
            conn.execute(sa.insert(User.__table__), VALUES)
    with Session(engine) as s:
        assert readable(s.scalars(sa.select(User)).one()) == VALUES


def test_lookup_by_an_encrypted_string_and_none_for_a_randomised_one(engine: Engine) -> None:
    keys, User = setup(engine)
    with Session(engine) as s:
        s.add_all([User(**VALUES), User(**{**VALUES, "username_det": "other", "accounts_num": 3})])
        s.commit()
    with Session(engine) as s:
        found = s.scalars(sa.select(User).where(User.username_det == "someone")).all()
        assert [u.accounts_num for u in found] == [2]
        assert s.scalars(sa.select(User.id).where(User.accounts_num == 3)).all() == [2]
        with pytest.raises(UnsupportedQueryError):  # sqlalchemy-utils' AES-GCM lookup silently finds nothing
            s.scalars(sa.select(User).where(User.username == "someone")).all()


def test_update_a_value_and_set_it_to_none(engine: Engine) -> None:
    keys, User = setup(engine)
    with Session(engine) as s:
        s.add(User(**VALUES))
        s.commit()
    with Session(engine) as s:
        user = s.scalars(sa.select(User)).one()
        user.username, user.notes, user.json, user.phone = "someone else", "short", None, None
        s.commit()
    with Session(engine) as s:
        user = s.scalars(sa.select(User)).one()
        assert (user.username, user.notes, user.json, user.phone) == ("someone else", "short", None, None)
    with engine.connect() as conn:
        raw = conn.execute(sa.select(sa.type_coerce(User.__table__.c.json, sa.LargeBinary))).scalar_one()
    assert raw is None  # None stays NULL, not an encrypted null


def test_two_encryptions_of_one_value_differ_and_tampering_is_refused(engine: Engine) -> None:
    keys, User = setup(engine)
    with Session(engine) as s:
        s.add_all([User(id=1, username="abcdefgh"), User(id=2, username="abcdefgh")])
        s.commit()
    t = User.__table__
    raw = sa.type_coerce(t.c.username, sa.LargeBinary)
    with engine.connect() as conn:
        first, second = (bytes(v) for v in conn.execute(sa.select(raw).order_by(t.c.id)).scalars())
    assert first != second
    offsets = {"nonce": fmt.HEADER_LEN + 1, "ciphertext": fmt.HEADER_LEN + fmt.NONCE_LEN + 1, "tag": len(first) - 2}
    for what, pos in offsets.items():
        tampered = first[:pos] + bytes([first[pos] ^ 1]) + first[pos + 1 :]
        _expect_refused(engine, User, tampered, what)
    _expect_refused(engine, User, first[:20], "truncated")


def _expect_refused(engine: Engine, User: Any, stored: bytes, what: str) -> None:
    raw = sa.table("user", sa.column("id"), sa.column("username", sa.LargeBinary))  # a database writer
    with engine.begin() as conn:
        conn.execute(sa.update(raw).where(raw.c.id == 1).values(username=stored))
    with Session(engine) as s:
        with pytest.raises(DecryptionError):
            s.get(User, 1).username
        assert s.get(User, 2).username == "abcdefgh", what


def test_ormar_author_types_and_python_defaults_round_trip(engine: Engine) -> None:
    """ormar's Author: many inner types, Python-side defaults (sealed like any
    value), a nullable float left NULL, decimals from a float and a Decimal."""
    import decimal
    import uuid

    keys = KeyManager(engine, LocalKeyProvider(os.urandom(32)))
    keys.create_table()

    class Author(new_base()):
        __tablename__ = "authors"
        id = sa.Column(sa.Integer, primary_key=True)
        name = sa.Column(EncryptedType(sa.String(100), keys))
        uuid_test = sa.Column(EncryptedType(sa.Uuid(as_uuid=False), keys), default=lambda: str(uuid.uuid4()))
        birth_year = sa.Column(EncryptedType(sa.Integer, keys, scope="row"), nullable=True)
        test_text = sa.Column(EncryptedType(sa.Text, keys), default="")
        test_bool = sa.Column(EncryptedType(sa.Boolean, keys), nullable=False)
        test_float = sa.Column(EncryptedType(sa.Float, keys))
        test_float2 = sa.Column(EncryptedType(sa.Float, keys), nullable=True)
        test_datetime = sa.Column(EncryptedType(sa.DateTime, keys), default=datetime.now)
        test_date = sa.Column(EncryptedType(sa.Date, keys, scope="row"), default=date.today)
        test_json = sa.Column(EncryptedType(sa.JSON, keys), default=dict)
        test_bigint = sa.Column(EncryptedType(sa.BigInteger, keys), default=0)
        test_smallint = sa.Column(EncryptedType(sa.SmallInteger, keys), default=0)
        test_decimal = sa.Column(EncryptedType(sa.Numeric(10, 2), keys))
        test_decimal2 = sa.Column(EncryptedType(sa.Numeric(10, 2), keys))
        test_bytes = sa.Column(EncryptedType(sa.LargeBinary(100), keys))

    Author.metadata.create_all(engine)
    with Session(engine) as s:
        s.add(Author(name="Test", birth_year=1988, test_float=1.2, test_bool=True, test_decimal=3.57,
                     test_decimal2=decimal.Decimal(5.5), test_bytes=b"test"))
        s.commit()
    with engine.begin() as conn:  # the same defaults through Core
        conn.execute(sa.insert(Author.__table__), {"name": "Core", "test_bool": False, "test_float": 2.5})
    with Session(engine) as s:
        author, core = s.scalars(sa.select(Author).order_by(Author.id)).all()
    assert (author.name, author.birth_year, author.test_text, author.test_bool) == ("Test", 1988, "", True)
    assert (author.test_float, author.test_float2, author.test_bigint, author.test_smallint) == (1.2, None, 0, 0)
    assert author.test_date == date.today() and author.test_datetime.date() == date.today()
    assert str(uuid.UUID(author.uuid_test)) == author.uuid_test and author.test_json == {}
    assert float(author.test_decimal) == 3.57 and author.test_decimal2 == decimal.Decimal("5.5")
    assert author.test_bytes == b"test"
    assert (core.name, core.test_bool, core.test_float, core.test_json, core.birth_year) == ("Core", False, 2.5, {}, None)
    with engine.connect() as conn:
        raw = conn.execute(sa.select(sa.type_coerce(Author.__table__.c.test_text, sa.LargeBinary))).scalars().all()
    assert all(fmt.read_header(bytes(v))[0] == fmt.VERSION_GCM for v in raw)  # the default "" is sealed too


def test_ormar_many_to_many_related_values_decrypt(engine: Engine) -> None:
    """ormar's Report -> filters -> hash: values of related rows decrypt in eager loads."""
    from sqlalchemy.orm import joinedload, relationship, selectinload

    keys = KeyManager(engine, LocalKeyProvider(os.urandom(32)))
    keys.create_table()
    Base = new_base()
    link = sa.Table(
        "report_filters", Base.metadata,
        sa.Column("report_id", sa.ForeignKey("reports.id"), primary_key=True),
        sa.Column("filter_id", sa.ForeignKey("filters.id"), primary_key=True),
    )

    class Hash(Base):
        __tablename__ = "hashes"
        id = sa.Column(sa.Integer, primary_key=True)
        name = sa.Column(EncryptedType(sa.String(128), keys, deterministic=True))

    class Filter(Base):
        __tablename__ = "filters"
        id = sa.Column(sa.Integer, primary_key=True)
        name = sa.Column(EncryptedType(sa.String(100), keys, scope="row"))
        hash_id = sa.Column(sa.ForeignKey("hashes.id"), nullable=True)
        hash = relationship(Hash)

    class Report(Base):
        __tablename__ = "reports"
        id = sa.Column(sa.Integer, primary_key=True)
        name = sa.Column(sa.String(100))
        filters = relationship(Filter, secondary=link, order_by=Filter.id)

    Base.metadata.create_all(engine)
    with Session(engine) as s:
        s.add(Report(name="Report1", filters=[Filter(name="test1", hash=Hash(name="h1")), Filter(name="test2")]))
        s.commit()
    for option in (joinedload, selectinload):
        with Session(engine) as s:
            report = s.scalars(sa.select(Report).options(option(Report.filters).joinedload(Filter.hash))).unique().one()
            assert [(f.name, f.hash.name if f.hash else None) for f in report.filters] == [("test1", "h1"), ("test2", None)]


def test_python_onupdate_of_a_row_scoped_column_is_sealed_under_the_rows_key(engine: Engine) -> None:
    keys = KeyManager(engine, LocalKeyProvider(os.urandom(32)))
    keys.create_table()

    class Doc(new_base()):
        __tablename__ = "docs"
        id = sa.Column(sa.Integer, primary_key=True, autoincrement=False)
        title = sa.Column(sa.String(50))
        stamp = sa.Column(EncryptedType(sa.String(20), keys, scope="row"), default="created", onupdate="edited")

    Doc.metadata.create_all(engine)
    with Session(engine) as s:
        s.add(Doc(id=1, title="a"))
        s.commit()
    with engine.begin() as conn:
        conn.execute(sa.insert(Doc.__table__), {"id": 2, "title": "b"})
    with Session(engine) as s:
        s.get(Doc, 1).title = "a2"
        s.commit()
    with engine.begin() as conn:
        conn.execute(sa.update(Doc.__table__).where(Doc.__table__.c.id == 2).values(title="b2"))
    with Session(engine) as s:
        assert [(d.id, d.stamp) for d in s.scalars(sa.select(Doc).order_by(Doc.id))] == [(1, "edited"), (2, "edited")]
    with engine.connect() as conn:  # still one key per row
        assert conn.execute(sa.select(sa.func.count()).where(keys.table.c.scope == "row")).scalar() == 2
