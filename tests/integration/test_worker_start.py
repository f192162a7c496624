"""How ``--workers N`` starts its processes (jobs/processes.py): forked from a
parent with one thread, spawned from one with more, and either way the
parent's own database connection survives its children.

A forked child holds copies of the parent's pooled connections. It must
never close them: if it ran the interpreter's teardown, or disposed of an
engine it inherited, the driver would end the session on the server for
the parent too. The parent is a fresh process (tests/support/worker_start.py,
one thread, as the CLI is: this test process may have other threads);
its pooled connection is checked by the server's own session id, before
and after children that return, that fail and that collect garbage.
"""

from __future__ import annotations

import json
import re
import subprocess
from typing import Any

import pytest

from support.rotation import PYTHON, ROOT, subprocess_env

SCRIPT = ROOT / "tests" / "support" / "worker_start.py"
FAILED = r"worker [12] of 2 \(pid \d+\) failed: RuntimeError: worker [01] gives up"


def _run(db_url: str, mode: str) -> dict[str, Any]:
    done = subprocess.run([PYTHON, str(SCRIPT), db_url, mode], env=subprocess_env(), cwd=ROOT,
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    out: dict[str, Any] = json.loads(done.stdout)
    return out


@pytest.mark.backends("postgresql", "mysql")
def test_workers_are_forked_and_leave_the_parents_connection_alone(db_url: str) -> None:
    out = _run(db_url, "alone")
    assert out["method"] == "fork"
    assert [r["index"] for r in out["results"]] == [0, 1]
    assert {r["method"] for r in out["results"]} == {"fork"}
    assert all(r["loaded"] for r in out["results"])  # nothing imported again
    assert len({r["pid"] for r in out["results"]} | {out["pid"]}) == 3
    assert re.fullmatch(FAILED, out["failure"]), out["failure"]
    assert out["session_after"] == out["session_before"]  # the same server session, still open


@pytest.mark.backends("postgresql")
def test_a_parent_with_another_thread_spawns_its_workers(db_url: str) -> None:
    """Forking copies locks other threads may hold: with a second thread
    alive the children are fresh interpreters, and the job runs the same."""
    out = _run(db_url, "threaded")
    assert out["method"] == "spawn"
    assert [r["index"] for r in out["results"]] == [0, 1]
    assert {r["method"] for r in out["results"]} == {"spawn"}
    assert re.fullmatch(FAILED, out["failure"]), out["failure"]
    assert out["session_after"] == out["session_before"]
