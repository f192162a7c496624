"""The row-key query never scans the scope index over every row key, even on a
key table PostgreSQL has not analysed yet (rows/keys.py ``_select_keys``).

A bulk load had just made 1,000,000 row keys and nothing had analysed the
table (autovacuum off, or not yet run) when a streamed read of them took
230 s: the query said ``id = ANY(:ids) AND scope = 'row'`` and the planner,
with no statistics, took the scope condition for the selective one and
answered every 1,000 ids with a bitmap scan of the scope index over every
row key. The query now says ``id = ANY(:ids)`` only (the scope is checked
in Python). Here the same state is made on a smaller table and the plan of
the very statement a cold read sends is read with ``EXPLAIN``: it must not
use the scope index (the planner may still choose the primary key or, on a
table this small, one sequential scan: its cost-based choice, bounded by
the table's size). No timing is asserted.
"""

from __future__ import annotations

import os

import pytest
from sqlalchemy import text
from sqlalchemy.engine import Engine

from sa_envelope import KeyManager, LocalKeyProvider
from sa_envelope.rows.keyrows import IN_CHUNK

KEYS = 200_000  # row keys of one table: enough for the planner's choice to be the one at scale


@pytest.mark.backends("postgresql")
def test_the_row_key_query_never_scans_the_scope_index_of_an_unanalysed_key_table(engine: Engine) -> None:
    keys = KeyManager(engine, LocalKeyProvider(os.urandom(32)))
    keys.create_table()
    with engine.begin() as conn:  # no analysis behind the test's back (this database's own table)
        conn.execute(text("ALTER TABLE sa_envelope_keys SET (autovacuum_enabled = false)"))
        for _ in range(KEYS // 10_000):
            keys.new_row_keys(conn, "plan_rows", 10_000)
    with engine.connect() as conn:
        assert conn.execute(text("SELECT reltuples FROM pg_class WHERE relname = 'sa_envelope_keys'")).scalar() <= 0
        ids = [
            r[0] for r in conn.execute(text("SELECT id FROM sa_envelope_keys ORDER BY id LIMIT :n"), {"n": IN_CHUNK})
        ]
        stmt = keys.rows._select_keys(conn, True)
        compiled = stmt.compile(dialect=conn.dialect)
        sql, params = str(compiled), {**compiled.params, "ids": ids}
        plan = "\n".join(r[0] for r in conn.exec_driver_sql("EXPLAIN " + sql, params))
    assert "ix_sa_envelope_keys_owner" not in plan, plan
