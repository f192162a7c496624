"""The range index: keyed digests of a value's buckets at a few granularities.

    born = mapped_column(EncryptedType(Date, keys))
    __table_args__ = (RangeIndex("born", keys, granularities=("year", "month", "day")),)
    amount = mapped_column(EncryptedType(Numeric(12, 2), keys))
    __table_args__ = (RangeIndex("amount", keys, granularities=powers_of(10, 1, 5)),)

A value gets one token per granularity: the (keyed) number of the year,
month and day it falls in, or of its bucket of width 100000, 10000, ... for
numbers. A range ``between=(lo, hi)`` (inclusive at both ends, as SQL
``BETWEEN``) becomes the finest buckets from ``lo``'s to ``hi``'s, written
with the fewest buckets: whole years where a year lies inside, then whole
months, then days at the edges (the dyadic cover, here with any nesting
ratio). The database answers one ``IN``; candidates in the edge buckets are
re-checked exactly. Numbers are bucketed with exact decimal arithmetic, so a
float and a Decimal of one value fall in the same bucket.
"""

from __future__ import annotations

import datetime as dt
from decimal import Decimal, localcontext
from typing import Any, Callable, Sequence

from ..errors import ConfigurationError, EncryptionError
from .indexes import SearchIndex
from .keyring import Inputs

__all__ = ["CALENDAR", "RangeIndex", "powers_of"]

CALENDAR = ("year", "month", "day", "hour", "minute", "second")
_SECONDS = {"day": 86400, "hour": 3600, "minute": 60, "second": 1}
_END = (dt.date.max.toordinal() + 1) * 86400  # one past the last second a date can name


def powers_of(base: int, finest: int, levels: int) -> tuple[int, ...]:
    """Bucket widths ``finest * base**k`` for k = levels-1 .. 0, coarsest first
    (``powers_of(10, 1, 4)`` -> ``(1000, 100, 10, 1)``)."""
    if base < 2 or finest < 1 or levels < 1:
        raise ConfigurationError("powers_of needs base >= 2, finest >= 1 and levels >= 1")
    return tuple(finest * base**k for k in reversed(range(levels)))


def _floor_div(value: Decimal, width: Decimal) -> int:
    """floor(value / width), exactly (no rounding: divmod is exact)."""
    with localcontext() as ctx:
        ctx.prec = 80
        q, r = divmod(value, width)
        return int(q) - (1 if r and (r < 0) != (width < 0) else 0)


class _Calendar:
    """Levels of calendar buckets over seconds counted from 0001-01-01."""

    def __init__(self, names: Sequence[str]) -> None:
        self.names = tuple(names)
        self.finest = self.names[-1]

    def seconds(self, value: Any) -> int:
        if isinstance(value, dt.datetime):
            moment: dt.datetime = value
            if moment.tzinfo is not None:
                moment = moment.astimezone(dt.timezone.utc).replace(tzinfo=None)
            return moment.toordinal() * 86400 + moment.hour * 3600 + moment.minute * 60 + moment.second
        if isinstance(value, dt.date):
            return value.toordinal() * 86400
        raise TypeError(type(value).__name__)

    def index(self, level: str, seconds: int) -> int:
        if level in _SECONDS:
            return seconds // _SECONDS[level]
        day = dt.date.fromordinal(min(seconds // 86400, dt.date.max.toordinal()))
        return day.year if level == "year" else day.year * 12 + day.month - 1

    def start(self, level: str, bucket: int) -> int:
        if level in _SECONDS:
            return bucket * _SECONDS[level]
        year, month = (bucket, 1) if level == "year" else divmod(bucket, 12)
        if year > dt.date.max.year:
            return _END
        return dt.date(year, month + (level != "year"), 1).toordinal() * 86400

    def finest_of(self, value: Any) -> int:
        return int(self.index(self.finest, self.seconds(value)))

    def ancestor(self, level: str, f: int) -> int:
        return self.index(level, self.start(self.finest, f))

    def span(self, level: str, bucket: int) -> tuple[int, int]:
        # the next bucket starts on a finest boundary: the second before it is in our last one
        first = self.index(self.finest, self.start(level, bucket))
        return first, self.index(self.finest, self.start(level, bucket + 1) - 1)


class _Numeric:
    """Levels of buckets of decreasing width, each a multiple of the finest."""

    def __init__(self, widths: Sequence[Any]) -> None:
        self.names = tuple(str(w) for w in widths)
        exact = [Decimal(str(w)) if isinstance(w, float) else Decimal(w) for w in widths]
        self.width = exact[-1]
        self.ratio = {}
        for name, w in zip(self.names, exact):
            ratio = w / self.width
            if w <= 0 or ratio != ratio.to_integral_value():
                raise ConfigurationError(f"range widths must be positive multiples of the finest; {w} is not")
            self.ratio[name] = int(ratio)

    def finest_of(self, value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, (int, float, Decimal)):
            raise TypeError(type(value).__name__)
        exact = Decimal(value)
        if not exact.is_finite():
            raise TypeError("a non-finite number")
        return _floor_div(exact, self.width)

    def ancestor(self, level: str, f: int) -> int:
        return f // self.ratio[level]

    def span(self, level: str, bucket: int) -> tuple[int, int]:
        r = self.ratio[level]
        return bucket * r, (bucket + 1) * r - 1


class RangeIndex(SearchIndex):
    """Tokens of the buckets a date, datetime, integer or decimal value falls in.

    ``granularities``: calendar names, coarsest first, from
    ``year, month, day, hour, minute, second`` (default ``year, month, day``);
    or bucket widths for numbers (``powers_of(10, 1, 4)``), each a multiple
    of the finest. ``max_query_tokens`` bounds the ``IN`` of one range query
    (a wider range is refused: add a coarser granularity). Reveals, for
    every granularity, which rows share a bucket (docs/querying.md).
    """

    kind = "range"

    def __init__(
        self,
        source: str,
        keys: Any,
        *,
        granularities: Sequence[Any] = ("year", "month", "day"),
        max_query_tokens: int = 1000,
        **kw: Any,
    ) -> None:
        if kw.get("normalizer") is not None:
            raise ConfigurationError("a RangeIndex compares values as they are: it takes no normalizer")
        super().__init__(source, keys, **kw)
        if not granularities:
            raise ConfigurationError("a RangeIndex needs at least one granularity")
        self.levels: _Calendar | _Numeric
        if all(isinstance(g, str) for g in granularities):
            order = [CALENDAR.index(g) if g in CALENDAR else -1 for g in granularities]
            if -1 in order or order != sorted(set(order)):
                raise ConfigurationError(f"calendar granularities are some of {CALENDAR}, coarsest first")
            self.levels = _Calendar(granularities)
        else:
            self.levels = _Numeric(granularities)
        self.max_query_tokens = max_query_tokens

    def settings(self) -> str:
        return f"bits={self.bits};levels={','.join(self.levels.names)}"

    def _finest(self, value: Any, what: str) -> int:
        try:
            return self.levels.finest_of(value)
        except (TypeError, ValueError, OverflowError, ArithmeticError) as exc:
            raise EncryptionError(
                f"a RangeIndex with granularities {self.levels.names} cannot bucket this {what} ({exc})",
                table=self.owner,
                column=self.column,
            ) from None

    def tokens(self, value: Any) -> set[int]:
        f = self._finest(value, "value")
        return self.digests(self.subkey(), [self._input(n, self.levels.ancestor(n, f)) for n in self.levels.names])

    def _input(self, level: str, bucket: int) -> bytes:
        """A bucket's token input: the level's position (0 = coarsest) and the
        bucket number in decimal ASCII (docs/format.md)."""
        return bytes((self.levels.names.index(level),)) + str(bucket).encode("ascii")

    def cover(self, f_lo: int, f_hi: int) -> list[tuple[str, int]]:
        """The fewest buckets whose union is the finest buckets f_lo .. f_hi."""
        out: list[tuple[str, int]] = []
        self._cover(0, f_lo, f_hi, out)
        return out

    def _cover(self, depth: int, f_lo: int, f_hi: int, out: list[tuple[str, int]]) -> None:
        names, levels = self.levels.names, self.levels
        name = names[depth]
        if depth == len(names) - 1:
            self._check_width(len(out) + f_hi - f_lo + 1)
            out.extend((name, f) for f in range(f_lo, f_hi + 1))
            return
        first, last = levels.ancestor(name, f_lo), levels.ancestor(name, f_hi)
        self._check_width(len(out) + last - first - 1)
        for bucket in range(first, last + 1):
            start, end = levels.span(name, bucket)
            if start >= f_lo and end <= f_hi:
                out.append((name, bucket))
            else:
                self._cover(depth + 1, max(start, f_lo), min(end, f_hi), out)

    def _check_width(self, count: int) -> None:
        if count > self.max_query_tokens:
            raise self.refuse(
                f"the range needs more than {self.max_query_tokens} buckets at granularities "
                f"{self.levels.names}: add a coarser granularity, or narrow the range"
            )

    def query_tokens(self, needle: Any) -> tuple[Inputs, bool]:
        lo, hi = _bounds(needle, self.refuse)
        f_lo, f_hi = self._finest(lo, "bound"), self._finest(hi, "bound")
        if f_lo > f_hi:
            return [], False
        return self.query_of([self._input(n, b) for n, b in self.cover(f_lo, f_hi)], False)

    def acceptor(self, needle: Any) -> Callable[[Any], bool]:
        lo, hi = (_comparable(b) for b in _bounds(needle, self.refuse))

        def accepts(value: Any) -> bool:
            if value is None:
                return False
            try:
                return bool(lo <= _comparable(value) <= hi)
            except TypeError:
                raise self.refuse(f"cannot compare a {type(value).__name__} value with the range's bounds") from None

        return accepts


def _comparable(value: Any) -> Any:
    if isinstance(value, dt.datetime) and value.tzinfo is not None:
        return value.astimezone(dt.timezone.utc).replace(tzinfo=None)
    return value


def _bounds(needle: Any, refuse: Callable[[str], Exception]) -> tuple[Any, Any]:
    if not isinstance(needle, (tuple, list)) or len(needle) != 2 or None in needle:
        raise refuse("between= takes a pair (low, high) of values, inclusive at both ends")
    return needle[0], needle[1]
