"""The stored tokens are the ones docs/format.md describes (rebuilt here from
that recipe with hmac and the table's blind-index key), and the token table
is made by the same Alembic operations as the key table."""

from __future__ import annotations

import datetime as dt
import struct
from typing import Any

from alembic.migration import MigrationContext
from alembic.operations import Operations
from sqlalchemy import Date, Integer, String, inspect, select
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Mapped, Session, mapped_column

import sa_envelope.alembic  # noqa: F401  (registers the operations)
from sa_envelope import EncryptedType, KeyManager, PrefixIndex, RangeIndex, SubstringIndex
from support.models import new_base


def _f(text: str | bytes) -> bytes:
    data = text.encode("utf-8") if isinstance(text, str) else text
    return struct.pack(">H", len(data)) + data


def _documented(key: Any, kind: str, owner: str, column: str, settings: str, label: str, data: str, bits: int) -> int:
    context = b"\xff\xff" + b"sa-envelope search v1\x00" + b"".join(_f(p) for p in (kind, owner, column, settings))
    subkey = key.cipher.subkey(context)  # HmacKey(K).subkey(context), as the page says
    mac = subkey.copy()
    mac.update(_f(label) + data.encode("utf-8"))
    return int.from_bytes(mac.digest()[:8], "big", signed=True) >> (64 - bits)


def test_tokens_are_derived_as_documented(engine: Engine, local_keys: KeyManager) -> None:
    keys = local_keys

    class Patient(new_base()):
        __tablename__ = "fmt_patients"
        id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
        name: Mapped[str] = mapped_column(EncryptedType(String(50), keys))
        notes: Mapped[str] = mapped_column(EncryptedType(String(50), keys))
        born: Mapped[dt.date] = mapped_column(EncryptedType(Date, keys))
        __table_args__ = (
            PrefixIndex("name", keys, max_length=3, bits=24),
            SubstringIndex("notes", keys, n=3, bits=40),
            RangeIndex("born", keys, granularities=("year", "month"), bits=64),
        )

    Patient.metadata.create_all(engine)
    with Session(engine) as session:
        session.add(Patient(id=7, name="Zoë Q", notes="abcab", born=dt.date(1984, 3, 5)))
        session.commit()
    key = keys.encryption_key("fmt_patients", "blind-index")
    tokens = keys.search_table
    with engine.connect() as conn:
        stored = {(r.name, r.token) for r in conn.execute(select(tokens).where(tokens.c.row_key == "7"))}
    owner = "fmt_patients"
    expected = {("name/prefix", _documented(key, "prefix", owner, "name", "bits=24;max_length=3", "p", p, 24))
                for p in ("Z", "Zo", "Zoë")}
    expected |= {("notes/substring", _documented(key, "substring", owner, "notes", "bits=40;n=3", "g", g, 40))
                 for g in ("abc", "bca", "cab")}
    expected |= {("born/range", _documented(key, "range", owner, "born", "bits=64;levels=year,month", lvl, v, 64))
                 for lvl, v in (("year", "1984"), ("month", str(1984 * 12 + 2)))}
    assert stored == expected


def test_alembic_key_table_operations_make_the_token_table(engine: Engine) -> None:
    with engine.begin() as conn:
        ops = Operations(MigrationContext.configure(conn))
        ops.create_key_table()
    names = set(inspect(engine).get_table_names())
    assert {"sa_envelope_keys", "sa_envelope_search"} <= names
    indexes = {i["name"]: i["column_names"] for i in inspect(engine).get_indexes("sa_envelope_search")}
    assert indexes["ix_sa_envelope_search_lookup"] == ["owner", "name", "token", "row_key"]
    with engine.begin() as conn:
        ops = Operations(MigrationContext.configure(conn))
        ops.drop_search_table()
    assert "sa_envelope_search" not in inspect(engine).get_table_names()
    with engine.begin() as conn:
        ops = Operations(MigrationContext.configure(conn))
        ops.create_search_table()  # the upgrade of a deployment made before search indexes
        ops.drop_key_table()
    assert not {"sa_envelope_keys", "sa_envelope_search"} & set(inspect(engine).get_table_names())
