"""A deep copy or a pickle of a MetaData whose tables hold ``EncryptedType``,
``BlindIndexType`` and search-index declarations, every backend.

``copy.deepcopy`` shares the KeyManager (a live resource, not data): the
copy writes, reads and searches as the original does. A pickle carries no
KeyManager, so no key material, only a process-local token: unpickled in
the same process the declarations find their manager again; in a fresh
process (a real subprocess) they refuse values with one
``ConfigurationError`` naming the table and column, until
``keys.adopt(metadata)`` attaches a manager.
"""

from __future__ import annotations

import copy
import datetime as dt
import json
import pickle
import subprocess
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Column, Date, Integer, MetaData, String, Table, delete, insert
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Mapped, Session, mapped_column, registry

from sa_envelope import (
    BlindIndexType,
    EncryptedType,
    KeyManager,
    LocalKeyProvider,
    PrefixIndex,
    RangeIndex,
    SubstringIndex,
    lookup,
)
from sa_envelope.columns.normalizers import normalize_email
from sa_envelope.columns.searchable import indexes_of
from support.models import new_base
from support.rotation import PYTHON, subprocess_env
from support.search import TEXT, case_sensitive_like, rows, twin_ids

OWNER = "copied_patients"
ASKED: list[dict[str, Any]] = [
    {"startswith": "Ad"},
    {"contains": "pen"},
    {"contains": "cillin"},
    {"between": (dt.date(1900, 1, 1), dt.date(1950, 12, 31))},
]
SOURCE = {"startswith": "name", "contains": "notes", "between": "born"}


def _metadata(keys: KeyManager) -> MetaData:
    Base = new_base()

    class Patient(Base):
        __tablename__ = OWNER
        id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
        name: Mapped[str | None] = mapped_column(EncryptedType(String(200), keys))
        notes: Mapped[str | None] = mapped_column(EncryptedType(String(300), keys))
        born: Mapped[dt.date | None] = mapped_column(EncryptedType(Date, keys))
        email: Mapped[str | None] = mapped_column(EncryptedType(String(200), keys))
        email_index: Mapped[bytes | None] = mapped_column(
            BlindIndexType("email", keys, normalizer=normalize_email, bits=16)
        )
        code: Mapped[str | None] = mapped_column(EncryptedType(String(20), keys, deterministic=True))
        __table_args__ = (
            PrefixIndex("name", keys, max_length=4, bits=12),
            SubstringIndex("notes", keys, n=3, bits=12),
            RangeIndex("born", keys, granularities=("year", "month", "day"), bits=12),
        )

    Table(
        "copied_twin", Base.metadata,
        Column("id", Integer, primary_key=True, autoincrement=False),
        Column("name", TEXT), Column("notes", TEXT), Column("born", Date),
    )  # fmt: skip
    return Base.metadata


def _data() -> list[dict[str, Any]]:
    data = rows(120)
    for row in data:
        row["email"] = f"User{row['id'] % 9}@Example.com"
        row["code"] = f"C{row['id'] % 5}"
    return data


class Copied:
    """Mapped imperatively on a copied table, so lookup() can be asked about it."""


def _write_and_search(engine: Engine, keys: KeyManager, table: Table, twin: Table) -> None:
    """ORM writes through ``table`` (the blind index filled by the mapper), then every lookup kind."""
    data = _data()
    with engine.begin() as conn:
        conn.execute(delete(table))
        conn.execute(delete(twin))
        conn.execute(insert(twin), [{k: r[k] for k in ("id", "name", "notes", "born")} for r in data])
    mapper = registry().map_imperatively(Copied, table)
    try:
        with Session(engine) as session:
            for row in data:
                session.add(Copied(**row))  # type: ignore[call-arg]
            session.commit()
        with Session(engine) as session, engine.connect() as conn:
            case_sensitive_like(conn)
            for asked in ASKED:
                found = lookup(session, getattr(Copied, SOURCE[next(iter(asked))]), **asked)
                assert {o.id for o in found} == twin_ids(conn, twin, **asked) != set(), asked
            found = lookup(session, Copied.email, "USER4@example.COM")  # type: ignore[attr-defined]
            assert {o.id for o in found} == {r["id"] for r in data if r["id"] % 9 == 4}
            assert {o.id for o in session.query(Copied).filter_by(code="C3")} == {
                r["id"] for r in data if r["id"] % 5 == 3
            }
            assert {o.id: o.name for o in session.query(Copied)} == {r["id"]: r["name"] for r in data}
    finally:
        mapper.registry.dispose()
    assert all(r.ok for r in keys.verify_index(table)), [str(r) for r in keys.verify_index(table)]


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_a_copied_or_unpickled_metadata_writes_reads_and_searches(engine: Engine, tmp_path: Path, how: str) -> None:
    keys = KeyManager(engine, LocalKeyProvider(b"k" * 32))
    keys.create_table()
    original = _metadata(keys)
    original.create_all(engine)
    data = pickle.dumps(original)
    assert b"k" * 32 not in data and b"LocalKeyProvider" not in data and b"KeyCache" not in data
    restored = copy.deepcopy(original) if how == "deepcopy" else pickle.loads(data)
    table, twin = restored.tables[OWNER], restored.tables["copied_twin"]
    assert table is not original.tables[OWNER]
    assert all(c.type.keys is keys for c in table.columns if hasattr(c.type, "keys"))
    indexes = indexes_of(table)
    assert [(i.name, i.table is table, i.keys is keys) for i in indexes] == [
        (f"{c}/{k}", True, True) for c, k in (("name", "prefix"), ("notes", "substring"), ("born", "range"))
    ]
    assert all(i.table is original.tables[OWNER] for i in indexes_of(original.tables[OWNER]))  # untouched
    again = table.to_metadata(MetaData(), name="copied_again")  # a copy of the restored table: its indexes too
    assert [(i.name, i.table is again) for i in indexes_of(again)] == [(i.name, True) for i in indexes]
    _write_and_search(engine, keys, table, twin)


CHILD = """
import json, pickle, sys
from sqlalchemy import create_engine, insert, select
from sa_envelope import ConfigurationError, KeyManager, LocalKeyProvider
metadata = pickle.loads(open(sys.argv[1], "rb").read())
table = metadata.tables["copied_patients"]
engine = create_engine(sys.argv[2])
try:
    with engine.begin() as conn:
        conn.execute(insert(table).values(id=999, name="Ada"))
    refused = "written"
except ConfigurationError as exc:
    refused = str(exc)
keys = KeyManager(engine, LocalKeyProvider.from_file(sys.argv[3]))
adopted = keys.adopt(metadata)
with engine.connect() as conn:
    names = dict(conn.execute(select(table.c.id, table.c.name).where(table.c.name.matches_prefix("Ad"))).all())
print(json.dumps({"refused": refused, "adopted": adopted, "names": names}))
"""


def test_a_metadata_unpickled_in_another_process_refuses_values_until_adopted(
    engine: Engine, db_url: str, tmp_path: Path
) -> None:
    master = tmp_path / "master.key"
    keys = KeyManager(engine, LocalKeyProvider.from_file(master))
    keys.create_table()
    original = _metadata(keys)
    original.create_all(engine)
    _write_and_search(engine, keys, original.tables[OWNER], original.tables["copied_twin"])
    data = pickle.dumps(original)
    assert master.read_bytes() not in data  # the key file holds the master key
    (tmp_path / "metadata.pickle").write_bytes(data)
    child = subprocess.run([PYTHON, "-c", CHILD, str(tmp_path / "metadata.pickle"), db_url, str(master)],
                           env=subprocess_env(None), capture_output=True, text=True, timeout=120)  # fmt: skip
    assert child.returncode == 0, child.stderr
    said = json.loads(child.stdout)
    assert said["refused"] == (
        f"EncryptedType of {OWNER}.name was unpickled in a process without its KeyManager "
        "(a pickle carries none, so no key material): attach one with keys.adopt(metadata)"
    )
    assert said["adopted"] == 6 + 3  # six column types, three search indexes
    want = {str(r["id"]): r["name"] for r in _data() if r["name"] and r["name"].startswith("Ad")}
    assert {k: v for k, v in said["names"].items() if v.startswith("Ad")} == want and want
