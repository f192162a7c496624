"""Candidates from the token table, and exact answers from the candidates.

``candidates()`` is the SQL criterion ``pk IN (SELECT row_key FROM tokens
WHERE owner, index AND token IN (...))``. For a substring needle, whose rows
hold *every* needle token, it is that for one token (the *driver*) with a
correlated ``EXISTS`` per other token: each is a point lookup of the full
primary key ``(owner, name, token, row_key)``, so the cost is the driver's
rows, not the sum of every token's (a ``GROUP BY row_key HAVING count(*)``
over all of them measured 6 times slower on SQLite and 30 times on MariaDB,
which also sorted them into a temporary table). On SQLite, :func:`find`
asks an ``INTERSECT`` of the tokens' row keys instead (``shape="intersect"``):
each token's rows are one range of the primary key, read in order, where
the driver's ``EXISTS`` probes are random reads (measured 2 times faster
at 100,000 rows). :func:`find` picks the
rarest token as the driver, by reading a few of each token's rows
(:func:`rarest_first`), and keeps the :data:`DRIVEN` rarest: past three, a
further ``EXISTS`` removed fewer candidates than it cost. Truncated digests collide,
and a database writer may add tokens, so these are candidates: :func:`find`
re-checks each against its decrypted value, which makes the result exactly
the rows a plaintext ``LIKE`` / ``BETWEEN`` would return. Where candidates
are loose (a substring needle: its n-grams may sit apart in a row), it
first reads only each candidate's key and indexed value, re-checks that,
and loads the objects of the rows that pass (:func:`_prechecked`); every
object is re-checked again. In array storage
the criterion is on the row's own token array instead
(:func:`.arrays.criterion`). A composite primary key meets the token table
through its SQL ``row_key`` (:mod:`.rowkeys`).
"""

from __future__ import annotations

from typing import Any, Sequence

from sqlalchemy import Connection, Integer, Numeric, String, cast, exists, false, intersect, select, tuple_
from sqlalchemy.orm import Session

from ..columns.migrating import pairs_of
from . import arrays, keyring, rowkeys

__all__ = ["DRIVEN", "LOAD_CHUNK", "PROBE_ROWS", "candidates", "find", "rarest_first"]

PROBE_ROWS = 200  # rows a probe reads per token
DRIVEN = 3  # tokens a lookup's candidates hold, the rarest: the driver and 2 EXISTS
LOAD_CHUNK = 500  # keys per IN when the objects of re-checked rows are loaded


def candidates(index: Any, table: Any, needle: Any, order: Sequence[bytes] | None = None, shape: str = "exists") -> Any:
    """Rows of ``table`` (the indexed table or an alias of it) that may match.

    The needle is checked now (an unsupported one raises here); its tokens
    are made when the statement executes, under every live key of the
    database it runs on (:mod:`.keyring`), so one statement serves every
    bound engine and matches across a rotation. ``order``: the needle's
    token inputs, rarest first (:func:`rarest_first`), of which the
    :data:`DRIVEN` first are used; by default every input, in the needle's order.
    ``shape``: ``"exists"`` (the driver and an ``EXISTS`` per other token) or
    ``"intersect"`` (an ``INTERSECT`` of each token's row keys: SQLite)."""
    inputs, all_required = index.query_tokens(needle)
    if index.storage == "array":  # tokens @> / && ARRAY[...] on the row itself
        return arrays.criterion(index, table, inputs, all_required)
    if not inputs:
        return false()
    tokens = index.tokens_table
    pks = rowkeys.columns_of(index)
    if not all_required:  # any one token will do
        query = _rows_holding(index, tokens, pks, inputs)
    else:
        chosen = list(order)[:DRIVEN] if order is not None else list(inputs)
        query = _intersect(index, tokens, pks, chosen) if shape == "intersect" else _exists(index, tokens, pks, chosen)
    target = getattr(table, "c", None)
    columns = [target[c.key] for c in pks] if target is not None else pks
    if len(columns) > 1:  # a composite key: the row's row_key, computed (rowkeys)
        return rowkeys.sql(columns).in_(query)
    return columns[0].in_(query)


def _exists(index: Any, tokens: Any, pks: list[Any], chosen: Sequence[bytes]) -> Any:
    """The driver's row keys that hold every other token (an ``EXISTS`` each)."""
    first, *rest = chosen
    driver = tokens.alias("sae_t0")
    query = _rows_holding(index, driver, pks, [first])
    for i, what in enumerate(rest, 1):  # a row holding the driver's token must hold this one too
        other = tokens.alias(f"sae_t{i}")
        query = query.where(exists().where(*_holds(index, other, [what]), other.c.row_key == driver.c.row_key))
    return query


def _intersect(index: Any, tokens: Any, pks: list[Any], chosen: Sequence[bytes]) -> Any:
    """The row keys holding every token: ``INTERSECT`` of each token's (one
    primary-key range, read in order)."""
    if len(chosen) == 1:
        return _rows_holding(index, tokens, pks, chosen)
    both = intersect(*[select(tokens.c.row_key).where(*_holds(index, tokens, [what])) for what in chosen]).subquery()
    return select(_as_key(pks, both.c.row_key))


def _holds(index: Any, tokens: Any, inputs: Sequence[bytes]) -> list[Any]:
    """``tokens`` rows of ``index`` whose token is one of ``inputs``' under any live key."""
    return [
        tokens.c.owner == index.owner,
        tokens.c.name == index.name,
        tokens.c.token.in_(keyring.tokens_param(index, inputs)),
    ]


def _rows_holding(index: Any, tokens: Any, pks: list[Any], inputs: Sequence[bytes]) -> Any:
    return select(_as_key(pks, tokens.c.row_key)).where(*_holds(index, tokens, inputs))


def _as_key(pks: list[Any], row_key: Any) -> Any:
    """``row_key`` as the indexed table's key type (one-column keys)."""
    pk = pks[0]
    if isinstance(pk.type, Integer) and len(pks) == 1:
        # MariaDB: a key CAST to SIGNED made it scan the whole indexed table against the
        # materialized row keys; CAST to DECIMAL(20, 0) lets it start from the tokens
        return cast(row_key, pk.type.with_variant(Numeric(20, 0), "mysql", "mariadb"))
    if not isinstance(pk.type, String) and len(pks) == 1:
        return cast(row_key, pk.type)
    return row_key


def rarest_first(index: Any, conn: Connection, inputs: Sequence[bytes]) -> list[bytes]:
    """``inputs`` ordered rarest first, by a probe that reads at most
    :data:`PROBE_ROWS` rows of each token (one statement, index-only).

    The probe asks each token for its :data:`PROBE_ROWS`-th row key in the
    index's order: a token with fewer rows has none (rare: first, in the
    needle's order); for the others, every token's rows are a subset of the
    same rows in the same order, so the further that key lies, the fewer
    rows hold the token. Only speed depends on this; the answer never does."""
    tokens = index.tokens_table
    probes = [
        select(tokens.c.row_key)
        .where(*_holds(index, tokens, [what]))
        .order_by(tokens.c.row_key)
        .limit(1)
        .offset(PROBE_ROWS - 1)
        .scalar_subquery()
        for what in inputs
    ]
    found = conn.execute(select(*probes)).one()
    rare = [i for i, last in enumerate(found) if last is None]
    common = sorted((i for i, last in enumerate(found) if last is not None), key=lambda i: found[i], reverse=True)
    return [inputs[i] for i in rare + common]


def find(index: Any, session: Session, attribute: Any, needle: Any, where: Sequence[Any]) -> list[Any]:
    """The objects whose ``attribute`` matches ``needle``, exactly."""
    expr = attribute.__clause_element__()
    mapper = attribute.parent.mapper
    conn = session.connection(bind_arguments={"mapper": mapper})
    order = None
    inputs, all_required = index.query_tokens(needle)
    if index.storage != "array" and all_required and len(inputs) > 1:
        order = rarest_first(index, conn, inputs)
    shape = "intersect" if conn.dialect.name == "sqlite" else "exists"
    criterion = candidates(index, expr.table, needle, order, shape)
    # arrays: PostgreSQL measured slower with the two statements (4.42x against 3.12x pg_trgm)
    if index.storage != "array" and index.loose(needle) and not pairs_of(expr.table):  # migrating: merged value
        found = _prechecked(index, session, attribute, needle, criterion, where)
    else:
        found = session.scalars(select(attribute.parent.entity).where(criterion, *where)).all()
    accepts, key = index.acceptor(needle), attribute.key
    return [obj for obj in found if accepts(getattr(obj, key))]


def _prechecked(
    index: Any, session: Session, attribute: Any, needle: Any, criterion: Any, where: Sequence[Any]
) -> Sequence[Any]:
    """The objects of the candidates whose value passes the re-check.

    The candidates' keys and indexed value come first, the value decrypted
    and re-checked: a candidate that fails costs one decryption, not an
    object and every encrypted column's. The objects of the rest are then
    loaded by key (the caller re-checks them too: a row may change between
    the two statements)."""
    entity, mapper = attribute.parent.entity, attribute.parent.mapper
    keys = [getattr(entity, mapper.get_property_by_column(c).key) for c in mapper.primary_key]
    rows = session.execute(select(*keys, attribute).where(criterion, *where)).all()
    accepts = index.acceptor(needle)
    hits = [tuple(row[:-1]) for row in rows if accepts(row[-1])]
    found: list[Any] = []
    for start in range(0, len(hits), LOAD_CHUNK):
        chunk = hits[start : start + LOAD_CHUNK]
        by_key = keys[0].in_([k[0] for k in chunk]) if len(keys) == 1 else tuple_(*keys).in_(chunk)
        found.extend(session.scalars(select(entity).where(by_key, *where)).all())
    return found
