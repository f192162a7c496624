"""Search indexes on a table with a composite primary key (tenant, code): in
the token table each row is named by its encoded key (docs/format.md,
``row_key``), in PostgreSQL's token arrays by nothing at all. Writes by key,
by other criteria (deletes) and the ORM keep the tokens in step; lookups
are exact; a forged or missing token never gives a wrong row, and
verify_index finds and repairs it."""

from __future__ import annotations

import datetime as dt
from typing import Any

import pytest
from sqlalchemy import Date, Integer, String, delete, insert, select, text, update
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Mapped, Session, mapped_column

from sa_envelope import ConfigurationError, EncryptedType, KeyManager, PrefixIndex, SubstringIndex, lookup
from sa_envelope.columns.searchable import indexes_of
from sa_envelope.search import rowkeys
from support.models import new_base


def _model(keys: KeyManager, storage: str | None) -> Any:
    class Item(new_base()):
        __tablename__ = "cpk_items"
        tenant: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
        code: Mapped[str] = mapped_column(String(20), primary_key=True)
        title: Mapped[str | None] = mapped_column(EncryptedType(String(200), keys))
        __table_args__ = (
            PrefixIndex("title", keys, max_length=4, bits=12, storage=storage),
            SubstringIndex("title", keys, n=3, bits=12, storage=storage),
        )

    return Item


def _found(engine: Engine, model: Any, **asked: Any) -> set[tuple[int, str]]:
    with Session(engine) as session:
        return {(i.tenant, i.code) for i in lookup(session, model.title, **asked)}


def test_the_row_key_of_a_composite_key() -> None:
    assert rowkeys.encode([17]) == "17"
    assert rowkeys.encode([17, "abc"]) == "2:173:abc"
    assert rowkeys.encode([1, "7:x"]) != rowkeys.encode([17, ":x"])


@pytest.mark.parametrize("storage", [None, "table"])
def test_composite_keys_are_followed_and_found_exactly(
    engine: Engine, local_keys: KeyManager, storage: str | None
) -> None:
    Item = _model(local_keys, storage)
    Item.metadata.create_all(engine)
    t = Item.__table__
    in_table = all(i.storage == "table" for i in indexes_of(t))
    rows = [
        {"tenant": 1, "code": "a", "title": "penicillin allergy"},
        {"tenant": 1, "code": "b", "title": "aspirin"},
        {"tenant": 2, "code": "a", "title": "penicillin"},
        {"tenant": 12, "code": "3:x", "title": "asthma"},  # a key whose text looks like an encoding
        {"tenant": 123, "code": ":x", "title": "pen"},
    ]
    with engine.begin() as conn:
        conn.execute(insert(t), rows)
    with Session(engine) as session:
        session.add(Item(tenant=3, code="z", title="penicillin too"))
        session.get(Item, (1, "b")).title = "mild asthma"
        session.commit()
    assert _found(engine, Item, contains="penicillin") == {(1, "a"), (2, "a"), (3, "z")}
    assert _found(engine, Item, contains="asthma") == {(1, "b"), (12, "3:x")}
    assert _found(engine, Item, startswith="pen") == {(1, "a"), (2, "a"), (3, "z"), (123, ":x")}
    with engine.begin() as conn:
        conn.execute(update(t).where(t.c.tenant == 2, t.c.code == "a").values(title="none"))
        conn.execute(delete(t).where(t.c.tenant == 3))  # by other criteria: the keys are selected first
    assert _found(engine, Item, contains="penicillin") == {(1, "a")}
    assert all(r.ok for r in local_keys.verify_index(t)), [str(r) for r in local_keys.verify_index(t)]
    with engine.begin() as conn:  # a database writer: (1, a)'s tokens onto (12, 3:x); (1, b)'s deleted
        if in_table:
            s = local_keys.search_table.name
            conn.execute(
                text(
                    f"INSERT INTO {s} (owner, name, row_key, token) SELECT owner, name, '4:123:x', "
                    f"token FROM {s} WHERE row_key = '1:11:a'"
                )
            )
            conn.execute(text(f"DELETE FROM {s} WHERE row_key = '1:11:b'"))
        else:
            conn.execute(
                text(
                    "UPDATE cpk_items SET title_substring_tokens = title_substring_tokens || "
                    "(SELECT title_substring_tokens FROM cpk_items WHERE tenant = 1 AND code = 'a') "
                    "WHERE tenant = 12"
                )
            )
            conn.execute(text("UPDATE cpk_items SET title_substring_tokens = NULL WHERE tenant = 1 AND code = 'b'"))
    assert _found(engine, Item, contains="penicillin") == {(1, "a")}
    assert _found(engine, Item, contains="asthma") == {(12, "3:x")}  # (1, b)'s tokens are gone: a miss
    reports = {r.index: r for r in local_keys.verify_index(t, fix=True, batch_size=2)}
    assert not reports["title/substring"].ok
    local_keys.verify_index(t, fix=True)
    assert all(r.ok for r in local_keys.verify_index(t))
    assert _found(engine, Item, contains="asthma") == {(1, "b"), (12, "3:x")}
    with engine.begin() as conn:
        conn.execute(delete(t))
    assert _found(engine, Item, startswith="p") == set()
    if in_table:
        with engine.connect() as conn:
            assert conn.execute(select(local_keys.search_table)).all() == []


def test_a_composite_key_of_other_types_is_refused_for_the_token_table(engine: Engine, local_keys: KeyManager) -> None:
    class Dated(new_base()):
        __tablename__ = "cpk_dated"
        day = mapped_column(Date, primary_key=True)
        n: Mapped[int] = mapped_column(Integer, primary_key=True)
        title: Mapped[str] = mapped_column(EncryptedType(String(20), local_keys))
        __table_args__ = (PrefixIndex("title", local_keys, storage="table"),)

    Dated.metadata.create_all(engine)
    with pytest.raises(ConfigurationError, match="cpk_dated.day"), engine.begin() as conn:
        conn.execute(insert(Dated.__table__).values(day=dt.date(2000, 1, 1), n=1, title="abc"))
    with engine.connect() as conn:
        assert conn.execute(select(Dated.__table__)).all() == []  # refused before it ran


def test_row_keys_that_need_quoting_are_stored_as_given(engine: Engine, local_keys: KeyManager) -> None:
    """The token table's rows are written without bound parameters on
    PyMySQL (tokens.py quotes the strings itself): a key with quotes,
    backslashes, a ``%s`` or non-ASCII text is stored and found as it is."""
    Item = _model(local_keys, "table")
    Item.metadata.create_all(engine)
    codes = ["o'brien", "back\\slash", "100%s", '"q"', "naïve ✓", "a\\'b"]
    with engine.begin() as conn:
        conn.execute(insert(Item.__table__), [{"tenant": 5, "code": c, "title": f"penicillin {c}"} for c in codes])
    assert _found(engine, Item, contains="penicillin") == {(5, c) for c in codes}
    assert _found(engine, Item, startswith="peni") == {(5, c) for c in codes}
    with engine.connect() as conn:
        stored = set(conn.execute(select(local_keys.search_table.c.row_key)).scalars())
    assert stored == {rowkeys.encode([5, c]) for c in codes}
    assert all(r.ok for r in local_keys.verify_index(Item.__table__))
