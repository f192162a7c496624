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
