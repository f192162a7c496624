"""Every comparison a deterministic migrating column answers, against its plaintext answer.

The table holds, beside the two halves of the migrating column, a plain
``ref`` column with each row's logical value (what a read returns). Each
comparison on the migrating column must select exactly the rows the same
comparison on ``ref`` selects, in the database, with the column
half-backfilled: rows with only the old half set, both halves, only the new
half, neither. Negations (``~``) are included: an expansion that answers
NULL where the plaintext answers false is right until it is negated.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import pytest
from sqlalchemy import Column, Integer, LargeBinary, MetaData, String, Table, bindparam, insert, not_, select, text
from sqlalchemy.engine import Engine

from sa_envelope import EncryptedType, KeyManager, LocalKeyProvider, UnsupportedQueryError

# (id, logical value, which halves are set): "old" = not yet backfilled, "new" = only the new half
ROWS = [
    (1, "a@x", "old"), (2, "a@x", "both"), (3, "a@x", "new"),
    (4, "b@x", "old"), (5, "b@x", "both"), (6, "c@x", "new"),
    (7, "d@x", "old"), (8, None, "none"), (9, None, "none"), (10, "e@x", "both"),
]  # fmt: skip

Op = Callable[[Any], Any]
VALUES = ["a@x", "b@x", "c@x", "d@x", "e@x", "nobody@x"]
OPERATORS: dict[str, Callable[[Any, str], Any]] = {
    "==": lambda c, v: c == v,
    "!=": lambda c, v: c != v,
    "~==": lambda c, v: ~(c == v),
    "~!=": lambda c, v: ~(c != v),
    "in_": lambda c, v: c.in_([v, "c@x"]),
    "not_in": lambda c, v: c.not_in([v, "c@x"]),
    "~in_": lambda c, v: ~c.in_([v, "b@x"]),
    "is_distinct_from": lambda c, v: c.is_distinct_from(v),
    "is_not_distinct_from": lambda c, v: c.is_not_distinct_from(v),
    "~is_distinct_from": lambda c, v: not_(c.is_distinct_from(v)),
    "~is_not_distinct_from": lambda c, v: ~c.is_not_distinct_from(v),
}
NULL_TESTS: dict[str, Op] = {
    "is_(None)": lambda c: c.is_(None),
    "is_not(None)": lambda c: c.is_not(None),
    "== None": lambda c: c == None,  # noqa: E711
    "!= None": lambda c: c != None,  # noqa: E711
    "~(== None)": lambda c: ~(c == None),  # noqa: E711
    "is_distinct_from(None)": lambda c: c.is_distinct_from(None),
    "is_not_distinct_from(None)": lambda c: c.is_not_distinct_from(None),
    "~is_distinct_from(None)": lambda c: ~c.is_distinct_from(None),
    "in_([])": lambda c: c.in_([]),
    "not_in([])": lambda c: c.not_in([]),
    "~in_([])": lambda c: ~c.in_([]),
}


def _tables(keys: KeyManager, direction: str) -> tuple[Table, Table]:
    """(the model's table, the raw table over the same columns)."""
    if direction == "encrypting":
        enc = EncryptedType(String(50), keys, deterministic=True, migrating_from="email")
    else:
        enc = EncryptedType(String(50), keys, deterministic=True, migrating_to="email__plaintext")
    encrypted_name = "email__encrypted" if direction == "encrypting" else "email"
    plain_name = "email" if direction == "encrypting" else "email__plaintext"
    model = Table(
        f"ops_{direction}", MetaData(),
        Column("id", Integer, primary_key=True, autoincrement=False),
        Column(encrypted_name, enc),
        Column(plain_name, String(50)),
        Column("ref", String(50)),
    )  # fmt: skip
    raw = Table(
        model.name, MetaData(),
        Column("id", Integer, primary_key=True, autoincrement=False),
        Column(encrypted_name, LargeBinary),
        Column(plain_name, String(50)),
        Column("ref", String(50)),
    )  # fmt: skip
    return model, raw


def _fill(engine: Engine, model: Table, raw: Table, direction: str) -> None:
    """Every row through the dual writes, then the half a state lacks set to NULL, raw."""
    encrypted_name = "email__encrypted" if direction == "encrypting" else "email"
    plain_name = "email" if direction == "encrypting" else "email__plaintext"
    old_name, new_name = (plain_name, encrypted_name) if direction == "encrypting" else (encrypted_name, plain_name)
    with engine.begin() as conn:
        conn.execute(insert(model), [{"id": i, encrypted_name: v, "ref": v} for i, v, _ in ROWS])
        for i, _, state in ROWS:
            if state == "old":
                conn.execute(raw.update().where(raw.c.id == i).values({new_name: None}))
            elif state == "new":
                conn.execute(raw.update().where(raw.c.id == i).values({old_name: None}))
    with engine.connect() as conn:  # the states are what the test says they are
        stored = {
            r.id: (r[1] is not None, r[2] is not None)
            for r in conn.execute(select(raw.c.id, raw.c[old_name], raw.c[new_name]))
        }
    want = {"old": (True, False), "both": (True, True), "new": (False, True), "none": (False, False)}
    assert stored == {i: want[state] for i, _, state in ROWS}


def _ids(engine: Engine, table: Table, where: Any) -> list[int]:
    with engine.connect() as conn:
        return sorted(conn.execute(select(table.c.id).where(where)).scalars())


def _half_migrated(engine: Engine, tmp_path: Path, direction: str) -> tuple[Any, Any]:
    """The table with rows in every state, and the migrating column under test."""
    keys = KeyManager(engine, LocalKeyProvider.from_file(tmp_path / "k.key"))
    keys.create_table()
    model, raw = _tables(keys, direction)
    model.create(engine)
    _fill(engine, model, raw, direction)
    return model, model.c["email__encrypted" if direction == "encrypting" else "email"]


@pytest.mark.parametrize("direction", ["encrypting", "decrypting"])
def test_every_comparison_answers_as_the_plaintext_twin(engine: Engine, tmp_path: Path, direction: str) -> None:
    model, column = _half_migrated(engine, tmp_path, direction)
    ref = model.c.ref
    wrong = []
    for name, build in OPERATORS.items():
        for value in VALUES:
            got, want = _ids(engine, model, build(column, value)), _ids(engine, model, build(ref, value))
            if got != want:
                wrong.append(f"{name} {value!r}: {got} != plaintext {want}")
    for name, test in NULL_TESTS.items():
        got, want = _ids(engine, model, test(column)), _ids(engine, model, test(ref))
        if got != want:
            wrong.append(f"{name}: {got} != plaintext {want}")
    assert not wrong, "\n".join(wrong)


@pytest.mark.parametrize("direction", ["encrypting", "decrypting"])
def test_comparisons_that_cannot_cover_both_halves_are_refused(engine: Engine, tmp_path: Path, direction: str) -> None:
    """A bind parameter's one value cannot be sealed for one half and sent as
    plaintext for the other, nor can another row's shadow be compared with
    this row's twin: refused when built, never half answered."""
    model, column = _half_migrated(engine, tmp_path, direction)
    other = model.alias("other").c[column.name]
    refused: list[Callable[[], Any]] = [
        lambda: column == bindparam("e"),
        lambda: column.in_(bindparam("e", expanding=True)),
        lambda: column.is_distinct_from(bindparam("e")),
        lambda: column == other,
        lambda: column.is_not_distinct_from(other),
    ]
    for build in refused:
        with pytest.raises(UnsupportedQueryError, match="migrat"):
            build()
    with engine.connect() as conn:  # the refusal left the table as it was
        assert conn.execute(text(f"SELECT COUNT(*) FROM {model.name}")).scalar() == len(ROWS)
