"""Where the server backends come from, and the databases the suite makes on them.

For each server backend (``postgresql``, ``mysql`` = MariaDB), in order:

1. the URL in ``SA_ENVELOPE_TEST_POSTGRESQL_URL`` / ``SA_ENVELOPE_TEST_MYSQL_URL``;
2. else the server at its default local port, when it answers
   (``postgres@127.0.0.1:5432``, ``root@127.0.0.1:3306``, no password);
3. else a testcontainers container, when a Docker engine answers;
4. else none: the backend's tests are skipped (or fail, if required).

On the server found, the suite creates a database of its own, named after
the URL's database (``sae_test`` for a default server) plus a suffix unique
to the run (``sae_i13_1a2b3c4d``),
and drops it at session end: it never touches a database it did not create,
so it cannot lock against (or empty the tables of) another client.
:func:`summary_line` says at the end which backends ran and how to enable
the others.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from dataclasses import dataclass, field

from sqlalchemy import create_engine, text
from sqlalchemy.engine import URL, make_url

__all__ = [
    "ASYNC_DRIVERS",
    "DEFAULTS",
    "SERVER_BACKENDS",
    "Resolved",
    "ServerBackend",
    "async_url",
    "summary_line",
]

SERVER_BACKENDS: dict[str, str] = {
    "postgresql": "SA_ENVELOPE_TEST_POSTGRESQL_URL",
    "mysql": "SA_ENVELOPE_TEST_MYSQL_URL",
}
DEFAULTS: dict[str, str] = {
    "postgresql": "postgresql+psycopg://postgres@127.0.0.1:5432/postgres",
    "mysql": "mysql+pymysql://root@127.0.0.1:3306/",
}
# the async driver of each backend (the test dependency group installs them)
ASYNC_DRIVERS: dict[str, str] = {
    "sqlite": "sqlite+aiosqlite",
    "postgresql": "postgresql+asyncpg",
    "mysql": "mysql+asyncmy",
}
RUN_SUFFIX = uuid.uuid4().hex[:8]


def async_url(url: str | URL) -> str:
    """The same database through its backend's async driver
    (``postgresql+psycopg://...`` -> ``postgresql+asyncpg://...``), password kept."""
    parsed = make_url(url)
    driver = ASYNC_DRIVERS[parsed.get_backend_name()]
    return parsed.set(drivername=driver).render_as_string(hide_password=False)


@dataclass
class Resolved:
    """A backend's outcome: the URL of the run's own database, or why there is none."""

    url: str | None = None
    source: str = ""
    reason: str = ""
    used: bool = False


def _first_line(exc: BaseException) -> str:
    return (f"{type(exc).__name__}: {exc}".splitlines() or [""])[0][:200]


def _ping(url: str | URL, timeout: int) -> None:
    """Raise unless the server at ``url`` answers ``SELECT 1`` within ``timeout`` s."""
    engine = create_engine(url, connect_args={"connect_timeout": timeout})
    try:
        with engine.connect() as conn:
            conn.execute(text("SELECT 1"))
    finally:
        engine.dispose()


def _docker_error() -> str | None:
    """None when a Docker engine answers, else why not (testcontainers needs one)."""
    try:
        import docker

        docker.from_env(timeout=5).ping()
    except Exception as exc:  # no package, no socket, daemon down: all mean "no Docker"
        return _first_line(exc)
    return None


def _start_container(name: str, stack: contextlib.ExitStack) -> str:
    """Start a throwaway server for ``name``; ``stack`` stops it at session end."""
    if name == "postgresql":
        try:
            from testcontainers.community.postgres import PostgresContainer
        except ImportError:  # testcontainers < 4.14
            from testcontainers.postgres import PostgresContainer
        pg = stack.enter_context(PostgresContainer("postgres:16", driver="psycopg"))
        return str(pg.get_connection_url())
    try:
        from testcontainers.community.mysql import MySqlContainer
    except ImportError:
        from testcontainers.mysql import MySqlContainer
    maria = stack.enter_context(MySqlContainer("mariadb:11", dialect="pymysql"))
    return str(maria.get_connection_url())


def _create_database(server: URL, stack: contextlib.ExitStack) -> str:
    """Create the run's own database on ``server``; ``stack`` drops it at session end."""
    base = server.database if server.database not in (None, "", "postgres") else "sae_test"
    name = f"{base}_{RUN_SUFFIX}"
    admin = create_engine(server, isolation_level="AUTOCOMMIT")
    quote = admin.dialect.identifier_preparer.quote
    with admin.connect() as conn:
        conn.execute(text(f"CREATE DATABASE {quote(name)}"))

    def drop() -> None:
        try:
            with admin.connect() as conn:
                force = " WITH (FORCE)" if conn.dialect.name == "postgresql" and _pg_version(conn) >= 13 else ""
                conn.execute(text(f"DROP DATABASE IF EXISTS {quote(name)}{force}"))
        finally:
            admin.dispose()

    stack.callback(drop)
    return server.set(database=name).render_as_string(hide_password=False)


def _pg_version(conn: object) -> int:
    return int(getattr(conn, "dialect").server_version_info[0])


@dataclass
class ServerBackend:
    """Resolves one server backend once per session, lazily (no container and
    no database for a backend that no selected test uses)."""

    name: str
    stack: contextlib.ExitStack
    resolved: Resolved | None = field(default=None)

    def resolve(self) -> Resolved:
        if self.resolved is None:
            self.resolved = self._resolve()
        return self.resolved

    def _server(self) -> tuple[str | None, str, str]:
        """(server URL, where it came from, why none)."""
        env = SERVER_BACKENDS[self.name]
        url = os.environ.get(env)
        if url:
            try:
                _ping(url, 10)
            except Exception as exc:
                return None, env, f"{env} is set but the server does not answer: {_first_line(exc)}"
            return url, env, ""
        default = make_url(DEFAULTS[self.name])
        try:
            _ping(default, 3)
            return DEFAULTS[self.name], f"default {default.host}:{default.port}", ""
        except Exception as exc:
            local = f"nothing answers as {default.username}@{default.host}:{default.port} ({_first_line(exc)})"
        docker_error = _docker_error()
        if docker_error is not None:
            return None, "", f"{env} is not set, {local}, and no Docker engine answers ({docker_error})"
        try:
            return _start_container(self.name, self.stack), "testcontainers", ""
        except Exception as exc:
            return None, "", f"{env} is not set, {local}, and the {self.name} container did not start: {exc!r}"

    def _resolve(self) -> Resolved:
        server, source, reason = self._server()
        if server is None:
            return Resolved(reason=reason)
        try:
            return Resolved(url=_create_database(make_url(server), self.stack), source=source)
        except Exception as exc:
            return Resolved(reason=f"{source}: cannot create the run's database: {_first_line(exc)}")


def summary_line(backends: dict[str, ServerBackend]) -> str:
    """One line: which backends ran, and how to enable those that did not."""
    ran, missing, unused = ["sqlite"], [], []
    for name in SERVER_BACKENDS:
        got = backends[name].resolved if name in backends else None
        if got is None:
            unused.append(name)
        elif got.url is not None:
            ran.append(f"{name} ({got.source}, database {make_url(got.url).database})")
        else:
            why = got.reason
            missing.append(
                f"{name}: {why}; set {SERVER_BACKENDS[name]}, start a server on "
                f"{make_url(DEFAULTS[name]).host}:{make_url(DEFAULTS[name]).port} or a Docker engine"
            )
    line = "sa-envelope backends run: " + ", ".join(ran)
    if unused:
        line += "; not needed by the selected tests: " + ", ".join(unused)
    return line + ("; NOT RUN: " + " | ".join(missing) if missing else "")
