"""Candidates from the token table, and exact answers from the candidates.

``candidates()`` is the SQL criterion ``pk IN (SELECT row_key FROM tokens
WHERE owner, index AND token IN (...))``: for a substring needle, grouped so
that only rows holding *every* needle token remain. Truncated digests
collide, and a database writer may add tokens, so these are candidates:
:func:`find` re-checks each against its decrypted value, which makes the
result exactly the rows a plaintext ``LIKE`` / ``BETWEEN`` would return.
In array storage the criterion is on the row's own token array instead
(:func:`.arrays.criterion`). A composite primary key meets the token table
through its SQL ``row_key`` (:mod:`.rowkeys`).
"""

from __future__ import annotations

from typing import Any, Sequence

from sqlalchemy import String, cast, false, func, select
from sqlalchemy.orm import Session

from . import arrays, keyring, rowkeys

__all__ = ["candidates", "find"]


def candidates(index: Any, table: Any, needle: Any) -> Any:
    """Rows of ``table`` (the indexed table or an alias of it) that may match.

    The needle is checked now (an unsupported one raises here); its tokens
    are made when the statement executes, under every live key of the
    database it runs on (:mod:`.keyring`), so one statement serves every
    bound engine and matches across a rotation."""
    inputs, all_required = index.query_tokens(needle)
    if index.storage == "array":  # tokens @> / && ARRAY[...] on the row itself
        return arrays.criterion(index, table, inputs, all_required)
    if not inputs:
        return false()
    tokens = index.tokens_table
    pks = rowkeys.columns_of(index)
    pk = pks[0]
    row_key: Any = tokens.c.row_key if isinstance(pk.type, String) or len(pks) > 1 else cast(tokens.c.row_key, pk.type)
    query = select(row_key).where(
        tokens.c.owner == index.owner,
        tokens.c.name == index.name,
        tokens.c.token.in_(keyring.tokens_param(index, inputs)),
    )
    if all_required and len(inputs) > 1:
        # count(*), not count(DISTINCT): hashable, and a duplicated (forged) token
        # only adds a candidate, which the re-check discards
        query = query.group_by(tokens.c.row_key).having(func.count() >= keyring.threshold_param(index, inputs))
    target = getattr(table, "c", None)
    columns = [target[c.key] for c in pks] if target is not None else pks
    if len(columns) > 1:  # a composite key: the row's row_key, computed (rowkeys)
        return rowkeys.sql(columns).in_(query)
    return columns[0].in_(query)


def find(index: Any, session: Session, attribute: Any, needle: Any, where: Sequence[Any]) -> list[Any]:
    """The objects whose ``attribute`` matches ``needle``, exactly."""
    expr = attribute.__clause_element__()
    entity = attribute.parent.entity
    criterion = candidates(index, expr.table, needle)
    found = session.scalars(select(entity).where(criterion, *where)).all()
    return [obj for obj in found if index.accepts(getattr(obj, attribute.key), needle)]
