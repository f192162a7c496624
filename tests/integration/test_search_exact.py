"""Prefix, substring and range lookups return exactly what SQL returns on a
plaintext twin (``LIKE 'x%'``, ``LIKE '%x%'``, ``BETWEEN``), for a few
hundred generated needles and ranges, on every backend; with 12-bit tokens,
so colliding candidates are always there to be discarded."""

from __future__ import annotations

import datetime as dt

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import select
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

from sa_envelope import KeyManager, UnsupportedQueryError, lookup
from support.search import FIRST, WORDS, case_sensitive_like, fill, search_models, stored_tokens, twin_ids

ROWS = 2000
CHECKS = settings(
    max_examples=120, deadline=None, database=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
ALPHABET = st.sampled_from(list("adeilnprsz AÉéëß_%'日本李娜"))


def _texts(samples: list[str], min_size: int) -> st.SearchStrategy[str]:
    """Pieces of stored values (mostly hits) and free text (mostly misses)."""
    pieces = st.builds(
        lambda s, i, n: s[i % max(1, len(s)) :][: max(n, min_size)],
        st.sampled_from(samples),
        st.integers(0, 30),
        st.integers(min_size, 12),
    ).filter(lambda s: len(s) >= min_size)
    return st.one_of(pieces, st.text(ALPHABET, min_size=min_size, max_size=8))


def _dates() -> st.SearchStrategy[dt.date]:
    edges = st.builds(lambda y, m: dt.date(y, m, 1), st.integers(1849, 2031), st.integers(1, 12))
    return st.one_of(
        st.dates(dt.date(1845, 1, 1), dt.date(2035, 1, 1)), edges, edges.map(lambda d: d - dt.timedelta(1))
    )


def test_every_lookup_kind_returns_exactly_the_twins_rows(engine: Engine, local_keys: KeyManager) -> None:
    Patient, twin = search_models(local_keys)
    Patient.metadata.create_all(engine)
    data = fill(engine, Patient, twin, ROWS)
    names = [r["name"] for r in data if r["name"]]
    notes = [r["notes"] for r in data if r["notes"]] + WORDS + FIRST
    with Session(engine) as session, engine.connect() as plain:
        case_sensitive_like(plain)
        assert stored_tokens(plain, local_keys, Patient)

        @CHECKS
        @given(needle=_texts(names, 1))
        def prefixes(needle: str) -> None:
            found = {p.id for p in lookup(session, Patient.name, startswith=needle)}
            assert found == twin_ids(plain, twin, startswith=needle)

        @CHECKS
        @given(needle=_texts(notes, 3))
        def substrings(needle: str) -> None:
            found = {p.id for p in lookup(session, Patient.notes, contains=needle)}
            assert found == twin_ids(plain, twin, contains=needle)

        @CHECKS
        @given(low=_dates(), span=st.integers(-30, 40 * 365), exact=st.booleans())
        def ranges(low: dt.date, span: int, exact: bool) -> None:
            high = low + dt.timedelta(days=span if not exact else 0)
            found = {p.id for p in lookup(session, Patient.born, between=(low, high))}
            assert found == twin_ids(plain, twin, between=(low, high))

        prefixes()
        substrings()
        ranges()
        # the examples, and one that a candidate expression composes with another filter
        some = lookup(session, Patient.notes, contains="penicillin")
        assert {p.id for p in some} == twin_ids(plain, twin, contains="penicillin") != set()
        born = (dt.date(1900, 1, 1), dt.date(1950, 1, 1))
        assert {p.id for p in lookup(session, Patient.born, between=born)} == twin_ids(plain, twin, between=born)
        ada = lookup(session, Patient.name, Patient.id < 500, startswith="Ada")
        assert {p.id for p in ada} == {i for i in twin_ids(plain, twin, startswith="Ada") if i < 500}
        candidates = session.scalars(
            select(Patient.id).where(Patient.notes.matches_substring("aspirin"), Patient.born.matches_range(*born))
        ).all()
        assert set(candidates) >= twin_ids(plain, twin, contains="aspirin") & twin_ids(plain, twin, between=born)


def test_needles_that_cannot_be_answered_are_refused(engine: Engine, local_keys: KeyManager) -> None:
    Patient, twin = search_models(local_keys)
    Patient.metadata.create_all(engine)
    fill(engine, Patient, twin, 20)
    with Session(engine) as session:
        for asked in ({"contains": ""}, {"contains": "ab"}, {"startswith": ""}, {"between": (None, 1)}):
            with pytest.raises(UnsupportedQueryError, match="search_patients.(notes|name|born)"):
                lookup(
                    session,
                    getattr(Patient, {"contains": "notes", "startswith": "name"}.get(next(iter(asked)), "born")),
                    **asked,
                )
        with pytest.raises(UnsupportedQueryError, match="at least 3 characters"):
            select(Patient).where(Patient.notes.matches_substring("pe"))
        assert lookup(session, Patient.born, between=(dt.date(2000, 1, 2), dt.date(2000, 1, 1))) == []
        with pytest.raises(UnsupportedQueryError, match="sorted"):
            session.execute(select(Patient).order_by(Patient.born))
