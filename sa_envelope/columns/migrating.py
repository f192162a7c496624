"""A column in the middle of an online migration: two halves, one value.

Encrypting a live column (docs/migrations.md) keeps the plaintext column
and an encrypted *shadow* side by side until every row has been moved. The
model declares the encrypted half with ``migrating_from="<plaintext
column>"`` (encrypting) or ``migrating_to="<plaintext shadow>"``
(decrypting); the type then registers a :class:`Pair` on its table, and
three rules read it:

* reads prefer the *new* half (the encrypted shadow while encrypting, the
  plaintext shadow while decrypting) and fall back to the old one where the
  new one is still NULL (:mod:`.merged` in SQL, :mod:`.dualwrite` for ORM loads);
* every write sets both halves in the same statement (:mod:`.dualwrite`);
* every comparison on the attribute (``==``, ``!=``, ``in_``, ``not_in``,
  ``is_distinct_from``, ``is_not_distinct_from``, ``IS [NOT] NULL``) tests
  the half that holds the row's value (:func:`expand`):
  ``(new IS NOT NULL AND new op x) OR (new IS NULL AND old op x)``, true,
  false or NULL exactly where the comparison of the merged value is (so
  ``NOT`` stays exact too); one with a bind parameter or another column
  is refused, as it could cover one half only;
  the encrypted half's comparison is expanded over its live keys
  (:mod:`.livematch`), so it keeps matching during a rotation.

Why the expansion lives in the comparator: it is built with the
expression, like every other decision of :mod:`.operators`, so the SQL a
query sends is the SQL its author can print. Why writes are rewritten at
execution instead: Core statements and the ORM's flush both reach the
engine's ``before_execute``, which sees the parameters of either; a
comparator never sees a write.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Any, Callable

from sqlalchemy import and_, null, or_
from sqlalchemy.sql.elements import BinaryExpression, ClauseElement, Null
from sqlalchemy.sql import operators as ops

from ..errors import ConfigurationError, UnsupportedQueryError

__all__ = [
    "DECRYPTING",
    "ENCRYPTING",
    "Pair",
    "check_declaration",
    "column_named",
    "expand",
    "pair_of",
    "pairs_of",
    "register",
]

ENCRYPTING, DECRYPTING = "encrypting", "decrypting"


@dataclass(frozen=True)
class Pair:
    """The two halves of one migrating column of a table, by column name."""

    encrypted: str  # the column whose type is the EncryptedType
    plaintext: str  # its twin: the original (encrypting) or the shadow (decrypting)
    direction: str  # ENCRYPTING or DECRYPTING

    @property
    def new(self) -> str:
        """The half that reads prefer: the one the migration moves to."""
        return self.encrypted if self.direction == ENCRYPTING else self.plaintext

    @property
    def old(self) -> str:
        return self.plaintext if self.direction == ENCRYPTING else self.encrypted


# Table -> {encrypted column name: Pair}. Not in ``Table.info``: Alembic
# autogenerate renders a table's info into ``create_table(..., info=...)``
# with ``repr``, which names a class the migration does not import. A copy
# (``Table.to_metadata``, a mixin) registers its own pairs when its copied
# EncryptedType attaches to the new column (:meth:`EncryptedType._on_table_attach`).
_pairs: weakref.WeakKeyDictionary[Any, dict[str, Pair]] = weakref.WeakKeyDictionary()


def check_declaration(migrating_from: str | None, migrating_to: str | None) -> None:
    """Refuse declarations the online migration cannot serve (any scope can:
    row keys are made by the dual writes' hooks and by the backfill)."""
    if migrating_from is not None and migrating_to is not None:
        raise ConfigurationError("give migrating_from (encrypting) or migrating_to (decrypting), not both")


def register(table: Any, encrypted: str, plaintext: str, direction: str) -> None:
    """Record on ``table`` that ``encrypted`` migrates with ``plaintext``."""
    if plaintext == encrypted:
        raise ConfigurationError(
            f"{table.fullname}.{encrypted}: the plaintext twin must be another column (migrating_from/migrating_to)",
            table=table.fullname,
            column=encrypted,
        )
    _pairs.setdefault(table, {})[encrypted] = Pair(encrypted, plaintext, direction)


_NONE: dict[str, Pair] = {}


def pairs_of(table: Any) -> dict[str, Pair]:
    """The migrating pairs of ``table`` (a Table; aliases and annotated tables answer for theirs)."""
    base = getattr(table, "element", table)  # an Alias names its table as .element
    base = base._deannotate() if hasattr(base, "_deannotate") else base
    try:
        return _pairs.get(base, _NONE)
    except TypeError:  # not weakly referenceable: not a table
        return _NONE


def pair_of(column: Any) -> Pair | None:
    """The pair whose encrypted half is ``column`` (a Column, maybe annotated)."""
    table = getattr(column, "table", None)
    return pairs_of(table).get(getattr(column, "name", "")) if table is not None else None


def column_named(table: Any, name: str) -> Any:
    """``table``'s column called ``name`` (by name, not by key)."""
    for column in table.c:
        if column.name == name:
            return column
    raise ConfigurationError(
        f"{getattr(table, 'fullname', table)}.{name}: the migrating twin is not declared on the table "
        "(map it with mapped_column, or add it to the Table)",
        table=getattr(table, "fullname", None),
        column=name,
    )


EXPANDED = frozenset(
    {ops.eq, ops.ne, ops.in_op, ops.not_in_op, ops.is_, ops.is_not, ops.is_distinct_from, ops.is_not_distinct_from}
)


def _value_only(operand: Any) -> bool:
    """A Python value, NULL, or a list of them: what both halves can be given."""
    if isinstance(operand, (list, tuple, set, frozenset)):
        return all(_value_only(v) for v in operand)
    if operand is None or isinstance(operand, Null):
        return True
    return not isinstance(operand, ClauseElement) and not hasattr(operand, "__clause_element__")


def _refuse_unsplittable(expr: Any, op: Any, other: tuple[Any, ...], pair: Pair) -> None:
    """A bind parameter has one value, sealed for one half *or* sent as
    plaintext to the other; another column's ciphertexts (a self-join, a
    subquery) compare with one half only. Either would answer for one half:
    refused when the expression is built."""
    if all(_value_only(v) for v in other):
        return
    table = getattr(expr.table, "fullname", None)
    raise UnsupportedQueryError(
        f"a comparison ({getattr(op, '__name__', op)}) of {table}.{expr.name} with a bind parameter, another "
        f"column or a subquery cannot cover both halves while the column is migrating ({pair.direction}, twin "
        f"{pair.plaintext}): compare with plain Python values (== v, in_([...])), or run it after the "
        "contract step (docs/querying.md)",
        table=table,
        column=expr.name,
    )


def expand(expr: Any, op: Any, other: tuple[Any, ...], encrypted_side: Callable[[], Any]) -> Any | None:
    """The comparison of a migrating column against both halves, or ``None``
    when ``expr`` is not migrating or ``op`` is not one that expands.

    ``encrypted_side()`` builds the comparison on the encrypted column (the
    type's own operate, so its values are sealed). A row's value is its new
    half where that is set, its old half otherwise, so the comparison is::

        (new IS NOT NULL AND <op on new>) OR (new IS NULL AND <op on old>)

    The guards are never NULL and exactly one is true, so the whole is true,
    false or NULL exactly where the comparison of the row's value is: it
    stays exact under ``NOT`` (``~``), where ``new op x OR (new IS NULL AND
    old op x)`` is NULL instead of false for a row not yet backfilled.
    """
    pair = pair_of(expr)
    if pair is None or op not in EXPANDED:
        return None
    _refuse_unsplittable(expr, op, other, pair)
    plaintext = op(column_named(expr.table, pair.plaintext), *other)
    encrypted = encrypted_side()
    new_half, old_half = (encrypted, plaintext) if pair.direction == ENCRYPTING else (plaintext, encrypted)
    new_column = expr if pair.direction == ENCRYPTING else column_named(expr.table, pair.plaintext)
    null_test = _null_test(op, other)
    if null_test is ops.is_:  # the value is NULL where both halves are
        return and_(new_half, old_half)
    if null_test is ops.is_not:
        return or_(new_half, old_half)
    # built directly: ``new_column.is_(None)`` would expand again
    is_set: Any = BinaryExpression(new_column, null(), ops.is_not)
    is_unset: Any = BinaryExpression(new_column, null(), ops.is_)
    return or_(and_(is_set, new_half), and_(is_unset, old_half))


def _null_test(op: Any, other: tuple[Any, ...]) -> Any:
    """``ops.is_`` / ``ops.is_not`` when ``op`` with ``other`` tests for NULL
    (``IS NULL``, ``== None``, ``is_not_distinct_from(None)``, ...), else None:
    two-valued on each half, so both halves combine without guards."""
    if len(other) != 1 or not (other[0] is None or isinstance(other[0], Null)):
        return None
    if op in (ops.is_, ops.eq, ops.is_not_distinct_from):
        return ops.is_
    return ops.is_not if op in (ops.is_not, ops.ne, ops.is_distinct_from) else None
