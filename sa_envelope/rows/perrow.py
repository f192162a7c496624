"""An executemany run one row per statement, atomically, when rows must not be folded.

Two Core writes of row-scoped columns cannot go through the driver's own
executemany:

* an upsert whose SET takes a parameter per row (:mod:`.upserts`): MySQL's
  drivers (PyMySQL, mysqlclient) rewrite an executemany ``INSERT ... VALUES``
  into one multi-row statement and send its ``ON DUPLICATE KEY UPDATE``
  unformatted; SQLAlchemy's "insertmanyvalues" renders one SET for a batch;
* an INSERT of several rows whose primary keys the database makes, on a
  backend or table without sorted RETURNING (MySQL, ``implicit_returning=
  False``): only ``cursor.lastrowid``, one row at a time, tells each row's key.

:func:`one_by_one` marks such a statement (the statement object the
``before_execute`` hook hands SQLAlchemy: execution options set there are
not read any more); the ``do_executemany`` listener (:func:`install_perrow`) then runs
``cursor.execute`` once per parameter set inside a savepoint, so that the
statement stays all-or-nothing as the folded one was (on MySQL and SQLite a
failed statement leaves the transaction open), sums the rows' counts into the
result's ``rowcount`` (as SQLAlchemy's MySQL dialect does for its own
executemany) and records each row's ``lastrowid`` for :mod:`.core`, which
binds the rows' keys once the statement succeeded.

SQLAlchemy's own "insertmanyvalues" (an executemany with RETURNING, or
psycopg2's batches) never reaches ``do_executemany``. Where it knows a SET
parameter per row (SQLAlchemy 2.1 on PostgreSQL and SQLite) it runs such an
upsert one row per statement itself; elsewhere it would fold the rows
(:func:`folds_set_parameters`), and :mod:`.core` refuses the statement.
"""

from __future__ import annotations

import weakref
from typing import Any

from ..keys.listeners import Listeners

__all__ = ["LASTROWIDS", "folds_set_parameters", "install_perrow", "one_by_one"]

_MARKED: weakref.WeakSet[Any] = weakref.WeakSet()
LASTROWIDS = "sa_envelope_lastrowids"  # Connection.info: the last such statement's lastrowid per row
_SAVEPOINT = "sa_envelope_rows"


def one_by_one(stmt: Any) -> Any:
    """A copy of ``stmt`` marked to run one row per statement when executed with many parameter sets."""
    new = stmt._generate()
    _MARKED.add(new)
    return new


def folds_set_parameters(dialect: Any, stmt: Any, column_keys: list[str]) -> bool:
    """An executemany of the upsert ``stmt`` (its SET taking a parameter per
    row) would go to SQLAlchemy's insertmanyvalues, which would fold its rows
    under one SET: it runs such a statement one row at a time only where its
    compiler marks the SET's parameters (``has_upsert_bound_parameters``:
    SQLAlchemy 2.1's PostgreSQL and SQLite compilers, not MySQL's)."""
    if not (stmt._returning or stmt._return_defaults or getattr(dialect, "use_insertmanyvalues_wo_returning", False)):
        return False  # a plain executemany: do_executemany, run one row per statement here
    compiled: Any = stmt.compile(dialect=dialect, column_keys=column_keys, for_executemany=True)
    imv = getattr(compiled, "_insertmanyvalues", None)
    if imv is None:
        return False
    return not (getattr(imv, "has_upsert_bound_parameters", False) and not imv.embed_values_counter)


def install_perrow(listeners: Listeners) -> None:
    """Listen on the dialect of the engine of ``listeners`` (once per engine,
    shared by every binding of it; removed with the last on unbind)."""
    listeners.share("do_executemany", _do_executemany)


def _do_executemany(cursor: Any, statement: str, parameters: Any, context: Any) -> bool:
    if context.invoked_statement not in _MARKED:
        return False  # SQLAlchemy runs it as usual
    if _outside_transaction(context):
        cursor.execute("BEGIN")  # else the RELEASE below would commit the rows before their keys
    cursor.execute(f"SAVEPOINT {_SAVEPOINT}")
    total, ids = 0, []
    execute = cursor.execute
    try:
        for params in parameters:
            execute(statement, params)
            count = cursor.rowcount
            total += max(count, 0)
            # a row not inserted (OR IGNORE) leaves the previous row's lastrowid: unknown, not that
            ids.append(getattr(cursor, "lastrowid", None) if count == 1 else None)
    except BaseException:
        try:
            cursor.execute(f"ROLLBACK TO SAVEPOINT {_SAVEPOINT}")
        except Exception:  # the connection is gone: the statement's own error says more
            pass
        raise
    cursor.execute(f"RELEASE SAVEPOINT {_SAVEPOINT}")
    context._rowcount = total  # what CursorResult.rowcount reports (SQLAlchemy's MySQL dialect sets it too)
    context.root_connection.info[LASTROWIDS] = ids
    return True


def _outside_transaction(context: Any) -> bool:
    """SQLite (pysqlite, aiosqlite) with no transaction open yet: the driver
    begins one implicitly before an INSERT, not before a ``SAVEPOINT``, and
    a ``SAVEPOINT`` outside a transaction opens one that its ``RELEASE``
    commits. The statement's rows would then be committed before
    :mod:`.core` inserts their keys. Not under AUTOCOMMIT, where each
    statement commits anyway (and the keys were inserted first)."""
    conn = context.root_connection
    if context.dialect.name != "sqlite" or conn._is_autocommit_isolation():
        return False
    return getattr(conn.connection.driver_connection, "in_transaction", True) is False
