"""TypeDecorator inner types: sqlalchemy-utils' PhoneNumberType, ColorType,
JSONType, EmailType and a user's own decorator over String round-trip on
every backend, in every scope, through their own process_bind_param and
process_result_value (a user switching from sqlalchemy-utils keeps the types).
"""

from __future__ import annotations

import os
from typing import Any

from colour import Color
from sqlalchemy import Integer, LargeBinary, String, column, insert, select, table, update
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Mapped, Session, mapped_column
from sqlalchemy.types import TypeDecorator
from sqlalchemy_utils import ColorType, EmailType, JSONType, PhoneNumberType
from sqlalchemy_utils.types.phone_number import PhoneNumber

from sa_envelope import EncryptedType, EncryptionError, KeyManager, LocalKeyProvider
from sa_envelope.envelope import format as fmt
from support.models import new_base
import pytest


class Tags(TypeDecorator[list[str]]):
    """A user's own decorator: a list of tags stored as one comma-separated string."""

    impl = String(200)
    cache_ok = True

    def process_bind_param(self, value: Any, dialect: Any) -> Any:
        return None if value is None else ",".join(sorted(value))

    def process_result_value(self, value: Any, dialect: Any) -> Any:
        return None if value is None else value.split(",")


COLUMNS = ("phone", "phone_det", "color", "data", "email", "tags", "tags_row")


def make_contact(keys: KeyManager) -> Any:
    class Contact(new_base()):
        __tablename__ = "contacts"
        id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
        phone: Mapped[Any] = mapped_column(EncryptedType(PhoneNumberType(region="GB"), keys), nullable=True)
        phone_det: Mapped[Any] = mapped_column(EncryptedType(PhoneNumberType(), keys, deterministic=True), nullable=True)
        color: Mapped[Any] = mapped_column(EncryptedType(ColorType(), keys, scope="row"), nullable=True)
        data: Mapped[Any] = mapped_column(EncryptedType(JSONType(), keys), nullable=True)
        email: Mapped[Any] = mapped_column(EncryptedType(EmailType(), keys, deterministic=True), nullable=True)
        tags: Mapped[Any] = mapped_column(EncryptedType(Tags(), keys), nullable=True)
        tags_row: Mapped[Any] = mapped_column(EncryptedType(Tags(), keys, scope="row"), nullable=True)

    return Contact


def values(i: int) -> dict[str, Any]:
    return {
        "id": i,
        "phone": PhoneNumber(f"020 7946 09{i:02d}", "GB"),
        "phone_det": "+1 202-555-01%02d" % (40 + i),
        "color": Color(["red", "#00ff00", "blue"][i % 3]),
        "data": {"i": i, "ünï": ["cødé", None, 1.5]},
        "email": f"User{i}@Example.COM",
        "tags": ["b", "a", f"t{i}"],
        "tags_row": ["x", f"r{i}"],
    }


def expected(i: int) -> tuple[Any, ...]:
    v = values(i)
    return (
        v["phone"].e164,
        PhoneNumber(v["phone_det"]).e164,
        Color(v["color"]).hex,
        v["data"],
        v["email"].lower(),
        sorted(v["tags"]),
        sorted(v["tags_row"]),
    )


def readable(c: Any) -> tuple[Any, ...]:
    return (
        c.phone.e164, c.phone_det.e164, c.color.hex, c.data, c.email, c.tags, c.tags_row,
    )


def setup(engine: Engine) -> tuple[KeyManager, Any]:
    keys = KeyManager(engine, LocalKeyProvider(os.urandom(32)))
    keys.create_table()
    Contact = make_contact(keys)
    Contact.metadata.create_all(engine)
    return keys, Contact


def assert_envelopes(engine: Engine, ids: list[int]) -> None:
    raw = table("contacts", column("id"), *(column(n, LargeBinary) for n in COLUMNS))
    with engine.connect() as conn:
        stored = {r[0]: r[1:] for r in conn.execute(select(raw))}
    assert sorted(stored) == ids
    for row in stored.values():
        for name, value in zip(COLUMNS, row):
            version, _ = fmt.read_header(bytes(value))
            assert version == (fmt.VERSION_SIV if name in ("phone_det", "email") else fmt.VERSION_GCM)
            assert b"example.com" not in bytes(value).lower()


def test_decorated_inner_types_round_trip_through_the_orm(engine: Engine) -> None:
    keys, Contact = setup(engine)
    with Session(engine) as s:
        s.add_all([Contact(**values(i)) for i in range(3)])
        s.commit()
    assert_envelopes(engine, [0, 1, 2])
    with Session(engine) as s:
        got = [readable(c) for c in s.scalars(select(Contact).order_by(Contact.id))]
        assert isinstance(s.get(Contact, 1).phone, PhoneNumber)
        assert isinstance(s.get(Contact, 1).color, Color)
    assert got == [expected(i) for i in range(3)]


def test_decorated_inner_types_through_core_and_updates(engine: Engine) -> None:
    keys, Contact = setup(engine)
    t = Contact.__table__
    with engine.begin() as conn:
        conn.execute(insert(t), [values(i) for i in range(3)])
        conn.execute(update(t).where(t.c.id == 2).values(tags=["new"], tags_row=["z"], color=Color("white")))
    assert_envelopes(engine, [0, 1, 2])
    with engine.connect() as conn:
        got = [readable(r) for r in conn.execute(select(t).order_by(t.c.id))]
    want = [expected(0), expected(1), expected(2)[:2] + ("#fff",) + expected(2)[3:5] + (["new"], ["z"])]
    assert got == want


def test_deterministic_decorated_columns_filter_by_their_processed_value(engine: Engine) -> None:
    """EmailType lowercases on bind: the query value goes through it too, so
    the lookup is case-insensitive, as it is with sqlalchemy-utils unencrypted."""
    keys, Contact = setup(engine)
    with Session(engine) as s:
        s.add_all([Contact(**values(i)) for i in range(3)])
        s.commit()
    with Session(engine) as s:
        assert s.scalars(select(Contact.id).where(Contact.email == "USER1@example.com")).all() == [1]
        assert s.scalars(select(Contact.id).where(Contact.phone_det == "+12025550142")).all() == [2]


def test_none_stays_null_and_refused_values_name_no_value(engine: Engine) -> None:
    keys, Contact = setup(engine)
    with Session(engine) as s:
        s.add(Contact(id=1))
        s.commit()
    with Session(engine) as s:
        c = s.get(Contact, 1)
        assert (c.phone, c.color, c.data, c.email, c.tags, c.tags_row) == (None,) * 6
        c.phone = "call me, never"
        with pytest.raises(EncryptionError) as err:
            s.commit()
        assert "PhoneNumberType" in str(err.value) and "never" not in str(err.value)
