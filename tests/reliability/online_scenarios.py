"""The crash scenario of the online backfill (sa_envelope.jobs.backfill).

Six rows, batches of two in ranges of four: each fault point is passed
three times. A crash leaves each row with its shadow empty or equal to its
plaintext, never anything else, and a rerun (after the dead worker's short
lease) fills the rest.
"""

from __future__ import annotations

from sqlalchemy import String, insert

from sa_envelope import EncryptedType, KeyManager
from sa_envelope.jobs.backfill import backfill
from sa_envelope.jobs.claims import Claims
from support.online import raw_users, stored

from .crash import CrashContext, CrashScenario, register

__all__ = ["BACKFILL"]

PEOPLE = {1: "ada@example.org", 2: "alan@example.org", 3: None, 4: "grace@example.org", 5: "edsger@example.org",
          6: "barbara@example.org"}


def _prepare(ctx: CrashContext) -> None:
    ctx.schema().create()
    table = raw_users("people_online")
    table.create(ctx.engine)
    with ctx.engine.begin() as conn:
        conn.execute(insert(table), [{"id": i, "email": e} for i, e in PEOPLE.items()])


def _run(ctx: CrashContext) -> None:
    keys = KeyManager(ctx.engine, ctx.provider)
    enc = EncryptedType(String(200), keys, deterministic=True, context="people_online.email")
    backfill(keys.store, enc, "people_online", "email", "email__encrypted", batch_size=2, chunk=4, lease=0.5,
             progress=False)


def _verify(ctx: CrashContext, crashed: bool | None) -> int:
    rows = stored(ctx.engine, KeyManager(ctx.engine, ctx.provider), "people_online")
    assert {i: plain for i, (plain, _) in rows.items()} == PEOPLE
    assert all(enc in (None, plain) for plain, enc in rows.values())
    if crashed is False:
        assert all(enc == plain for plain, enc in rows.values())
        left, _ = Claims(ctx.engine, "encrypt-column:people_online.email").pending()
        assert left == 0
    return len(rows)


BACKFILL = register(CrashScenario(
    name="backfill",
    points=("backfill.batch.before_update", "backfill.batch.after_update"),
    prepare=_prepare, run=_run, verify=_verify,
    occurrences=3,
))
