"""Shared machinery of the tampering properties (tests/test_reliability_tamper*.py).

Each property draws one mutation of stored bytes or of a key row, applies it
with raw SQL, reads through the package, and restores the original. These
helpers draw the mutations, write raw bytes, and tally what was tried into
the reliability figures.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any, Callable

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import LargeBinary, bindparam, text
from sqlalchemy.engine import Engine

from sa_envelope import EnvelopeError

__all__ = ["BYTE_MUTATIONS", "SETTINGS", "StoredCell", "flip", "mutate_bytes", "outcome", "run_property", "write_raw"]

SETTINGS: dict[str, Any] = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow])


def flip(data: st.DataObject, b: bytes) -> bytes:
    """``b`` with one drawn bit flipped."""
    i = data.draw(st.integers(0, len(b) - 1))
    return b[:i] + bytes([b[i] ^ (1 << data.draw(st.integers(0, 7)))]) + b[i + 1 :]


@dataclass(frozen=True)
class StoredCell:
    """One stored encrypted value as written: where it is, and its bytes."""

    table: str
    id: int
    column: str
    stored: bytes


BYTE_MUTATIONS = ("flip", "truncate", "extend", "version")


def mutate_bytes(data: st.DataObject, kind: str, v: bytes) -> bytes:
    """One of :data:`BYTE_MUTATIONS` of a stored value ``v``: a bit flipped,
    cut short, bytes appended, or another first (version) byte."""
    if kind == "flip":
        return flip(data, v)
    if kind == "truncate":
        return v[: data.draw(st.integers(0, len(v) - 1))]
    if kind == "extend":
        return v + data.draw(st.binary(min_size=1, max_size=32))
    return bytes([data.draw(st.integers(0, 255).filter(lambda b: b != v[0]))]) + v[1:]


def write_raw(engine: Engine, table: str, column: str, row_id: int, value: bytes | None) -> None:
    """Store ``value`` as is (no encryption) in one cell, committed."""
    stmt = text(f"UPDATE {table} SET {column} = :v WHERE id = :id").bindparams(bindparam("v", type_=LargeBinary))
    with engine.begin() as conn:
        conn.execute(stmt, {"v": value, "id": row_id})


def outcome(read: Callable[[], Any], error: type[EnvelopeError] = EnvelopeError) -> Any:
    """What ``read()`` returned, or the class ``error`` if it raised one of
    ours of that class (anything else propagates and fails the property)."""
    try:
        return read()
    except error:
        return error


def run_property(examples: int, example: Callable[[st.DataObject], str], reliability: Any, prefix: str) -> None:
    """Run ``example`` (which returns the kind of mutation it tried) under
    hypothesis, then add the kinds tried to the reliability figures."""
    tried: Counter[str] = Counter()

    @settings(max_examples=examples, **SETTINGS)
    @given(data=st.data())
    def check(data: st.DataObject) -> None:
        tried[example(data)] += 1

    check()
    for kind, n in tried.items():
        reliability.bad_input(f"{prefix} {kind}", n)
