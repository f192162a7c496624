"""Issue 16: the guard sweep removes the uniqueness guard rows left after a
rotation ended (``keys.sweep_guards()``, ``sa-envelope sweep-guards``) and
never those of a table whose rotation is in progress.

Leftovers are made as docs/rotation.md says they come about: a writer whose
view of the keys is older than the retirement (a second KeyManager with a
long ``LivePolicy.ttl``) checks its write and makes guards again after the
re-encryption job removed them. A rotation starting while the sweep decides
is paused inside its transaction (after its new key row, before the old one
is demoted): the sweep waits for it and keeps the guards.
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import MetaData, Table, func, insert, select
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError

from sa_envelope import DuplicateValueError, KeyManager, LocalKeyProvider
from sa_envelope.columns.guardrows import guard_table
from sa_envelope.faults import inject
from sa_envelope.jobs.guardsweep import GuardSweepReport
from sa_envelope.keys import table as kt
from integration.test_guard_removal import FAST, GUARDS, _table
from support.rotation import PYTHON, key_statuses, subprocess_env



def _filled(engine: Engine, keys: KeyManager, names: tuple[str, ...]) -> dict[str, Table]:
    """``names`` with rows 1-5 under their first deterministic key."""
    keys.create_table()
    tables = {n: _table(keys, n) for n in names}
    for table in tables.values():
        table.create(engine)
        with engine.begin() as conn:
            conn.execute(table.insert(), [{"id": i, "email": f"u{i}@x"} for i in range(1, 6)])
    return tables


def _rotate(engine: Engine, keys: KeyManager, names: tuple[str, ...]) -> dict[str, int]:
    """Rotate the deterministic key of ``names`` and wait for the switch; the old key ids."""
    old = {}
    for name in names:
        (old[name],) = key_statuses(engine, name, kt.SCOPE_DETERMINISTIC)
        keys.rotate_table_key(name, scope=kt.SCOPE_DETERMINISTIC)
    for name in names:
        time.sleep(max(0.0, keys.live.switched_at(name, kt.SCOPE_DETERMINISTIC) - time.time()))
    keys.live.invalidate()
    return old


def _guards(engine: Engine) -> dict[str, int]:
    with engine.connect() as conn:
        stmt = select(GUARDS.c.owner_table, func.count()).group_by(GUARDS.c.owner_table)
        return {owner: int(n) for owner, n in conn.execute(stmt)}


def _outlives_ttl(keys: KeyManager) -> None:
    """The live sets ``keys`` read are kept past their ttl: a process whose
    next look at the key table comes late (a test cannot rely on being
    faster than ``LivePolicy.ttl``)."""
    live = keys.live
    live._sets = {k: dataclasses.replace(s, expires=s.expires + 600) for k, s in live._sets.items()}


def _plant(engine: Engine, owner: str, count: int) -> None:
    """Guard rows as a writer makes them (a hex digest, the owner), made directly."""
    with engine.begin() as conn:
        conn.execute(insert(GUARDS), [{"guard": f"{owner}-{i}".ljust(64, "0"), "owner_table": owner} for i in range(count)])


@pytest.mark.backends("postgresql", "mysql")
def test_leftover_guards_are_swept_and_a_rotation_keeps_its_own(engine: Engine, tmp_path: Path) -> None:
    provider = LocalKeyProvider.from_file(tmp_path / "k.key")
    keys = KeyManager(engine, provider, live=FAST)
    tables = _filled(engine, keys, ("members", "visitors"))
    old = _rotate(engine, keys, ("members", "visitors"))
    stale_keys = KeyManager(engine, provider, live=FAST)  # a process whose view of the keys is late
    stale = _table(stale_keys, "members")
    with engine.begin() as conn:  # its view: two live keys
        conn.execute(stale.insert(), [{"id": 6, "email": "u6@x"}])
    _outlives_ttl(stale_keys)
    for table in tables.values():
        with engine.begin() as conn:
            conn.execute(table.insert(), [{"id": i, "email": f"u{i}@x"} for i in range(7, 9)])
    assert keys.reencrypt([tables["members"].c.email], key_id=old["members"]).retired
    assert "members" not in _guards(engine)  # the retirement removed them
    with engine.begin() as conn:  # the late writer still checks: it makes guards again
        conn.execute(stale.insert(), [{"id": 9, "email": "u9@x"}])
    before = _guards(engine)
    assert before["members"] == 2 and before["visitors"] > 0  # u9@x under two keys; the rotation's own

    dry = keys.sweep_guards(dry_run=True)
    assert dry == GuardSweepReport(removed={"members": 2}, kept={"visitors": before["visitors"]}, dry_run=True)
    assert _guards(engine) == before  # nothing removed

    report = keys.sweep_guards()
    assert report.removed == {"members": 2} and report.kept == {"visitors": before["visitors"]}
    assert report.total == 2 and "removed 2 guard rows of 1 tables" in str(report)
    assert _guards(engine) == {"visitors": before["visitors"]}
    assert keys.sweep_guards().removed == {}  # a rerun: nothing left to remove

    # the rotation in progress is still guarded and checked: u1@x is stored under the old key
    with pytest.raises(DuplicateValueError):
        with engine.begin() as conn:
            conn.execute(tables["visitors"].insert(), [{"id": 20, "email": "u1@x"}])
    with pytest.raises(IntegrityError):  # members: one live key, the database's UNIQUE is exact
        with engine.begin() as conn:
            conn.execute(tables["members"].insert(), [{"id": 20, "email": "u9@x"}])
    refused = 2 if engine.dialect.name != "postgresql" else 0  # MariaDB: made on their own connection, they stay
    assert _guards(engine) == {"visitors": before["visitors"] + refused}


def test_sweep_one_table_and_every_backend(engine: Engine, tmp_path: Path) -> None:
    """Guards planted beside a settled table and a rotating one (SQLite locks
    none: it serialises writers; the sweep removes them there all the same)."""
    keys = KeyManager(engine, LocalKeyProvider.from_file(tmp_path / "k.key"), live=FAST)
    _filled(engine, keys, ("members", "visitors", "guests"))
    keys.rotate_table_key("visitors", scope=kt.SCOPE_DETERMINISTIC)
    for owner, count in (("members", 3), ("visitors", 2), ("guests", 1), ("gone", 1)):
        _plant(engine, owner, count)
    assert keys.sweep_guards("members").removed == {"members": 3}
    assert _guards(engine) == {"visitors": 2, "guests": 1, "gone": 1}
    report = keys.sweep_guards()  # a table with no live key at all: nothing to guard either
    assert report.removed == {"guests": 1, "gone": 1} and report.kept == {"visitors": 2}
    assert keys.sweep_guards("visitors") == GuardSweepReport(kept={"visitors": 2})
    assert _guards(engine) == {"visitors": 2}


@pytest.mark.backends("postgresql", "mysql")
def test_a_rotation_starting_meanwhile_keeps_its_guards(engine: Engine, tmp_path: Path) -> None:
    """The rotation holds the active key's row and has inserted its new key;
    the sweep waits on that row, then sees two live keys and removes nothing.
    (A sweep counting the keys without the lock sees one and removes them.)"""
    keys = KeyManager(engine, LocalKeyProvider.from_file(tmp_path / "k.key"), live=FAST)
    _filled(engine, keys, ("members",))
    _plant(engine, "members", 2)
    paused, go = threading.Event(), threading.Event()
    main = threading.current_thread()
    results: dict[str, Any] = {}

    def pause(point: str) -> None:
        if point == "rollover.before_retire" and threading.current_thread() is not main:
            paused.set()
            assert go.wait(30)

    def rotate() -> None:
        results["key"] = keys.rotate_table_key("members", scope=kt.SCOPE_DETERMINISTIC)

    def sweep() -> None:
        results["report"] = keys.sweep_guards()

    with inject(pause):
        rotation = threading.Thread(target=rotate)
        rotation.start()
        assert paused.wait(30)
        sweeper = threading.Thread(target=sweep)
        sweeper.start()
        sweeper.join(1.0)
        waited = sweeper.is_alive()  # on the active key's row lock
        go.set()
        rotation.join(30)
        sweeper.join(30)
    assert waited and "key" in results
    assert results["report"] == GuardSweepReport(kept={"members": 2})
    assert _guards(engine) == {"members": 2}


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([PYTHON, "-m", "sa_envelope", "sweep-guards", *args], env=subprocess_env(None),
                          capture_output=True, text=True, timeout=180)  # fmt: skip


def test_cli_sweep_guards(engine: Engine, db_url: str, tmp_path: Path) -> None:
    keys = KeyManager(engine, LocalKeyProvider.from_file(tmp_path / "k.key"), live=FAST)
    _filled(engine, keys, ("members", "visitors"))
    keys.rotate_table_key("visitors", scope=kt.SCOPE_DETERMINISTIC)
    _plant(engine, "members", 3)
    _plant(engine, "visitors", 2)
    _plant(engine, "odd\x1b[31m", 1)  # a name from the database reaches the terminal escaped

    dry = _cli("--database-url", db_url, "--dry-run", "--json")  # no --cmk: no key is unwrapped
    assert dry.returncode == 0, dry.stderr
    (line,) = dry.stdout.strip().splitlines()
    assert json.loads(line) == {
        "command": "sweep-guards", "removed": {"members": 3, "odd\x1b[31m": 1}, "kept": {"visitors": 2},
        "total": 4, "dry_run": True,
    }  # fmt: skip
    assert "\x1b" not in line
    assert _guards(engine) == {"members": 3, "visitors": 2, "odd\x1b[31m": 1}

    one = _cli("--database-url", db_url, "--table", "members")
    assert one.returncode == 0, one.stderr
    assert one.stdout.splitlines() == ["guard sweep: removed 3 guard rows of 1 tables", "  members: 3"]
    rest = _cli("--database-url", db_url)
    assert rest.returncode == 0, rest.stderr
    assert rest.stdout.splitlines() == [
        "guard sweep: removed 1 guard rows of 1 tables; kept, rotation in progress: visitors (2)",
        "  odd\\x1b[31m: 1",
    ]
    again = _cli("--database-url", db_url, "--json")
    assert json.loads(again.stdout)["total"] == 0
    assert _guards(engine) == {"visitors": 2}

    bad = _cli()
    assert bad.returncode != 0 and len(bad.stderr.strip().splitlines()) == 1 and "Traceback" not in bad.stderr


def test_a_custom_key_table_sweeps_its_own_guard_table(engine: Engine, tmp_path: Path) -> None:
    """``table_name="app_keys"``: its guards are in ``app_guards``; the default
    guard table (another KeyManager's) is left alone."""
    keys = KeyManager(engine, LocalKeyProvider.from_file(tmp_path / "k.key"), table_name="app_keys")
    keys.create_table()
    GUARDS.create(engine)
    own = guard_table(MetaData(), "app_keys")
    assert own.name == "app_guards"
    with engine.begin() as conn:
        conn.execute(insert(own), [{"guard": "a".ljust(64, "0"), "owner_table": "members"}])
    _plant(engine, "members", 2)  # beside sa_envelope_keys
    assert keys.sweep_guards() == GuardSweepReport(removed={"members": 1})
    with engine.connect() as conn:
        assert conn.execute(select(func.count()).select_from(own)).scalar_one() == 0
    assert _guards(engine) == {"members": 2}
