"""One database backend under test, with the KMS the sa-envelope variants use.

Every table the benchmark makes starts with ``bench_`` (the key table too:
``bench_sa_envelope_keys``), so a run can clean up after itself, before and
after, without touching anything else in the database.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sqlalchemy import MetaData, create_engine, text
from sqlalchemy.engine import Engine

from ._kms import KmsClient, MotoKms

__all__ = ["BackendEnv", "PREFIX", "forget_row_keys"]

PREFIX = "bench_"
KEY_TABLE = PREFIX + "sa_envelope_keys"


@dataclass
class BackendEnv:
    name: str
    url: str
    kms: MotoKms
    cmk: str

    def engine(self) -> Engine:
        return create_engine(self.url)

    def key_manager(self, engine: Engine, cmk: str | None = None) -> tuple[Any, KmsClient]:
        """A fresh KeyManager (a "process": empty cache) and its counted KMS client."""
        from sa_envelope import KeyManager

        provider, counted = self.kms.provider(cmk or self.cmk)
        keys = KeyManager(engine, provider, table_name=KEY_TABLE)
        keys.create_table()
        return keys, counted

    def server_version(self) -> str:
        engine = self.engine()
        try:
            with engine.connect() as conn:
                if conn.dialect.name == "sqlite":
                    return "SQLite " + str(conn.execute(text("select sqlite_version()")).scalar())
                version = str(conn.execute(text("select version()")).scalar())
                return version.split(" on ")[0]  # PostgreSQL appends the build platform
        finally:
            engine.dispose()

    def reset(self) -> None:
        """Drop every ``bench_`` table (left by an earlier, maybe killed, run)."""
        engine = self.engine()
        try:
            with engine.begin() as conn:
                metadata = MetaData()
                metadata.reflect(conn, only=lambda name, _: name.startswith(PREFIX))
                metadata.drop_all(conn)
        finally:
            engine.dispose()


def forget_row_keys(keys: Any, table: Any) -> None:
    """Untimed, with a table's drop and re-creation between rounds: delete
    the row keys its last round made, as a new table has none. Otherwise the
    re-created table's primary keys (1..N again) would meet the keys bound to
    the dropped rows, and every insert would also retire (shred) N old keys,
    which an application's never-reused primary keys do not."""
    if keys is None or not any(getattr(c.type, "scope", None) == "row" for c in table.columns):
        return
    kt = keys.table
    with keys.engine.begin() as conn:
        conn.execute(kt.delete().where(kt.c.owner_table == table.name, kt.c.scope == "row"))
    keys.rows.cache.clear()
