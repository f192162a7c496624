"""A patients table with prefix, substring and range indexes, and its plaintext twin.

:func:`search_models` declares both on a fresh base; :func:`fill` writes the
same generated rows to both (names with accents, CJK, quotes and LIKE
wildcards; notes from a small vocabulary, so n-grams repeat; dates over two
centuries, some at month and year edges; NULLs); :func:`twin_ids` answers a
query the way SQL does on the twin (case-sensitive LIKE on every backend).
"""

from __future__ import annotations

import datetime as dt
import random
from typing import Any

from sqlalchemy import Column, Date, Integer, String, Table, func, insert, select
from sqlalchemy.dialects import mysql
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.orm import Mapped, mapped_column

from sa_envelope import EncryptedType, KeyManager, PrefixIndex, RangeIndex, SubstringIndex
from support.models import new_base

__all__ = ["FIRST", "WORDS", "fill", "search_models", "stored_tokens", "twin_ids"]

FIRST = [
    "Ada",
    "Adam",
    "Alan",
    "Alba",
    "Émile",
    "Emil",
    "Zoë",
    "Zoe",
    "李娜",
    "O'Neil",
    "Ana_Li",
    "50%Off",
    "ßtraße",
    "a",
]
LAST = ["Lovelace", "Turing", "Hopper", "Noether", "Curie", "de la Cruz", "Ñúñez", "Smith"]
WORDS = ["penicillin", "allergy", "aspirin", "asthma", "none", "mild", "severe", "pen", "cillin", "lin", "ß", "日本"]
TEXT = String(300).with_variant(mysql.VARCHAR(300, charset="utf8mb4", collation="utf8mb4_bin"), "mysql", "mariadb")


def search_models(keys: KeyManager, *, bits: int = 12, storage: str | None = None) -> tuple[Any, Table]:
    """(Patient with three search indexes, the plaintext twin table); ``storage``
    as SearchIndex takes it (by default arrays on PostgreSQL)."""
    Base = new_base()

    class Patient(Base):
        __tablename__ = "search_patients"
        id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
        name: Mapped[str | None] = mapped_column(EncryptedType(String(200), keys))
        notes: Mapped[str | None] = mapped_column(EncryptedType(String(300), keys))
        born: Mapped[dt.date | None] = mapped_column(EncryptedType(Date, keys))
        # few bits: collisions are certain, so the re-check is always exercised
        __table_args__ = (
            PrefixIndex("name", keys, max_length=4, bits=bits, storage=storage),
            SubstringIndex("notes", keys, n=3, bits=bits, storage=storage),
            RangeIndex("born", keys, granularities=("year", "month", "day"), bits=bits, storage=storage),
        )

    twin = Table(
        "search_twin",
        Base.metadata,
        Column("id", Integer, primary_key=True, autoincrement=False),
        Column("name", TEXT),
        Column("notes", TEXT),
        Column("born", Date),
    )
    return Patient, twin


def _date(rng: random.Random) -> dt.date:
    if rng.random() < 0.2:  # bucket edges: first and last days of months and years
        year, month = rng.randrange(1850, 2030), rng.choice([1, 2, 12, rng.randrange(1, 13)])
        first = dt.date(year, month, 1)
        return first if rng.random() < 0.5 else (first + dt.timedelta(days=32)).replace(day=1) - dt.timedelta(days=1)
    return dt.date(1850, 1, 1) + dt.timedelta(days=rng.randrange(180 * 365))


def rows(count: int, seed: int = 7) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    out = []
    for i in range(count):
        name = f"{rng.choice(FIRST)} {rng.choice(LAST)}" if rng.random() > 0.05 else None
        notes = " ".join(rng.choice(WORDS) for _ in range(rng.randrange(1, 6))) if rng.random() > 0.05 else None
        out.append({"id": i + 1, "name": name, "notes": notes, "born": _date(rng) if rng.random() > 0.05 else None})
    return out


def fill(engine: Engine, patient: Any, twin: Table, count: int) -> list[dict[str, Any]]:
    """The same rows in both tables (Core executemany: the bulk write path)."""
    data = rows(count)
    with engine.begin() as conn:
        conn.execute(insert(patient.__table__), data)
        conn.execute(insert(twin), data)
    return data


def twin_ids(conn: Connection, twin: Table, **asked: Any) -> set[int]:
    """The ids SQL returns on the twin for startswith=, contains= or between=."""
    ((kind, needle),) = asked.items()
    if kind == "startswith":
        criterion = twin.c.name.startswith(needle, autoescape=True)
    elif kind == "contains":
        criterion = twin.c.notes.contains(needle, autoescape=True)
    else:
        criterion = twin.c.born.between(*needle)
    return set(conn.execute(select(twin.c.id).where(criterion)).scalars())


def case_sensitive_like(conn: Connection) -> None:
    """SQLite's LIKE folds ASCII case unless told not to (PostgreSQL's never
    does; the twin's MariaDB collation is binary)."""
    if conn.dialect.name == "sqlite":
        conn.exec_driver_sql("PRAGMA case_sensitive_like = ON")


def stored_tokens(conn: Connection, keys: KeyManager, patient: Any) -> int:
    """How many tokens the indexes of ``patient`` store: rows of the token
    table, or elements of the token arrays (PostgreSQL)."""
    table = patient.__table__
    arrays = [c for c in table.c if c.name.endswith("_tokens")]
    if not arrays:
        return int(conn.execute(select(func.count()).select_from(keys.search_table)).scalar() or 0)
    total = sum(func.coalesce(func.cardinality(c), 0) for c in arrays)
    return int(conn.execute(select(func.sum(total))).scalar() or 0)
