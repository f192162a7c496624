"""Key jobs: rewrap (CMK rotation), re-encryption and encrypt-column throughput.

These exercise issue 4's API, written against what the issue specifies:
``keys.rewrap(to=provider, batch_size=...)`` returning a report. Where the
API is not there yet, or its signature differs from every form tried below,
the section says "n/a" with the reason; adjust the forms in ``_API_FORMS``
when the real signature lands.

Rewrap never touches row keys (they sit under table keys), so the row keys
of the rewrap benchmark are inserted straight into the key table: fake
wrapped bytes, real rows, which is all a rewrap may read.
"""

from __future__ import annotations

import os
from typing import Any, Callable

from sqlalchemy import Column, Integer, MetaData, String, Table

from ._backend import PREFIX, BackendEnv
from ._data import dataset
from ._rounds import Contender, run_interleaved
from ._settings import Settings

__all__ = ["run_jobs"]

CHUNK = 10_000
BATCH = 1_000


# -- rewrap ---------------------------------------------------------------------------------


class RewrapSet:
    """``row_keys`` row keys under ``table_keys`` table keys, in a key table of their own."""

    def __init__(self, env: BackendEnv, row_keys: int, table_keys: int, cmks: tuple[str, str]) -> None:
        self.env, self.row_keys, self.cmks = env, row_keys, cmks
        self.engine = env.engine()
        from sa_envelope import KeyManager

        provider, self.source_kms = env.kms.provider(cmks[0])
        self.keys = KeyManager(self.engine, provider, table_name=f"{PREFIX}rewrap_keys_{row_keys}")
        self.keys.table.drop(self.engine, checkfirst=True)
        self.keys.create_table()
        parents = [self._table_key(f"{PREFIX}rewrap_t{i}") for i in range(table_keys)]
        self._insert_row_keys(parents)
        self.targets = [env.kms.provider(cmk) for cmk in (cmks[1], cmks[0])]
        self.turn = 0
        self.last: dict[str, Any] = {}

    def _table_key(self, owner: str) -> int:
        with self.engine.begin() as conn, self.keys.use_connection(conn):
            return int(self.keys.encryption_key(owner).key_id)

    def _insert_row_keys(self, parents: list[int]) -> None:
        from sa_envelope.envelope import format as fmt
        from sa_envelope.keys import table as kt

        now, wrapped = kt.utcnow(), os.urandom(60)
        for start in range(0, self.row_keys, CHUNK):
            batch = [
                {"id": fmt.new_key_id(), "scope": kt.SCOPE_ROW, "owner_table": f"{PREFIX}rewrap_t{i % len(parents)}",
                 "parent_id": parents[i % len(parents)], "wrapping_key_id": "parent", "wrapped_key": wrapped,
                 "algorithm": "AES-256-GCM", "status": kt.ACTIVE, "created_at": now, "updated_at": now}
                for i in range(start, min(self.row_keys, start + CHUNK))
            ]
            with self.engine.begin() as conn:
                conn.execute(self.keys.table.insert(), batch)

    def prepare(self) -> None:
        self.source_kms.reset()
        for _, counted in self.targets:
            counted.reset()

    def rewrap(self) -> None:
        """Re-wrap every table key to the other CMK (A to B, then B to A, ...)."""
        provider, counted = self.targets[self.turn % 2]
        self.turn += 1
        report = self.keys.rewrap(to=provider, batch_size=BATCH)
        self.last = {"kms_calls": self.source_kms.total() + counted.total(), "report": _plain(report)}

    def dispose(self) -> None:
        self.keys.table.drop(self.engine, checkfirst=True)
        self.engine.dispose()


def _plain(report: Any) -> Any:
    if hasattr(report, "__dict__"):
        return {k: v for k, v in vars(report).items() if isinstance(v, (int, float, str))}
    return report if isinstance(report, (int, float, str, dict)) else repr(report)


def run_rewrap(env: BackendEnv, settings: Settings) -> dict[str, Any]:
    """Rewrap the same table keys under growing numbers of row keys: flat."""
    cmks = (env.kms.create_cmk(), env.kms.create_cmk())
    sets = [RewrapSet(env, n, settings.table_keys, cmks) for n in settings.rewrap_sizes]
    try:
        contenders = [Contender(str(s.row_keys), [("rewrap", s.rewrap)], s.prepare) for s in sets]
        timings = run_interleaved(contenders, rounds=settings.rounds)
        return {
            "table_keys": settings.table_keys, "timings": timings.as_dict(),
            "sizes": {str(s.row_keys): {"seconds": timings.median(str(s.row_keys), "rewrap"), **s.last} for s in sets},
        }
    finally:
        for s in sets:
            s.dispose()


# -- re-encryption and encrypt-column --------------------------------------------------------


def _job_table(name: str, column_type: Any) -> Table:
    return Table(PREFIX + name, MetaData(), Column("id", Integer, primary_key=True), Column("email", column_type))


def _load(engine: Any, table: Table, rows: int) -> None:
    table.drop(engine, checkfirst=True)
    table.create(engine)
    values = [{"email": email} for email, _, _ in dataset(rows)]
    for start in range(0, rows, CHUNK):
        with engine.begin() as conn:
            conn.execute(table.insert(), values[start:start + CHUNK])


def run_reencrypt(env: BackendEnv, settings: Settings, workers: int = 1) -> dict[str, Any]:
    """Re-encrypt every value of one column from a retired key to the active one
    (one statement per batch; ``workers`` threads sharing the rows)."""
    from sqlalchemy import select

    from sa_envelope import EncryptedType

    engine = env.engine()
    keys, _ = env.key_manager(engine)
    table = _job_table("reencrypt", EncryptedType(String(64), keys))
    old: list[int] = []

    def prepare() -> None:
        _load(engine, table, settings.job_rows)
        kt = keys.table
        with engine.connect() as conn:
            old[:] = [conn.execute(select(kt.c.id).where(kt.c.owner_table == table.name, kt.c.status == "active")).scalar_one()]
        keys.rotate_table_key(table.name)

    def run() -> None:
        keys.reencrypt([table.c.email], key_id=old[0], batch_size=BATCH, workers=workers)

    name = "reencrypt" if workers == 1 else f"reencrypt_{workers}_workers"
    return _throughput(Contender(name, [("job", run)], prepare), settings, engine, table)


def run_encrypt_column(env: BackendEnv, settings: Settings) -> dict[str, Any]:
    """Encrypt an existing plaintext column in place with the Alembic operation."""
    from alembic.migration import MigrationContext
    from alembic.operations import Operations

    import sa_envelope.alembic  # noqa: F401  (registers op.encrypt_column)
    from sa_envelope import EncryptedType

    engine = env.engine()
    keys, _ = env.key_manager(engine)
    table = _job_table("encrypt_column", String(64))

    def run() -> None:
        with engine.connect() as conn:
            context = MigrationContext.configure(conn, opts={"transaction_per_migration": True})
            with context.begin_transaction(_per_migration=True):  # as Alembic runs a revision
                Operations(context).encrypt_column(
                    table.name, "email", EncryptedType(String(64)), keys=keys, batch_size=BATCH
                )

    contender = Contender("encrypt_column", [("job", run)], lambda: _load(engine, table, settings.job_rows))
    return _throughput(contender, settings, engine, table)


def _throughput(contender: Contender, settings: Settings, engine: Any, table: Table) -> dict[str, Any]:
    try:
        timings = run_interleaved([contender], rounds=settings.rounds)
    except Exception as exc:  # an API that binds but fails: report it, keep the run going
        return {"unavailable": f"{contender.name} failed: {type(exc).__name__}: {exc}"}
    finally:
        table.drop(engine, checkfirst=True)
        engine.dispose()
    seconds = timings.median(contender.name, "job") or float("nan")
    return {"rows": settings.job_rows, "seconds": seconds, "rows_per_s": settings.job_rows / seconds,
            "timings": timings.as_dict()}


def run_jobs(env: BackendEnv, settings: Settings) -> dict[str, Any]:
    return {
        "rewrap": _guarded(run_rewrap, env, settings),
        "reencrypt": _guarded(run_reencrypt, env, settings),
        "reencrypt_2_workers": _guarded(lambda e, s: run_reencrypt(e, s, workers=2), env, settings),
        "encrypt_column": _guarded(run_encrypt_column, env, settings),
    }


def _guarded(fn: Callable[[BackendEnv, Settings], dict[str, Any]], env: BackendEnv, settings: Settings) -> dict[str, Any]:
    try:
        return fn(env, settings)
    except Exception as exc:
        return {"unavailable": f"failed: {type(exc).__name__}: {exc}"}
