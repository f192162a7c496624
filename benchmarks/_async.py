"""The Core path through the async engine (aiosqlite, asyncpg).

Same steps as ``_core`` (executemany insert, select with every value
touched), for the baselines and sa-envelope table and deterministic scope,
each awaited on one event loop kept for the whole section (so no step pays
for a loop's start). The floor runs through the same async engine, so the
ratio isolates what the column types add under asyncio. MariaDB has no
async driver in the bench extra and is reported "n/a".
"""

from __future__ import annotations

import asyncio
from typing import Any

from sqlalchemy import Column, Integer, MetaData, Table, insert, select
from sqlalchemy.ext.asyncio import create_async_engine

from ._backend import KEY_TABLE, BackendEnv
from ._data import dataset
from ._orm import table_name
from ._rounds import Contender, run_interleaved
from ._settings import Settings
from ._variants import COLUMNS, Variant

__all__ = ["ASYNC_VARIANTS", "async_url", "run_async"]

ASYNC_DRIVERS = {"sqlite": "sqlite+aiosqlite", "postgresql": "postgresql+asyncpg"}
ASYNC_VARIANTS = ("plaintext", "floor", "floor (again)", "sa-envelope table", "sa-envelope deterministic")


def async_url(url: str) -> str | None:
    """The same database through its async driver, or None if it has none here."""
    scheme, rest = url.split("://", 1)
    driver = ASYNC_DRIVERS.get(scheme.split("+")[0])
    return f"{driver}://{rest}" if driver else None


class AsyncCoreTable:
    def __init__(self, variant: Variant, env: BackendEnv, url: str, rows: list[tuple[str, str, str]],
                 loop: asyncio.AbstractEventLoop) -> None:
        from sa_envelope import KeyManager

        self.variant, self.rows, self.loop = variant, rows, loop
        self.engine = create_async_engine(url)
        self.keys = None
        if variant.uses_keys:
            provider, self.kms = env.kms.provider(env.cmk)
            self.keys = KeyManager(self.engine, provider, table_name=KEY_TABLE)
            loop.run_until_complete(self.keys.create_table_async())
        self.metadata = MetaData()
        types = variant.types(self.keys)
        self.table = Table(table_name(variant, "_async"), self.metadata, Column("id", Integer, primary_key=True),
                           *(Column(name, types[name]) for name in COLUMNS))
        self._params: list[dict[str, Any]] = []

    def _run(self, coro: Any) -> Any:
        return self.loop.run_until_complete(coro)

    def recreate(self) -> None:
        async def go() -> None:
            async with self.engine.begin() as conn:
                await conn.run_sync(self.metadata.drop_all)
                await conn.run_sync(self.metadata.create_all)

        self._run(go())
        self._params = [dict(zip(COLUMNS, row)) for row in self.rows]

    def insert(self) -> None:
        async def go() -> None:
            async with self.engine.begin() as conn:
                await conn.execute(insert(self.table), self._params)

        self._run(go())

    def select(self) -> None:
        async def go() -> list[Any]:
            c = self.table.c
            async with self.engine.connect() as conn:
                return list((await conn.execute(select(c.email, c.ssn, c.notes))).all())

        touch = self.variant.touch
        for email, ssn, notes in self._run(go()):
            touch(email)
            touch(ssn)
            touch(notes)

    def contender(self) -> Contender:
        return Contender(self.variant.name, [("insert", self.insert), ("select", self.select)], self.recreate)

    def dispose(self) -> None:
        async def go() -> None:
            async with self.engine.begin() as conn:
                await conn.run_sync(self.metadata.drop_all)
            await self.engine.dispose()

        self._run(go())


def run_async(env: BackendEnv, variants: list[Variant], settings: Settings) -> dict[str, Any]:
    url = async_url(env.url)
    if url is None:
        return {"unavailable": f"no async driver for {env.name} in the bench extra (aiosqlite, asyncpg only)"}
    chosen = [v for v in variants if v.name in ASYNC_VARIANTS]
    rows = dataset(settings.rows)
    loop = asyncio.new_event_loop()
    tables: list[AsyncCoreTable] = []
    try:
        tables = [AsyncCoreTable(v, env, url, rows, loop) for v in chosen]
        timings = run_interleaved([t.contender() for t in tables], rounds=settings.rounds)
        return {"rows": settings.rows, "driver": url.split("://")[0], "timings": timings.as_dict(),
                "variants": [t.variant.name for t in tables]}
    finally:
        for t in tables:
            t.dispose()
        loop.close()
