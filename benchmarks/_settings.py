"""Sizes and backends: what a run measures and where.

``quick`` is the default (minutes, for development and CI smoke); ``full``
is the size behind the README numbers. Every number can be overridden on
the command line, which is how the smoke test runs at a trivial size.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from typing import Any

__all__ = ["BACKEND_ENV", "SIZES", "Settings", "backend_url"]

BACKEND_ENV = {
    "postgresql": ("SA_ENVELOPE_TEST_POSTGRESQL_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"),
    "mysql": ("SA_ENVELOPE_TEST_MYSQL_URL", "mysql+pymysql://root@127.0.0.1:3306/test"),
}
BACKEND_ALIASES = {"mariadb": "mysql", "postgres": "postgresql", "pg": "postgresql"}


@dataclass(frozen=True)
class Settings:
    """Everything a run needs to know; see ``python -m benchmarks --help``."""

    size: str
    rows: int  # ORM insert/select rows per round
    rounds: int  # timed rounds (after one warm-up round)
    lookup_rows: int  # rows in the indexed-lookup tables
    lookups: int  # equality lookups per timed step
    rewrap_sizes: tuple[int, ...]  # row keys under the table keys
    table_keys: int  # table keys the row keys sit under (rewrap)
    job_rows: int  # rows for re-encryption / encrypt-column throughput
    micro_values: int  # values per timed step of the per-value section
    kms_latency_ms: float
    stream_rows: int = 50_000  # rows read by the streaming section (1,000,000 with --full)
    backends: tuple[str, ...] = ("sqlite",)
    sections: tuple[str, ...] = ()
    output_dir: str = ""
    profile: str | None = None

    def with_(self, **changes: Any) -> Settings:
        return replace(self, **{k: v for k, v in changes.items() if v is not None})


SIZES = {
    "quick": Settings(
        size="quick", rows=2_000, rounds=5, lookup_rows=10_000, lookups=300,
        rewrap_sizes=(100, 1_000, 10_000), table_keys=10, job_rows=2_000,
        micro_values=5_000, kms_latency_ms=5.0,
    ),
    "full": Settings(
        size="full", rows=20_000, rounds=7, lookup_rows=100_000, lookups=2_000,
        rewrap_sizes=(1_000, 100_000, 1_000_000), table_keys=10, job_rows=20_000,
        micro_values=50_000, kms_latency_ms=5.0, stream_rows=1_000_000,
    ),
}


def backend_url(name: str, sqlite_dir: str) -> str:
    """The URL for a backend: SQLite in a temp file, servers from the environment."""
    name = BACKEND_ALIASES.get(name, name)
    if name == "sqlite":
        return f"sqlite:///{sqlite_dir}/bench.db"
    if name not in BACKEND_ENV:
        raise ValueError(f"unknown backend {name!r}; use sqlite, postgresql, mysql")
    env, default = BACKEND_ENV[name]
    return os.environ.get(env) or default
