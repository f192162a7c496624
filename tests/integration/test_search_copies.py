"""A copy of an indexed table (``Table.to_metadata``) keeps its search
indexes: Core writes through the copy maintain its tokens (the token table
on SQLite and MariaDB, the copied token arrays on PostgreSQL) and lookups
on it return exactly what SQL returns on the plaintext twin."""

from __future__ import annotations

import datetime as dt
from typing import Any

from sqlalchemy import MetaData, delete, insert, select, update
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session, registry

from sa_envelope import KeyManager, lookup
from sa_envelope.columns.searchable import indexes_of
from support.search import case_sensitive_like, rows, search_models, stored_tokens, twin_ids

D = dt.date
ASKED: list[dict[str, Any]] = [
    {"startswith": "Ad"},
    {"startswith": "Émi"},
    {"startswith": "Zed"},
    {"contains": "cillin"},
    {"contains": "pen"},
    {"between": (D(1900, 1, 1), D(1950, 12, 31))},
]
SOURCE = {"startswith": "name", "contains": "notes", "between": "born"}


class Copied:
    """Mapped imperatively on the copy, so lookup() can be asked about it."""


def test_a_copied_table_keeps_its_search_indexes(engine: Engine, local_keys: KeyManager) -> None:
    Patient, twin = search_models(local_keys)
    copy = Patient.__table__.to_metadata(MetaData(), name="search_patients_copy")
    again = copy.to_metadata(MetaData())  # a copy of a copy: the same indexes, named for it
    assert [(i.owner, i.name) for i in indexes_of(copy)] == [
        ("search_patients_copy", f"{c}/{k}") for c, k in (("name", "prefix"), ("notes", "substring"), ("born", "range"))
    ]
    assert [i.name for i in indexes_of(again)] == [i.name for i in indexes_of(copy)]
    assert all(i.table is Patient.__table__ for i in indexes_of(Patient.__table__))  # the original's untouched
    storage = "array" if engine.dialect.name == "postgresql" else "table"
    for index in indexes_of(copy):  # arrays: the copy's own copied token column, not the original's
        assert index.storage == storage and index.table is copy
        assert index.tokens_column is (copy.c[f"{index.column}_{index.kind}_tokens"] if storage == "array" else None)
    twin.create(engine)
    copy.create(engine)  # not the original: on PostgreSQL its GIN indexes have the copy's names
    data = rows(150)
    with engine.begin() as conn:  # Core: many rows, one row, updates, a delete
        for table in (copy, twin):
            conn.execute(insert(table), data[:-1])
            conn.execute(insert(table).values(data[-1]))
            conn.execute(update(table).where(table.c.id == 3).values(name="Zed Adams", notes="penicillin"))
            conn.execute(update(table).where(table.c.id == 4).values(name=None, born=D(1920, 5, 5)))
            conn.execute(delete(table).where(table.c.id == 5))
    with engine.connect() as conn:
        assert stored_tokens(conn, local_keys, _Tabled(copy)) > 0
    mapper = registry().map_imperatively(Copied, copy)
    try:
        with Session(engine) as session, engine.connect() as conn:
            case_sensitive_like(conn)
            for asked in ASKED:
                want = twin_ids(conn, twin, **asked)
                found = lookup(session, getattr(Copied, SOURCE[next(iter(asked))]), **asked)
                assert {o.id for o in found} == want, asked
            want = twin_ids(conn, twin, startswith="Ad")
            candidates = session.execute(select(copy.c.id, copy.c.name).where(copy.c.name.matches_prefix("Ad"))).all()
            assert {i for i, name in candidates if name.startswith("Ad")} == want and want
    finally:
        mapper.registry.dispose()
    assert [r.ok for r in local_keys.verify_index(copy)] == [True, True, True]


class _Tabled:
    """What stored_tokens() reads: ``__table__``."""

    def __init__(self, table: Any) -> None:
        self.__table__ = table


def test_a_table_of_copied_columns_may_declare_its_own_index() -> None:
    """Copied columns bring their indexes unless the new table declares that
    kind of index on the column itself: then its own one answers, alone."""
    import os
    import warnings

    from sqlalchemy import Table, create_engine

    from sa_envelope import LocalKeyProvider, PrefixIndex

    keys = KeyManager(create_engine("sqlite://"), LocalKeyProvider(os.urandom(32)))
    Patient, _ = search_models(keys)
    table = Patient.__table__
    own = PrefixIndex("name", keys, max_length=2)
    mine = Table("mine", MetaData(), *(c._copy() for c in table.c), own)
    assert [(i.kind, i.owner) for i in indexes_of(mine)] == [
        ("prefix", "mine"),
        ("substring", "mine"),
        ("range", "mine"),
    ]
    assert indexes_of(mine)[0] is own
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # tometadata: to_metadata's old name
        old = table.tometadata(MetaData())
    assert [(i.name, i.settings()) for i in indexes_of(old)] == [(i.name, i.settings()) for i in indexes_of(table)]
