"""The stored tokens are the ones docs/format.md describes (rebuilt here from
that recipe with hmac, AES and BLAKE2b and the table's blind-index key), in
the token table or (PostgreSQL) the row's token arrays; the token table is
made by the same Alembic operations as the key table, and the token arrays
by autogenerate's add_column and create_index."""

from __future__ import annotations

import datetime as dt
import hashlib
import struct
from typing import Any

from alembic.migration import MigrationContext
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from alembic.operations import Operations
from sqlalchemy import BigInteger, Column, Date, Index, Integer, MetaData, String, Table, inspect, select, text
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Mapped, Session, mapped_column

import sa_envelope.alembic  # noqa: F401  (registers the operations)
from sa_envelope import EncryptedType, KeyManager, PrefixIndex, RangeIndex, SubstringIndex
from support.models import new_base


def _f(text: str | bytes) -> bytes:
    data = text.encode("utf-8") if isinstance(text, str) else text
    return struct.pack(">H", len(data)) + data


def _documented(key: Any, kind: str, owner: str, column: str, settings: str, m: bytes, bits: int) -> int:
    """The recipe of docs/format.md, from the table's blind-index key."""
    context = b"\xff\xff" + b"sa-envelope search v2\x00" + b"".join(_f(p) for p in (kind, owner, column, settings))
    subkey = key.cipher.subkey(context)  # HmacKey(K).subkey(context): HMAC-SHA256 keyed with the derived key

    def derive(what: bytes) -> bytes:
        mac = subkey.copy()
        mac.update(b"sa-envelope search prf\x00" + what)
        return mac.digest()

    if len(m) <= 15:
        block = m + bytes(15 - len(m)) + bytes((len(m),))
        encryptor = Cipher(algorithms.AES(derive(b"aes-256-ecb")), modes.ECB()).encryptor()
        digest = encryptor.update(block)[:8]
    else:
        digest = hashlib.blake2b(m, key=derive(b"blake2b"), digest_size=8).digest()
    return int.from_bytes(digest, "big", signed=True) >> (64 - bits)


def _stored(conn: Any, keys: KeyManager, model: Any, row: int) -> set[tuple[str, int]]:
    t = model.__table__
    if "name_prefix_tokens" in t.c:  # PostgreSQL: the row's own BIGINT[] columns
        found = conn.execute(select(t).where(t.c.id == row)).one()._mapping
        return {
            (f"{c}/{k}", tok)
            for c, k in (("name", "prefix"), ("notes", "substring"), ("born", "range"))
            for tok in found[f"{c}_{k}_tokens"]
        }
    tokens = keys.search_table
    return {(r.name, r.token) for r in conn.execute(select(tokens).where(tokens.c.row_key == str(row)))}


def test_tokens_are_derived_as_documented(engine: Engine, local_keys: KeyManager) -> None:
    keys = local_keys

    class Patient(new_base()):
        __tablename__ = "fmt_patients"
        id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
        name: Mapped[str] = mapped_column(EncryptedType(String(50), keys))
        notes: Mapped[str] = mapped_column(EncryptedType(String(50), keys))
        born: Mapped[dt.date] = mapped_column(EncryptedType(Date, keys))
        __table_args__ = (
            PrefixIndex("name", keys, max_length=9, bits=24),
            SubstringIndex("notes", keys, n=3, bits=40),
            RangeIndex("born", keys, granularities=("year", "month", "second"), bits=64),
        )

    Patient.metadata.create_all(engine)
    name = "Zoë Q 日本語"  # the 9-character prefix is 17 bytes: the BLAKE2b path
    with Session(engine) as session:
        session.add(Patient(id=7, name=name, notes="abcabcab", born=dt.date(1984, 3, 5)))
        session.commit()
    key = keys.encryption_key("fmt_patients", "blind-index")
    with engine.connect() as conn:
        stored = _stored(conn, keys, Patient, 7)
    owner, seconds = "fmt_patients", dt.date(1984, 3, 5).toordinal() * 86400
    expected = {
        ("name/prefix", _documented(key, "prefix", owner, "name", "bits=24;max_length=9", name[:i].encode(), 24))
        for i in range(1, 10)
    }
    expected |= {
        ("notes/substring", _documented(key, "substring", owner, "notes", "bits=40;n=3", g.encode(), 40))
        for g in ("abc", "bca", "cab")
    }  # each distinct n-gram once
    expected |= {
        (
            "born/range",
            _documented(
                key, "range", owner, "born", "bits=64;levels=year,month,second", bytes((level,)) + str(v).encode(), 64
            ),
        )
        for level, v in ((0, 1984), (1, 1984 * 12 + 2), (2, seconds))
    }
    assert stored == expected


def test_alembic_key_table_operations_make_the_token_table(engine: Engine) -> None:
    with engine.begin() as conn:
        ops = Operations(MigrationContext.configure(conn))
        ops.create_key_table()
    names = set(inspect(engine).get_table_names())
    assert {"sa_envelope_keys", "sa_envelope_search"} <= names
    _assert_clustered(engine)
    with engine.begin() as conn:
        ops = Operations(MigrationContext.configure(conn))
        ops.drop_search_table()
    assert "sa_envelope_search" not in inspect(engine).get_table_names()
    with engine.begin() as conn:
        ops = Operations(MigrationContext.configure(conn))
        ops.create_search_table()  # the upgrade of a deployment made before search indexes
        ops.drop_key_table()
    assert not {"sa_envelope_keys", "sa_envelope_search"} & set(inspect(engine).get_table_names())


def _assert_clustered(engine: Engine) -> None:
    """The token table's shape (docs/format.md): the lookup order is the primary key."""
    found = inspect(engine)
    assert found.get_pk_constraint("sa_envelope_search")["constrained_columns"] == ["owner", "name", "token", "row_key"]
    indexes = {i["name"]: i["column_names"] for i in found.get_indexes("sa_envelope_search")}
    assert indexes == {"ix_sa_envelope_search_row": ["owner", "row_key"]}
    if engine.dialect.name == "sqlite":
        with engine.connect() as conn:
            ddl = conn.execute(text("SELECT sql FROM sqlite_master WHERE name = 'sa_envelope_search'")).scalar()
        assert "WITHOUT ROWID" in str(ddl)


def test_a_token_table_of_the_first_shape_is_upgraded(engine: Engine) -> None:
    """A deployment made before the clustered shape: its tokens (duplicates
    allowed then) move to the new table, once each, and lookups find them."""
    v1 = MetaData()
    Table(
        "sa_envelope_search",
        v1,
        Column("owner", String(190), nullable=False),
        Column("name", String(100), nullable=False),
        Column("row_key", String(100), nullable=False),
        Column("token", BigInteger, nullable=False),
        Index("ix_sa_envelope_search_lookup", "owner", "name", "token", "row_key"),
        Index("ix_sa_envelope_search_row", "owner", "row_key"),
    )
    v1.create_all(engine)
    rows = [("t", "notes/substring", "1", -5), ("t", "notes/substring", "1", -5), ("t", "name/prefix", "2", 7)]
    with engine.begin() as conn:
        conn.execute(
            text("INSERT INTO sa_envelope_search (owner, name, row_key, token) VALUES (:o, :n, :r, :t)"),
            [dict(zip("onrt", r)) for r in rows],
        )
        ops = Operations(MigrationContext.configure(conn))
        ops.upgrade_search_table()
        ops.upgrade_search_table()  # a second run finds it done
    _assert_clustered(engine)
    with engine.connect() as conn:
        stored = conn.execute(text("SELECT owner, name, row_key, token FROM sa_envelope_search")).all()
    assert sorted(map(tuple, stored)) == sorted(set(rows))
    assert "sa_envelope_search_v1" not in inspect(engine).get_table_names()
