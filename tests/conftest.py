"""Shared fixtures: database backends and a real (moto) KMS over HTTP.

Backends (DESIGN.md, "Test backends"): every test that takes ``db_url`` runs
once per backend, ``sqlite`` always, ``postgresql`` and ``mysql`` (MariaDB)
from ``SA_ENVELOPE_TEST_POSTGRESQL_URL`` / ``SA_ENVELOPE_TEST_MYSQL_URL``, else
the default local port when a server answers there, else a testcontainers
container when a Docker engine answers, else skipped with the reason; always
in a database the run creates and drops (tests/support/backends.py). The run ends
with a line saying which backends ran. ``SA_ENVELOPE_REQUIRE_BACKENDS=postgresql,mysql`` (set by .ci/run)
turns that skip into a failure, so CI can never go green on SQLite alone.

KMS is moto's ThreadedMotoServer on 127.0.0.1: boto3 speaks real HTTP to it
and nothing of ours is mocked.
"""

from __future__ import annotations

import contextlib
import os
import socket
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from support import backends  # where server backends come from (tests/support/backends.py)
import boto3
import pytest
from sqlalchemy import MetaData, create_engine, inspect, text
from sqlalchemy.engine import Engine

SERVER_BACKENDS = backends.SERVER_BACKENDS
BACKENDS: tuple[str, ...] = ("sqlite", *SERVER_BACKENDS)
REQUIRE_ENV = "SA_ENVELOPE_REQUIRE_BACKENDS"


def _required_backends() -> set[str]:
    names = {n.strip() for n in os.environ.get(REQUIRE_ENV, "").split(",") if n.strip()}
    unknown = names - set(SERVER_BACKENDS)
    if unknown:  # a typo must not silently disable the requirement
        raise pytest.UsageError(
            f"{REQUIRE_ENV}: unknown backend(s) {sorted(unknown)}; use {sorted(SERVER_BACKENDS)}"
        )
    return names


def pytest_configure(config: pytest.Config) -> None:
    _required_backends()  # validate early, before any test runs
    from support import reliability_summary  # the figures printed after reliability tests (issue 7)

    if not config.pluginmanager.has_plugin("sa_envelope_reliability"):
        config.pluginmanager.register(reliability_summary, "sa_envelope_reliability")


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Run each ``db_url`` test on every backend, or on those its marker names."""
    if "db_url" not in metafunc.fixturenames:
        return
    names = list(BACKENDS)
    marker = metafunc.definition.get_closest_marker("backends")
    if marker is not None:
        unknown = set(marker.args) - set(BACKENDS)
        if not marker.args or unknown:
            raise pytest.UsageError(
                f"{metafunc.definition.nodeid}: @backends{marker.args} must name some of {BACKENDS}"
            )
        names = [n for n in BACKENDS if n in marker.args]
    metafunc.parametrize("db_url", names, ids=names, indirect=True)


# --------------------------------------------------------------------------- databases


class ServerBackends:
    """The session's server backends (tests/support/backends.py: URL variable, default
    local port, testcontainers; a database of the run's own on each)."""

    def __init__(self, stack: contextlib.ExitStack) -> None:
        self.backends = {name: backends.ServerBackend(name, stack) for name in SERVER_BACKENDS}
        self._required = _required_backends()

    def url(self, name: str) -> str:
        """The backend's URL; skips the test, or fails it if the backend is required.

        pytest.fail, not pytest.exit: an Exit raised in fixture set-up breaks
        pytest's session teardown (pytest 9), hiding the message in a traceback.
        """
        resolved = self.backends[name].resolve()
        if resolved.url is None:
            if name in self._required:
                pytest.fail(f"{REQUIRE_ENV} requires {name}: {resolved.reason}", pytrace=False)
            pytest.skip(resolved.reason)
        return resolved.url


_SESSION: list[ServerBackends] = []  # for the summary line, printed after the fixtures are gone


@pytest.fixture(scope="session")
def server_backends() -> Iterator[ServerBackends]:
    with contextlib.ExitStack() as stack:
        found = ServerBackends(stack)
        _SESSION.append(found)
        yield found


def pytest_terminal_summary(terminalreporter: Any) -> None:
    """End with the backends that ran and how to enable the others."""
    terminalreporter.write_line(backends.summary_line(_SESSION[-1].backends if _SESSION else {}))


def _drop_all(engine: Engine) -> None:
    """Leave the database empty: reflected tables (foreign keys ordered, cycles
    broken by SQLAlchemy) and, on PostgreSQL, enum types that DROP TABLE keeps."""
    with engine.begin() as conn:
        if conn.dialect.name == "postgresql":  # a leaked lock must fail, not hang CI
            conn.execute(text("SET LOCAL lock_timeout = '10s'"))
        elif conn.dialect.name in ("mysql", "mariadb"):
            conn.execute(text("SET SESSION lock_wait_timeout = 10"))
            conn.execute(text("SET FOREIGN_KEY_CHECKS = 0"))
        meta = MetaData()
        meta.reflect(conn)
        if conn.dialect.name == "sqlite":  # no ALTER to break FK cycles, but a plain
            for table in meta.tables.values():  # connection enforces no FKs: any order
                table.drop(conn)
        else:
            meta.drop_all(conn)
        if conn.dialect.name == "postgresql":
            quote = conn.dialect.identifier_preparer.quote
            for enum in inspect(conn).get_enums():  # type: ignore[attr-defined]
                conn.execute(text(f"DROP TYPE IF EXISTS {quote(enum['name'])} CASCADE"))
        elif conn.dialect.name in ("mysql", "mariadb"):
            conn.execute(text("SET FOREIGN_KEY_CHECKS = 1"))


@pytest.fixture
def db_url(request: pytest.FixtureRequest, tmp_path: Path, server_backends: ServerBackends) -> str:
    """The URL of the backend named by the parametrisation (see pytest_generate_tests).

    SQLite is a file in tmp_path, never ``:memory:``: the key manager opens
    its own connections, which must see the same database. The server
    database is the run's own (tests/support/backends.py), emptied before each test.
    """
    name: str = request.param
    if name == "sqlite":
        return f"sqlite:///{tmp_path}/test.db"
    url = server_backends.url(name)
    cleaner = create_engine(url)
    try:
        _drop_all(cleaner)
    finally:
        cleaner.dispose()
    return url


@pytest.fixture
def engine(db_url: str) -> Iterator[Engine]:
    """An engine on ``db_url``; drops every table afterwards so tests stay independent."""
    eng = create_engine(db_url)
    try:
        yield eng
    finally:
        try:
            _drop_all(eng)
        finally:
            eng.dispose()


# --------------------------------------------------------------------------- KMS


@pytest.fixture(scope="session", autouse=True)
def _aws_env() -> Iterator[None]:
    """Fake credentials and no user AWS config, so boto3 can only talk to moto."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("AWS_ACCESS_KEY_ID", "testing")
        mp.setenv("AWS_SECRET_ACCESS_KEY", "testing")
        mp.setenv("AWS_DEFAULT_REGION", "us-east-1")
        mp.setenv("AWS_CONFIG_FILE", os.devnull)
        mp.setenv("AWS_SHARED_CREDENTIALS_FILE", os.devnull)
        for var in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_KMS"):
            mp.delenv(var, raising=False)
        yield


@pytest.fixture(scope="session")
def kms_server() -> Iterator[str]:
    """moto's KMS over real HTTP; port 0 lets the OS pick a free port without a race."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield f"http://{host}:{port}"
    finally:
        server.stop()


@pytest.fixture(scope="session")
def kms_admin(kms_server: str) -> Any:
    """An uncounted client for test set-up (creating, disabling, deleting keys)."""
    return boto3.client("kms", endpoint_url=kms_server, region_name="us-east-1")


@pytest.fixture
def kms_client(kms_server: str) -> Any:
    """A KMS client whose ``calls`` Counter counts API operations by name
    (``client.calls["Decrypt"]``), to assert how often the code under test
    reaches KMS. ``before-call`` fires once per operation, not per retry."""
    client = boto3.client("kms", endpoint_url=kms_server, region_name="us-east-1")
    calls: Counter[str] = Counter()

    def count(model: Any, **_: Any) -> None:
        calls[model.name] += 1

    client.meta.events.register("before-call.kms", count)
    client.calls = calls
    return client


@pytest.fixture
def cmk(kms_admin: Any) -> str:
    """ARN of a fresh symmetric CMK (made with kms_admin, so not in kms_client.calls)."""
    meta = kms_admin.create_key(KeySpec="SYMMETRIC_DEFAULT", KeyUsage="ENCRYPT_DECRYPT")
    return str(meta["KeyMetadata"]["Arn"])


@pytest.fixture
def cmk_alias(kms_admin: Any) -> str:
    """Name (``alias/test-<uuid>``) of an alias pointing to a fresh symmetric CMK."""
    key_id = kms_admin.create_key(KeySpec="SYMMETRIC_DEFAULT")["KeyMetadata"]["KeyId"]
    alias = f"alias/test-{uuid.uuid4().hex}"
    kms_admin.create_alias(AliasName=alias, TargetKeyId=key_id)
    return alias


@pytest.fixture
def closed_port_url() -> str:
    """``http://127.0.0.1:PORT`` where nothing listens: an unreachable KMS."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}"


# --------------------------------------------------------------------------- keys


@pytest.fixture
def local_keys(engine: Engine) -> Any:
    """A KeyManager on ``engine`` with a random LocalKeyProvider, key table created."""
    from sa_envelope import KeyManager, LocalKeyProvider

    manager = KeyManager(engine, LocalKeyProvider(os.urandom(32)))
    manager.create_table()
    return manager
