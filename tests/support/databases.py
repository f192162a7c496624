"""A second database on the backend of ``db_url``, for tests of several engines.

SQLite: another file beside the first. PostgreSQL and MariaDB: a database
named after the run's own (``sae_test_<hex>``) plus a suffix unique to the
call, created on the same server and dropped when the context ends; it
never touches a database it did not create.
"""

from __future__ import annotations

import contextlib
import uuid
from pathlib import Path
from typing import Iterator

from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

__all__ = ["second_database"]


@contextlib.contextmanager
def second_database(db_url: str, tmp_path: Path) -> Iterator[str]:
    """The URL of a fresh, empty database beside ``db_url``'s."""
    url = make_url(db_url)
    if url.get_backend_name() == "sqlite":
        yield f"sqlite:///{tmp_path}/second-{uuid.uuid4().hex[:8]}.db"
        return
    name = f"{url.database}_b{uuid.uuid4().hex[:6]}"
    admin = create_engine(url, isolation_level="AUTOCOMMIT")
    quote = admin.dialect.identifier_preparer.quote
    try:
        with admin.connect() as conn:
            conn.execute(text(f"CREATE DATABASE {quote(name)}"))
        try:
            yield url.set(database=name).render_as_string(hide_password=False)
        finally:
            with admin.connect() as conn:
                force = " WITH (FORCE)" if conn.dialect.name == "postgresql" else ""
                conn.execute(text(f"DROP DATABASE IF EXISTS {quote(name)}{force}"))
    finally:
        admin.dispose()
