"""The lookup's new query shapes stay exact: a substring candidate is
re-checked on its value before any object is built (a forged token makes a
candidate, never an object nor a wrong row); the objects of many hits load
in chunks; the ``INTERSECT`` shape (SQLite's) finds the same candidates as
the ``EXISTS`` one on every backend."""

from __future__ import annotations

from typing import Any

import pytest
from sqlalchemy import event, insert, select, text
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

from sa_envelope import KeyManager, lookup
from sa_envelope.columns.searchable import indexes_of
from sa_envelope.search import query
from support.search import search_models


@pytest.fixture
def model(engine: Engine, local_keys: KeyManager) -> Any:
    Patient, _ = search_models(local_keys, bits=32, storage="table")
    Patient.metadata.create_all(engine)
    return Patient


def _substring(model: Any) -> Any:
    return next(i for i in indexes_of(model.__table__) if i.kind == "substring")


def test_a_forged_candidate_is_rechecked_before_any_object_is_built(
    engine: Engine, local_keys: KeyManager, model: Any
) -> None:
    rows = [{"id": 1, "notes": "penicillin"}, {"id": 2, "notes": "aspirin"}, {"id": 3, "notes": "nicotine"}]
    with engine.begin() as conn:
        conn.execute(insert(model.__table__), rows)
        tokens = local_keys.search_table.name
        conn.execute(  # a database writer gives row 2 every token of row 1
            text(
                f"INSERT INTO {tokens} (owner, name, row_key, token) SELECT owner, name, '2', token "
                f"FROM {tokens} s WHERE row_key = '1' AND name = 'notes/substring' AND NOT EXISTS "
                f"(SELECT 1 FROM {tokens} x WHERE x.owner = s.owner AND x.name = s.name "
                f"AND x.token = s.token AND x.row_key = '2')"
            )
        )
    built: list[int] = []
    event.listen(model, "load", lambda target, _: built.append(target.id))
    with Session(engine) as session:
        found = lookup(session, model.notes, contains="penicillin")
        assert [p.id for p in found] == [1]
        assert built == [1]  # row 2 was a candidate (its forged tokens), decrypted and dropped
        candidates = session.scalars(select(model.id).where(model.notes.matches_substring("penicillin"))).all()
        assert sorted(candidates) == [1, 2]
        assert lookup(session, model.notes, contains="asp") == [session.get(model, 2)]


def test_many_hits_load_in_chunks(engine: Engine, model: Any) -> None:
    count = query.LOAD_CHUNK * 2 + 7
    with engine.begin() as conn:
        conn.execute(
            insert(model.__table__),
            [{"id": i, "notes": f"x{i}penicillin" if i % 3 else "aspirin"} for i in range(1, count + 1)],
        )
    with Session(engine) as session:
        found = lookup(session, model.notes, contains="icil")
        assert sorted(p.id for p in found) == [i for i in range(1, count + 1) if i % 3]
        assert len({id(p) for p in found}) == len(found)


@pytest.mark.parametrize("needle", ["penicillin", "cil", "nici", "zzz"])
def test_intersect_and_exists_shapes_give_the_same_candidates(engine: Engine, model: Any, needle: str) -> None:
    notes = ["penicillin", "aspirin", "nicotine", "cilantro", "penny", "lin", None]
    with engine.begin() as conn:
        conn.execute(insert(model.__table__), [{"id": i, "notes": n} for i, n in enumerate(notes, 1)])
    index = _substring(model)
    t = model.__table__
    with Session(engine) as session:
        conn = session.connection()
        inputs, _ = index.query_tokens(needle)
        order = query.rarest_first(index, conn, inputs) if len(inputs) > 1 else None
        shapes = {
            shape: sorted(session.scalars(select(t.c.id).where(query.candidates(index, t, needle, order, shape))))
            for shape in ("exists", "intersect")
        }
        assert shapes["exists"] == shapes["intersect"]
        wanted = [i for i, n in enumerate(notes, 1) if n is not None and needle in n]
        assert set(wanted) <= set(shapes["intersect"])
        assert sorted(p.id for p in lookup(session, model.notes, contains=needle)) == wanted
