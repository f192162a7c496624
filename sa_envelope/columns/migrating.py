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
* equality on the attribute compares both halves (:func:`expand`):
  ``new == x OR (new IS NULL AND old == x)``, which is exact because no
  writer ever leaves the new half set to another value than the old one;
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
from sqlalchemy.sql.elements import BinaryExpression
from sqlalchemy.sql import operators as ops

from ..errors import ConfigurationError

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


EXPANDED = frozenset({ops.eq, ops.ne, ops.in_op, ops.not_in_op, ops.is_, ops.is_not})


def expand(expr: Any, op: Any, other: tuple[Any, ...], encrypted_side: Callable[[], Any]) -> Any | None:
    """The comparison of a migrating column against both halves, or ``None``
    when ``expr`` is not migrating or ``op`` is not one that expands.

    ``encrypted_side()`` builds the comparison on the encrypted column (the
    type's own operate, so its values are sealed). Each half is tested only
    where the newer half leaves it the truth: ``new IS NULL``.
    """
    pair = pair_of(expr)
    if pair is None or op not in EXPANDED:
        return None
    plaintext = op(column_named(expr.table, pair.plaintext), *other)
    encrypted = encrypted_side()
    new_half, old_half = (encrypted, plaintext) if pair.direction == ENCRYPTING else (plaintext, encrypted)
    new_column = expr if pair.direction == ENCRYPTING else column_named(expr.table, pair.plaintext)
    if op is ops.is_:  # IS NULL: both halves are
        return and_(new_half, old_half)
    if op is ops.is_not:
        return or_(new_half, old_half)
    # built directly: ``new_column.is_(None)`` would expand again
    return or_(new_half, and_(BinaryExpression(new_column, null(), ops.is_), old_half))
