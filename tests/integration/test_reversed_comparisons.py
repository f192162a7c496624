"""A comparison with the encrypted column on the right never returns wrong rows.

``plain_col == enc_col`` (as a join or a relationship on an encrypted foreign
key writes it) goes through the plain column's comparator; it must be
refused as ``enc_col == plain_col`` is, or work where that works (a
deterministic column against itself), never silently return no rows.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy import Column, Integer, MetaData, String, Table, insert, literal, select
from sqlalchemy.engine import Engine

from sa_envelope import EncryptedType, KeyManager, LocalKeyProvider, UnsupportedQueryError


@pytest.fixture
def tables(engine: Engine, tmp_path: Path) -> dict[str, Table]:
    keys = KeyManager(engine, LocalKeyProvider.from_file(tmp_path / "master.key"))
    keys.create_table()
    meta = MetaData()
    people = Table(
        "rev_people", meta, Column("id", Integer, primary_key=True),
        Column("ssn", EncryptedType(String(11), keys, deterministic=True)),
        Column("name", EncryptedType(String(50), keys)),
        Column("plain_ssn", String(11)),
    )
    claims = Table("rev_claims", meta, Column("id", Integer, primary_key=True), Column("ssn", String(11)))
    meta.create_all(engine)
    with engine.begin() as conn:
        conn.execute(insert(people), [{"id": 1, "ssn": "123", "name": "Ada", "plain_ssn": "123"}])
        conn.execute(insert(claims), [{"id": 1, "ssn": "123"}])
    return {"people": people, "claims": claims}


def test_plain_on_the_left_is_refused_like_the_other_order(engine: Engine, tables: dict[str, Table]) -> None:
    people, claims = tables["people"], tables["claims"]
    assert people.c.ssn in [people.c.id, people.c.ssn]  # SQLAlchemy's own membership tests: by identity
    assert people.c.name not in [claims.c.ssn, people.c.id]
    refused = [
        select(people.c.id).where(people.c.ssn == claims.c.ssn),  # column == column: judged at execution
        select(people.c.id).join(claims, people.c.ssn == claims.c.ssn),
        select(people.c.id).where(people.c.name != people.c.plain_ssn),
        select(people.c.id).where(claims.c.ssn == people.c.ssn),  # an implicit join
        select(people.c.id).join(claims, claims.c.ssn == people.c.ssn),  # an explicit one
        select(people.c.id).where(people.c.plain_ssn == people.c.ssn),
        select(people.c.id).where(people.c.plain_ssn < people.c.name),
        select(people.c.id).where(literal("123") == people.c.ssn),  # a typed literal: plaintext
    ]
    with engine.connect() as conn:
        for stmt in refused:
            with pytest.raises(UnsupportedQueryError, match="rev_people"):
                conn.execute(stmt).all()


def test_what_the_rule_allows_still_works_in_either_order(engine: Engine, tables: dict[str, Table]) -> None:
    people = tables["people"]
    alias = people.alias("other")
    with engine.connect() as conn:
        assert conn.execute(select(people.c.id).where(people.c.ssn == "123")).scalars().all() == [1]
        assert conn.execute(select(people.c.id).where(people.c.ssn.in_(["123", "9"]))).scalars().all() == [1]
        assert conn.execute(select(people.c.id).where(people.c.name.is_not(None))).scalars().all() == [1]
        self_join = select(people.c.id).join(alias, alias.c.ssn == people.c.ssn)
        assert conn.execute(self_join).scalars().all() == [1]
