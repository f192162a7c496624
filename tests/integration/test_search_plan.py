"""How a substring lookup in the token table meets its tokens (search/query.py):
the rarest of the needle's n-grams drives it, found by a probe that reads a
few rows per token, and the answer stays exact whatever the order."""

from __future__ import annotations

from typing import Any

from sqlalchemy import insert
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

from sa_envelope import KeyManager, lookup
from sa_envelope.columns.searchable import indexes_of
from sa_envelope.search import query
from support.search import search_models


def _substring(model: Any) -> Any:
    return next(i for i in indexes_of(model.__table__) if i.kind == "substring")


def test_the_rarest_ngram_drives_a_substring_lookup(engine: Engine, local_keys: KeyManager) -> None:
    Patient, _ = search_models(local_keys, bits=32, storage="table")
    Patient.metadata.create_all(engine)
    # "abc" in 400 rows, "xyz" in 250, both past the probe's reach; "bcx" and "cxy" in one
    rows = [{"id": i, "notes": ("abc " if i <= 400 else "") + ("xyz " if i % 2 == 0 else "") + str(i)} for i in range(1, 501)]
    rows.append({"id": 9001, "notes": "abcxyz"})
    with engine.begin() as conn:
        conn.execute(insert(Patient.__table__), rows)
    index = _substring(Patient)
    inputs, _ = index.query_tokens("abcxyz")
    with Session(engine) as session:
        order = query.rarest_first(index, session.connection(), inputs)
        rare = [g for g in inputs if g in (b"bcx", b"cxy")]  # fewer rows than the probe reads: first
        assert order == [*rare, b"xyz", b"abc"]
        assert {p.id for p in lookup(session, Patient.notes, contains="abcxyz")} == {9001}
        assert {p.id for p in lookup(session, Patient.notes, contains="abc xyz")} == set(range(2, 401, 2))
        assert {p.id for p in lookup(session, Patient.notes, contains="xyz 1")} == {i for i in range(2, 501, 2) if str(i)[0] == "1"}
