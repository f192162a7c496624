"""``make test`` on a machine with only the default local servers (issue 13):
no URL variable set, it finds PostgreSQL and MariaDB on their default ports,
runs there in databases of its own, and its last line says so.

A small selection (PYTEST_ARGS) keeps it short; the backend discovery and
the summary line are the same for the whole suite.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text

from support.backends import DEFAULTS, SERVER_BACKENDS

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.slow


def _answers(host: str, port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(2)
        return sock.connect_ex((host, port)) == 0


def _databases() -> set[str]:
    """Every database name on both default servers."""
    names: set[str] = set()
    for url, query in ((DEFAULTS["postgresql"], "SELECT datname FROM pg_database"), (DEFAULTS["mysql"], "SHOW DATABASES")):
        engine = create_engine(url)
        try:
            with engine.connect() as conn:
                names |= {f"{url.split(':', 1)[0]}:{n}" for n in conn.execute(text(query)).scalars()}
        finally:
            engine.dispose()
    return names


def test_make_test_runs_every_default_local_backend() -> None:
    if not (_answers("127.0.0.1", 5432) and _answers("127.0.0.1", 3306)):
        pytest.skip("needs PostgreSQL on 127.0.0.1:5432 and MariaDB on 127.0.0.1:3306 (as .ci/run has)")
    env = {k: v for k, v in os.environ.items() if k not in SERVER_BACKENDS.values()}
    env["SA_ENVELOPE_REQUIRE_BACKENDS"] = "postgresql,mysql"
    before = _databases()
    result = subprocess.run(
        ["make", "test", "PYTEST_ARGS=-p no:cacheprovider tests/integration/test_compat.py -k insert_if_absent"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=900,
    )
    out = result.stdout + result.stderr
    assert result.returncode == 0, out[-3000:]
    assert "3 passed" in out, out[-3000:]
    summary = [line for line in out.splitlines() if line.startswith("sa-envelope backends run:")]
    assert len(summary) == 1, out[-3000:]
    found = re.fullmatch(
        r"sa-envelope backends run: sqlite, postgresql \(default 127\.0\.0\.1:5432, database (sae_test_[0-9a-f]{8})\), "
        r"mysql \(default 127\.0\.0\.1:3306, database (sae_test_[0-9a-f]{8})\)",
        summary[0],
    )
    assert found, summary[0]
    after = _databases()
    # the run's own databases were new, and are gone (other clients' databases may come and go meanwhile)
    assert {f"postgresql+psycopg:{found[1]}", f"mysql+pymysql:{found[2]}"}.isdisjoint(after | before)


def test_summary_names_a_missing_backend_and_how_to_enable_it(closed_port_url: str) -> None:
    """A backend that does not answer is skipped, and the last line says which
    variable to set (no Docker engine on this machine, nothing listens there)."""
    port = closed_port_url.rsplit(":", 1)[1]
    env = {k: v for k, v in os.environ.items() if k not in SERVER_BACKENDS.values() and k != "SA_ENVELOPE_REQUIRE_BACKENDS"}
    env["SA_ENVELOPE_TEST_POSTGRESQL_URL"] = f"postgresql+psycopg://postgres@127.0.0.1:{port}/nothing"
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/integration/test_infra.py", "-k", "answers_select_1"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )
    out = result.stdout + result.stderr
    assert result.returncode == 0, out[-3000:]
    summary = [line for line in out.splitlines() if line.startswith("sa-envelope backends run:")]
    assert len(summary) == 1 and summary[0].startswith("sa-envelope backends run: sqlite"), out[-3000:]
    assert "NOT RUN: postgresql: SA_ENVELOPE_TEST_POSTGRESQL_URL is set but the server does not answer" in summary[0]
    assert "set SA_ENVELOPE_TEST_POSTGRESQL_URL, start a server on 127.0.0.1:5432 or a Docker engine" in summary[0]
