"""The range index's buckets and covers, without a database: the cover of a
query is exactly the finest buckets from its low to its high end, written
with whole coarser buckets wherever they fit; bucket numbers are those
docs/format.md gives; bad settings are refused when declared."""

from __future__ import annotations

import datetime as dt
from decimal import Decimal

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sqlalchemy import Column, Integer, MetaData, String, Table

from sa_envelope import ConfigurationError, PrefixIndex, RangeIndex, SubstringIndex, powers_of

CALENDARS = [("year", "month", "day"), ("year", "day"), ("month",), ("day", "hour", "minute"), ("year", "month", "day", "hour")]


def _union(index: RangeIndex, low: object, high: object) -> tuple[set[int], int]:
    f_lo, f_hi = index.levels.finest_of(low), index.levels.finest_of(high)
    buckets = index.cover(f_lo, f_hi)
    covered: set[int] = set()
    for name, bucket in buckets:
        first, last = index.levels.span(name, bucket)
        assert not covered & set(range(first, last + 1)), "buckets of a cover never overlap"
        covered.update(range(first, last + 1))
    assert covered == set(range(f_lo, f_hi + 1))
    return covered, len(buckets)


@settings(max_examples=300, deadline=None)
@given(
    granularities=st.sampled_from(CALENDARS),
    low=st.datetimes(dt.datetime(1, 1, 1), dt.datetime(9999, 11, 1)),
    days=st.integers(0, 3 * 366),
    seconds=st.integers(0, 86400),
)
def test_calendar_covers_are_exact_and_disjoint(granularities: tuple[str, ...], low: dt.datetime, days: int, seconds: int) -> None:
    index = RangeIndex("born", None, granularities=granularities, max_query_tokens=10**6)
    high = min(low + dt.timedelta(days=days, seconds=seconds), dt.datetime(9999, 12, 31, 23, 59))
    if "hour" not in granularities and "minute" not in granularities:
        low, high = low.date(), high.date()  # type: ignore[assignment]
    _union(index, low, high)


@settings(max_examples=300, deadline=None)
@given(low=st.integers(-10**7, 10**7), width=st.integers(0, 10**5), base=st.sampled_from([2, 10, 16]))
def test_numeric_covers_are_exact_and_few(low: int, width: int, base: int) -> None:
    widths = powers_of(base, 1, 6)
    index = RangeIndex("amount", None, granularities=widths, max_query_tokens=10**6)
    _, count = _union(index, low, low + width)
    # whole coarsest buckets inside, then at most base-1 buckets per finer level at each end
    assert count <= width // widths[0] + 2 + 2 * (base - 1) * 5


def test_the_fewest_buckets_for_the_documented_range() -> None:
    index = RangeIndex("born", None)
    low, high = dt.date(1900, 1, 1), dt.date(1950, 1, 1)
    buckets = index.cover(index.levels.finest_of(low), index.levels.finest_of(high))
    assert buckets == [("year", y) for y in range(1900, 1950)] + [("day", dt.date(1950, 1, 1).toordinal())]


def test_bucket_numbers_are_those_of_the_format_page() -> None:
    cal = RangeIndex("t", None, granularities=("year", "month", "day", "hour", "minute", "second")).levels
    moment = dt.datetime(1984, 3, 5, 7, 8, 9)
    f = cal.finest_of(moment)
    seconds = moment.toordinal() * 86400 + 7 * 3600 + 8 * 60 + 9
    assert [cal.ancestor(n, f) for n in cal.names] == [
        1984, 1984 * 12 + 2, moment.toordinal(), seconds // 3600, seconds // 60, seconds
    ]
    aware = dt.datetime(1984, 3, 5, 9, 8, 9, tzinfo=dt.timezone(dt.timedelta(hours=2)))
    assert cal.finest_of(aware) == f
    num = RangeIndex("x", None, granularities=(Decimal("10"), Decimal("0.5"))).levels
    assert num.finest_of(Decimal("-0.25")) == -1 and num.finest_of(0.5) == 1 and num.finest_of(7) == 14
    assert num.ancestor("10", num.finest_of(Decimal("19.99"))) == 1 and num.ancestor("10", -1) == -1


@pytest.mark.parametrize(
    "build",
    [
        lambda: RangeIndex("x", None, granularities=("day", "year")),
        lambda: RangeIndex("x", None, granularities=("week",)),
        lambda: RangeIndex("x", None, granularities=(100, 30)),
        lambda: RangeIndex("x", None, granularities=()),
        lambda: RangeIndex("x", None, normalizer=str),
        lambda: PrefixIndex("x", None, bits=4),
        lambda: PrefixIndex("x", None, max_length=0),
        lambda: SubstringIndex("x", None, n=0),
        lambda: powers_of(1, 1, 3),
        lambda: Table("t", MetaData(), Column("id", Integer, primary_key=True), PrefixIndex("nope", None)),
        lambda: Table(
            "t", MetaData(), Column("id", Integer, primary_key=True), Column("x", String(9)),
            PrefixIndex("x", None), PrefixIndex("x", None),
        ),
    ],
)
def test_bad_settings_are_refused_when_declared(build: object) -> None:
    with pytest.raises(ConfigurationError):
        build()  # type: ignore[operator]
