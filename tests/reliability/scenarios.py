"""The registered crash scenarios (see :mod:`reliability.crash`).

Key creation is here; the rotation jobs (rewrap, roll-over, re-encryption,
column encryption) are in :mod:`reliability.rotation_scenarios`, imported below.
"""

from __future__ import annotations

from sqlalchemy.orm import Session

from .crash import CrashContext, CrashScenario, count_checked_rows, orphan_values, register
from .rows import add_rows, count_key_rows, insert_rows

__all__ = ["KEY_CREATE"]

BEFORE = range(0, 50)  # patients committed before the job
DURING = range(50, 100)  # patients the job adds
NEW_TABLE = range(0, 50)  # visits: the job's first rows, so its keys are created


def _prepare_key_create(ctx: CrashContext) -> None:
    s = ctx.schema()
    s.create()
    insert_rows(s, "patients", BEFORE)


def _run_key_create(ctx: CrashContext) -> None:
    """One transaction: more rows for a keyed table, the first rows of a new
    one (two key creations: the table key and the deterministic key)."""
    s = ctx.schema()
    with Session(ctx.engine) as session:
        add_rows(s, session, "patients", DURING)
        add_rows(s, session, "visits", NEW_TABLE)
        session.commit()


def _verify_key_create(ctx: CrashContext, crashed: bool | None) -> int:
    assert orphan_values(ctx.engine, ctx.tables) == 0
    if crashed is None:  # killed at a random moment: one transaction, so all or nothing
        crashed = count_key_rows(ctx.engine, "visits") == 0
    if crashed:  # the whole transaction is gone, the committed rows are intact
        assert count_key_rows(ctx.engine, "visits") == 0
        n = count_checked_rows(ctx, "patients", BEFORE)
        return n + count_checked_rows(ctx, "visits", range(0))
    assert count_key_rows(ctx.engine, "visits") == 2  # one table key, one deterministic key
    n = count_checked_rows(ctx, "patients", range(BEFORE.start, DURING.stop))
    return n + count_checked_rows(ctx, "visits", NEW_TABLE)


KEY_CREATE = register(
    CrashScenario(
        name="key.create",
        points=("key.create.before_insert", "key.create.after_insert"),
        prepare=_prepare_key_create,
        run=_run_key_create,
        verify=_verify_key_create,
        occurrences=2,
    )
)

from . import rotation_scenarios  # noqa: E402,F401 - rewrap, roll-over, re-encryption, column jobs
from . import rowkey_scenarios  # noqa: E402,F401
from . import sweep  # noqa: E402,F401
from . import online_scenarios  # noqa: E402,F401 - the online backfill
