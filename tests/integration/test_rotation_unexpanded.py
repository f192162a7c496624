"""Query forms that cannot be expanded over every live key are refused during a
rotation, never answered with the write key's rows only (docs/querying.md).

A deterministic column with two live keys stores equal values as two
ciphertexts. ``==``/``in_`` with Python values expand to both; an explicit
``bindparam()``, a self-join, ``GROUP BY`` and ``DISTINCT`` cannot, so they
raise ``UnsupportedQueryError`` when executed while two keys are live, and
work again, with the plaintext twin's answer, once the old key is retired.
``is_distinct_from``/``is_not_distinct_from`` expand and match the twin.
"""

from __future__ import annotations

from typing import Any, Callable

import pytest
from sqlalchemy import Column, Integer, MetaData, String, Table, bindparam, func, select
from sqlalchemy.engine import Engine

from sa_envelope import AwsKmsProvider, EncryptedType, KeyManager, LivePolicy, UnsupportedQueryError
from sa_envelope.keys import table as kt

FAST = LivePolicy(ttl=0.2, grace=1.0)
CITIES = ["oslo", "lima", "rome", None]


def _places(keys: KeyManager) -> Table:
    return Table(
        "places", MetaData(),
        Column("id", Integer, primary_key=True, autoincrement=False),
        Column("city", EncryptedType(String(20), keys, deterministic=True)),
        Column("city_plain", String(20)),
    )  # fmt: skip


def _forms(t: Table) -> dict[str, Callable[[Any], Any]]:
    """Each unexpandable form, run on a connection, with its plaintext twin's answer."""
    a, b = t.alias("a"), t.alias("b")

    def bound(conn: Any) -> Any:
        return sorted(conn.execute(select(t.c.id).where(t.c.city == bindparam("c")), {"c": "oslo"}).scalars())

    def bound_in(conn: Any) -> Any:
        stmt = select(t.c.id).where(t.c.city.in_(bindparam("cs", expanding=True)))
        return sorted(conn.execute(stmt, {"cs": ["oslo", "rome"]}).scalars())

    def self_join(conn: Any) -> Any:
        stmt = select(a.c.id, b.c.id).join_from(a, b, a.c.city == b.c.city).where(a.c.id < b.c.id)
        return sorted(tuple(r) for r in conn.execute(stmt))

    def group_by(conn: Any) -> Any:
        return sorted(conn.execute(select(func.count()).select_from(t).group_by(t.c.city)).scalars())

    def distinct(conn: Any) -> Any:
        return len(conn.execute(select(t.c.city).distinct()).all())

    def count_distinct(conn: Any) -> Any:
        return conn.execute(select(func.count(t.c.city.distinct()))).scalar_one()

    return {f.__name__: f for f in (bound, bound_in, self_join, group_by, distinct, count_distinct)}


def _twin_answers(conn: Any, t: Table) -> dict[str, Any]:
    a, b = t.alias("a"), t.alias("b")
    return {
        "bound": sorted(conn.execute(select(t.c.id).where(t.c.city_plain == "oslo")).scalars()),
        "bound_in": sorted(conn.execute(select(t.c.id).where(t.c.city_plain.in_(["oslo", "rome"]))).scalars()),
        "self_join": sorted(
            tuple(r)
            for r in conn.execute(
                select(a.c.id, b.c.id).join_from(a, b, a.c.city_plain == b.c.city_plain).where(a.c.id < b.c.id)
            )
        ),
        "group_by": sorted(conn.execute(select(func.count()).select_from(t).group_by(t.c.city_plain)).scalars()),
        "distinct": len(conn.execute(select(t.c.city_plain).distinct()).all()),
        "count_distinct": conn.execute(select(func.count(t.c.city_plain.distinct()))).scalar_one(),
    }


def _distinct_forms_match_twin(conn: Any, t: Table) -> None:
    for city in ["oslo", "rome", "nowhere"]:
        for enc, plain in [
            (t.c.city.is_distinct_from(city), t.c.city_plain.is_distinct_from(city)),
            (t.c.city.is_not_distinct_from(city), t.c.city_plain.is_not_distinct_from(city)),
        ]:
            got = sorted(conn.execute(select(t.c.id).where(enc)).scalars())
            assert got == sorted(conn.execute(select(t.c.id).where(plain)).scalars()), city


def test_unexpandable_forms_refused_while_two_keys_live(engine: Engine, kms_client: Any, cmk: str) -> None:
    keys = KeyManager(engine, AwsKmsProvider(cmk, client=kms_client), live=FAST)
    keys.create_table()
    t = _places(keys)
    t.create(engine)
    rows = [{"id": i, "city": CITIES[i % 4], "city_plain": CITIES[i % 4]} for i in range(1, 41)]
    with engine.begin() as conn:
        conn.execute(t.insert(), rows[:20])
    forms = _forms(t)
    with engine.connect() as conn:  # one key: every form works, as the twin does
        twin = _twin_answers(conn, t)
        assert {name: form(conn) for name, form in forms.items()} == twin

    old = keys.live.write_key("places", kt.SCOPE_DETERMINISTIC).key_id
    keys.rotate_table_key("places", scope="deterministic")
    keys.live.invalidate()
    with engine.begin() as conn:
        conn.execute(t.insert(), rows[20:])
    with engine.connect() as conn:
        _distinct_forms_match_twin(conn, t)
        for name, form in forms.items():
            with pytest.raises(UnsupportedQueryError, match=r"places\.city .*being rotated \(2 live keys"):
                form(conn)
            conn.rollback()
        assert sorted(conn.execute(select(t.c.id).where(t.c.city == "oslo")).scalars()) == sorted(
            r["id"] for r in rows if r["city"] == "oslo"
        )

    report = keys.reencrypt([t.c.city], key_id=old, batch_size=10)
    assert report.retired
    keys.live.invalidate()
    with engine.connect() as conn:  # one key again: every form answers like the twin
        _distinct_forms_match_twin(conn, t)
        twin = _twin_answers(conn, t)
        assert {name: form(conn) for name, form in forms.items()} == twin
