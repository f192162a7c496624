"""Every supported inner type round-trips exactly, on every backend.

Through the ORM (add_all, update, merge, refresh, bulk insert) and through
Core (insert, update, select), read back by a *fresh* KeyManager and fresh
models, so nothing is served from the writer's cache or identity map.
"""

from __future__ import annotations

import datetime as dt
import enum
import math
import os
import uuid
from decimal import Decimal
from typing import Any

import pytest
from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Date,
    DateTime,
    Enum,
    Float,
    Integer,
    LargeBinary,
    Numeric,
    String,
    Text,
    Time,
    Uuid,
    insert,
    select,
    text,
    update,
)
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Mapped, Session, mapped_column

from sa_envelope import EncryptedType, KeyManager, LocalKeyProvider
from support.models import new_base


class Mood(enum.Enum):
    calm = "calm"
    bright = "bright"


def inner_types() -> dict[str, Any]:
    return {
        "s": String(200),
        "txt": Text(),
        "i": Integer(),
        "bi": BigInteger(),
        "num": Numeric(30, 10),
        "f": Float(),
        "b": Boolean(),
        "d": Date(),
        "dtn": DateTime(),
        "dta": DateTime(timezone=True),
        "t": Time(),
        "u": Uuid(),
        "e": Enum(Mood),
        "j": JSON(),
        "bin": LargeBinary(),
    }


ROWS: list[dict[str, Any]] = [
    {
        "s": "Ada Lovelace", "txt": "x" * 5000, "i": -7, "bi": 2**62 + 3,
        "num": Decimal("12345.6789012345"), "f": 1 / 3, "b": True,
        "d": dt.date(1815, 12, 10), "dtn": dt.datetime(2024, 2, 29, 23, 59, 59, 999999),
        "dta": dt.datetime(2024, 1, 1, 12, 0, 0, 123456, tzinfo=dt.timezone(dt.timedelta(hours=5, minutes=30))),
        "t": dt.time(8, 30, 15, 250000), "u": uuid.UUID("12345678-1234-5678-1234-567812345678"),
        "e": Mood.bright, "j": {"allergies": ["pénicilline", "日本"], "n": 1.5, "ok": None},
        "bin": b"\x00\xff\x00 binary \x00",
    },
    {
        "s": "", "txt": "é ü 😀 'quotes' \"double\" \\ ;--", "i": 0, "bi": -(2**63),
        "num": Decimal("-0.0000000001"), "f": -math.inf, "b": False,
        "d": dt.date(1, 1, 1), "dtn": dt.datetime(1970, 1, 1),
        "dta": dt.datetime(2030, 6, 30, 0, 0, tzinfo=dt.timezone.utc),
        "t": dt.time(0, 0), "u": uuid.uuid4(), "e": Mood.calm, "j": [1, "two", {"3": [4]}],
        "bin": b"",
    },
    {k: None for k in inner_types()},
]


def make_model(keys: KeyManager) -> type:
    """A fresh declarative model over the same table, bound to ``keys``."""

    Base = new_base()

    attrs: dict[str, Any] = {
        "__tablename__": "ty_all",
        "id": mapped_column(Integer, primary_key=True, autoincrement=False),
        "__annotations__": {"id": Mapped[int]},
    }
    for name, inner in inner_types().items():
        attrs[name] = mapped_column(EncryptedType(inner, keys), nullable=True)
        attrs["__annotations__"][name] = Mapped[Any]
    return type("AllTypes", (Base,), attrs)


def fresh_reader(engine: Engine, key_bytes: bytes) -> tuple[KeyManager, type]:
    keys = KeyManager(engine, LocalKeyProvider(key_bytes))
    return keys, make_model(keys)


def assert_row_equal(obj: Any, expected: dict[str, Any]) -> None:
    for name, value in expected.items():
        got = getattr(obj, name) if not isinstance(obj, dict) else obj[name]
        assert got == value and type(got) is type(value), name
        if isinstance(value, dt.datetime) and value.tzinfo is not None:
            assert got.utcoffset() == value.utcoffset(), name
        if isinstance(value, Decimal):
            assert str(got) == str(value), name


@pytest.fixture
def setup(engine: Engine) -> tuple[bytes, KeyManager, type]:
    key_bytes = os.urandom(32)
    keys = KeyManager(engine, LocalKeyProvider(key_bytes))
    model = make_model(keys)
    keys.create_table()
    model.metadata.create_all(engine)
    return key_bytes, keys, model


def test_orm_add_all_round_trip(engine: Engine, setup: tuple) -> None:
    key_bytes, keys, model = setup
    with Session(engine) as session:
        session.add_all(model(id=n, **row) for n, row in enumerate(ROWS))
        session.commit()
    _, reader = fresh_reader(engine, key_bytes)
    with Session(engine) as session:
        for n, row in enumerate(ROWS):
            assert_row_equal(session.get(reader, n), row)


def test_orm_update_merge_refresh(engine: Engine, setup: tuple) -> None:
    key_bytes, keys, model = setup
    with Session(engine) as session:
        session.add(model(id=1, **ROWS[0]))
        session.commit()
        obj = session.get(model, 1)
        obj.s, obj.num, obj.j = "Grace Hopper", Decimal("1.10"), {"changed": True}
        session.commit()
        session.merge(model(id=2, **ROWS[1]))
        session.merge(model(id=1, s="merged"))
        session.commit()
        session.execute(update(model).where(model.id == 2).values(s="bulk updated"))
        session.commit()
        obj = session.get(model, 1)
        session.refresh(obj)
        assert obj.s == "merged" and str(obj.num) == "1.10" and obj.j == {"changed": True}
    _, reader = fresh_reader(engine, key_bytes)
    with Session(engine) as session:
        assert session.get(reader, 1).s == "merged"
        expected = dict(ROWS[1], s="bulk updated")
        assert_row_equal(session.get(reader, 2), expected)


def test_orm_bulk_insert(engine: Engine, setup: tuple) -> None:
    key_bytes, keys, model = setup
    with Session(engine) as session:
        session.execute(insert(model), [dict(row, id=n) for n, row in enumerate(ROWS * 20)])
        session.commit()
    _, reader = fresh_reader(engine, key_bytes)
    with Session(engine) as session:
        loaded = session.scalars(select(reader).order_by(reader.id)).all()
        assert len(loaded) == len(ROWS) * 20
        for n, obj in enumerate(loaded):
            assert_row_equal(obj, ROWS[n % len(ROWS)])


def test_core_insert_update_select(engine: Engine, setup: tuple) -> None:
    key_bytes, keys, model = setup
    table = model.__table__
    with engine.begin() as conn:
        conn.execute(table.insert(), [dict(row, id=n) for n, row in enumerate(ROWS)])
        conn.execute(table.update().where(table.c.id == 0).values(s="core update", i=42))
    _, reader = fresh_reader(engine, key_bytes)
    rt = reader.__table__
    with engine.connect() as conn:
        rows = {r.id: r._mapping for r in conn.execute(select(rt))}
    assert_row_equal(dict(rows[0]), dict(ROWS[0], s="core update", i=42))
    assert_row_equal(dict(rows[1]), ROWS[1])
    assert all(rows[2][name] is None for name in inner_types())


def test_none_stays_null_and_nothing_is_plaintext(engine: Engine, setup: tuple) -> None:
    key_bytes, keys, model = setup
    with Session(engine) as session:
        session.add_all(model(id=n, **row) for n, row in enumerate(ROWS))
        session.commit()
    with engine.connect() as conn:
        raw = conn.execute(text("SELECT * FROM ty_all ORDER BY id")).all()
    assert all(v is None for v in raw[2][1:])
    blob = b"".join(bytes(v) for r in raw for v in r[1:] if v is not None)
    for fragment in (b"Ada", b"Lovelace", b"xxxxxxxx", "pénicilline".encode(), b"binary", b"allergies", b"bright", b"12345.6789"):
        assert fragment not in blob
    for r in raw[:2]:
        for v in r[1:]:
            assert bytes(v)[0] == 0x01  # version byte: every value is an envelope


def test_storage_type_per_dialect(engine: Engine, setup: tuple) -> None:
    from sqlalchemy import inspect

    columns = {c["name"]: str(c["type"]).upper() for c in inspect(engine).get_columns("ty_all")}
    # bounded strings get a VARBINARY sized chars * 4 + 37 (envelope) on MySQL
    expected = {"postgresql": {"BYTEA"}, "sqlite": {"BLOB"}, "mysql": {"LONGBLOB", "VARBINARY(837)", "VARBINARY(61)"}}
    allowed = expected["mysql" if engine.dialect.name in ("mysql", "mariadb") else engine.dialect.name]
    assert {columns[name] for name in inner_types()} <= allowed
    if engine.dialect.name in ("mysql", "mariadb"):
        assert columns["s"] == "VARBINARY(837)"  # String(200)
        assert columns["e"] == "VARBINARY(61)"  # Enum(Mood): names up to 6 chars
        assert columns["txt"] == "LONGBLOB"
