"""Rotating the blind-index key of a table with search indexes, lookups exact throughout.

``rotate_table_key(table, scope="blind-index")``: during the grace, rows
are written under the old key and queries match both; after the switch,
new rows and updated rows get tokens under the new key; half-way through
the rebuild (``reencrypt(..., max_batches=)``), the tokens of some old rows
are under the old key and of others under the new one, and every lookup
kind, and the candidate expressions, return exactly the plaintext twin's
rows. The finished rebuild retires the old key; a rerun changes nothing.
A writer updating rows while the rebuild runs keeps its tokens (the
rebuild locks each batch's rows; without the lock this test fails). Both
storages: the token table on every backend, PostgreSQL's arrays (where a
row's array holds one key's tokens, and "every token" is asked per live key).
"""

from __future__ import annotations

import datetime as dt
import os
import random
import threading
import time
from typing import Any

import pytest
from sqlalchemy import delete, func, insert, select, update
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

from sa_envelope import KeyManager, LivePolicy, LocalKeyProvider, UnsupportedQueryError, lookup
from sa_envelope.columns.searchable import indexes_of
from sa_envelope.keys import table as kt
from support.rotation import key_statuses, stored_hash
from support.search import case_sensitive_like, rows, search_models, twin_ids

FAST = LivePolicy(ttl=0.2, grace=1.0)  # the switch within seconds, not the default minute
OWNER = "search_patients"
ATTRIBUTE = {"startswith": "name", "contains": "notes", "between": "born"}


def _needles(data: list[dict[str, Any]], seed: int) -> list[tuple[str, Any]]:
    """Pieces of stored values (hits), some free text (misses), ranges of every width."""
    rng = random.Random(seed)
    names = [r["name"] for r in data if r["name"]]
    notes = [r["notes"] for r in data if r["notes"]]
    out: list[tuple[str, Any]] = []
    for _ in range(40):
        name = rng.choice(names)
        out.append(("startswith", name[: rng.randrange(1, len(name) + 1)]))
        note = rng.choice(notes)
        start = rng.randrange(0, max(1, len(note) - 3))
        piece = note[start : start + rng.randrange(3, 12)]
        out.append(("contains", piece if len(piece) >= 3 else "penicillin"))
        low = dt.date(1850, 1, 1) + dt.timedelta(days=rng.randrange(180 * 365))
        out.append(("between", (low, low + dt.timedelta(days=rng.choice([0, 1, 31, 400, 20 * 365])))))
    return out + [("startswith", "Zq"), ("contains", "xyzzy"), ("between", (dt.date(1, 1, 1), dt.date(1, 2, 1)))]


def _assert_like_twin(engine: Engine, Patient: Any, twin: Any, needles: list[tuple[str, Any]]) -> None:
    """Every lookup kind, and each candidate expression composed with a filter,
    against the twin's SQL."""
    with Session(engine) as session, engine.connect() as plain:
        case_sensitive_like(plain)
        for kind, needle in needles:
            attribute = getattr(Patient, ATTRIBUTE[kind])
            expected = twin_ids(plain, twin, **{kind: needle})
            assert {p.id for p in lookup(session, attribute, **{kind: needle})} == expected, (kind, needle)
        comparator = Patient.notes.matches_substring("penicillin")
        candidates = set(session.scalars(select(Patient.id).where(comparator, Patient.id % 2 == 0)))
        assert {i for i in twin_ids(plain, twin, contains="penicillin") if i % 2 == 0} <= candidates
        prefix = set(session.scalars(select(Patient.id).where(Patient.name.matches_prefix("Ada"))))
        assert twin_ids(plain, twin, startswith="Ada") <= prefix
        born = (dt.date(1900, 1, 1), dt.date(1950, 1, 1))
        ranged = set(session.scalars(select(Patient.id).where(Patient.born.matches_range(*born))))
        assert twin_ids(plain, twin, between=born) <= ranged


def _blind_key(engine: Engine, keys: KeyManager) -> int:
    t = keys.table
    with engine.connect() as conn:
        (found,) = conn.execute(select(t.c.id).where(t.c.owner_table == OWNER, t.c.scope == kt.SCOPE_BLIND_INDEX))
    return int(found[0])


def _write(engine: Engine, Patient: Any, twin: Any, data: list[dict[str, Any]]) -> None:
    with engine.begin() as conn:
        conn.execute(insert(Patient.__table__), data)
        conn.execute(insert(twin), data)


def _change_some(engine: Engine, Patient: Any, twin: Any, ids: range, seed: int) -> None:
    """ORM updates and a Core delete, on the row and its twin."""
    rng = random.Random(seed)
    with Session(engine) as session:
        for i in ids:
            patient = session.get(Patient, i)
            patient.name, patient.notes = f"Ada {rng.randrange(99)}", "penicillin severe"
            session.execute(update(twin).where(twin.c.id == i).values(name=patient.name, notes=patient.notes))
        session.commit()
    with engine.begin() as conn:
        gone = ids.stop
        conn.execute(delete(Patient.__table__).where(Patient.__table__.c.id == gone))
        conn.execute(delete(twin).where(twin.c.id == gone))


def test_lookups_stay_exact_through_a_blind_index_rotation(engine: Engine) -> None:
    _rotate_half_way_and_finish(engine, "table")


@pytest.mark.backends("postgresql")  # array storage is PostgreSQL's
def test_array_lookups_stay_exact_through_a_blind_index_rotation(engine: Engine) -> None:
    _rotate_half_way_and_finish(engine, "array")


def _rotate_half_way_and_finish(engine: Engine, storage: str) -> None:
    keys = KeyManager(engine, LocalKeyProvider(os.urandom(32)), live=FAST)
    keys.create_table()
    Patient, twin = search_models(keys, storage=storage)
    assert {i.storage for i in indexes_of(Patient.__table__)} == {storage}
    Patient.metadata.create_all(engine)
    data = rows(900)
    _write(engine, Patient, twin, data[:600])
    needles = _needles(data, seed=3)
    old = _blind_key(engine, keys)

    new = keys.rotate_table_key(OWNER, scope="blind-index")
    _write(engine, Patient, twin, data[600:700])  # in the grace: still under the old key
    _assert_like_twin(engine, Patient, twin, needles)
    time.sleep(max(0.0, keys.live.switched_at(OWNER, kt.SCOPE_BLIND_INDEX) - time.time()))
    keys.live.invalidate()
    _write(engine, Patient, twin, data[700:])  # under the new key
    _change_some(engine, Patient, twin, range(10, 30), seed=1)  # old rows rewritten: the new key
    _assert_like_twin(engine, Patient, twin, needles)

    table = Patient.__table__
    half = keys.reencrypt([table.c.name], key_id=old, batch_size=100, max_batches=3)
    assert half.stopped and not half.retired and half.reindexed > 0
    reports = keys.verify_index(table)
    assert all(r.ok for r in reports), [str(r) for r in reports]
    fmt_old, fmt_new = f"{old:016x}", f"{new:016x}"
    assert all(r.key_id == fmt_new and r.moving.get(fmt_old, 0) > 100 for r in reports), [str(r) for r in reports]
    _change_some(engine, Patient, twin, range(400, 420), seed=2)  # writes go on, half-way
    _assert_like_twin(engine, Patient, twin, needles)  # old and new tokens side by side: no row missed

    done = keys.reencrypt([table.c.name], key_id=old, batch_size=100)
    assert (done.retired, done.failed, done.stopped) == (True, 0, False), str(done)
    assert key_statuses(engine, OWNER, kt.SCOPE_BLIND_INDEX) == {old: kt.RETIRED, new: kt.ACTIVE}
    assert [k.key_id for k in keys.live.keys(OWNER, kt.SCOPE_BLIND_INDEX)] == [new]
    reports = keys.verify_index(table)
    assert all(r.ok and not r.moving and r.key_id == fmt_new for r in reports), [str(r) for r in reports]
    _assert_like_twin(engine, Patient, twin, needles)

    before = stored_hash(engine)
    rerun = keys.reencrypt([table.c.name], key_id=old)
    assert (rerun.retired, rerun.reindexed) == (True, 0)
    assert [r.moving for r in keys.verify_index(table, fix=True)] == [{}, {}, {}]
    assert stored_hash(engine) == before  # nothing left to move: nothing written
    with engine.connect() as conn:  # the tokens of the deleted rows went with them
        tokens = keys.search_table
        orphans = select(func.count()).where(tokens.c.row_key.in_(["30", "420"]))
        assert conn.execute(orphans).scalar_one() == 0


@pytest.mark.backends("postgresql", "mysql")  # SQLite has one writer: nothing runs beside the rebuild
def test_writes_during_the_rebuild_keep_their_tokens(engine: Engine) -> None:
    """A writer updates rows while the rebuild moves them: the rebuild locks a
    batch's rows, so no write's tokens are overwritten by those of the value
    it replaced; afterwards every token is right and lookups are exact."""
    keys = KeyManager(engine, LocalKeyProvider(os.urandom(32)), live=FAST)
    keys.create_table()
    Patient, twin = search_models(keys)
    Patient.metadata.create_all(engine)
    data = rows(600)
    _write(engine, Patient, twin, data)
    old = _blind_key(engine, keys)
    keys.rotate_table_key(OWNER, scope="blind-index")
    time.sleep(max(0.0, keys.live.switched_at(OWNER, kt.SCOPE_BLIND_INDEX) - time.time()))
    stop, errors = threading.Event(), []

    def writer() -> None:
        rng = random.Random(5)
        try:
            while not stop.is_set():
                i = rng.randrange(1, 601)
                with Session(engine) as session:
                    patient = session.get(Patient, i)
                    patient.name, patient.notes = f"Ada {rng.randrange(999)}", f"penicillin {rng.randrange(99)}"
                    session.execute(update(twin).where(twin.c.id == i).values(name=patient.name, notes=patient.notes))
                    session.commit()
        except Exception as exc:  # reported below, with its type
            errors.append(exc)

    thread = threading.Thread(target=writer)
    thread.start()
    try:
        done = keys.reencrypt([Patient.__table__.c.name], key_id=old, batch_size=25)
    finally:
        stop.set()
        thread.join()
    assert errors == [] and done.retired, (errors, str(done))
    reports = keys.verify_index(Patient.__table__)
    assert all(r.ok and not r.moving for r in reports), [str(r) for r in reports]
    _assert_like_twin(engine, Patient, twin, _needles(data, seed=4)[:30] + [("contains", "penicillin 1")])


@pytest.mark.backends("postgresql")  # array storage is PostgreSQL's
def test_array_lookups_refuse_more_live_keys_than_they_have_slots(engine: Engine) -> None:
    """An array lookup asks "every token" once per live key, in a fixed number
    of slots: with more live keys it refuses when it executes, rather than
    miss the rows under a key it did not ask for. Any-bucket ranges have no slots."""
    keys = KeyManager(engine, LocalKeyProvider(os.urandom(32)), live=LivePolicy(ttl=0.2, grace=600.0))
    keys.create_table()
    Patient, twin = search_models(keys, storage="array")
    Patient.metadata.create_all(engine)
    data = rows(60)
    _write(engine, Patient, twin, data)
    for _ in range(3):
        keys.rotate_table_key(OWNER, scope="blind-index")
    keys.live.invalidate()
    assert len(keys.live.keys(OWNER, kt.SCOPE_BLIND_INDEX)) == 4
    with Session(engine) as session:
        with pytest.raises(UnsupportedQueryError, match="4 live blind-index keys"):
            lookup(session, Patient.notes, contains="penicillin")
        with pytest.raises(UnsupportedQueryError, match="4 live blind-index keys"):
            lookup(session, Patient.name, startswith="Ad")
    _assert_like_twin_ranges(engine, Patient, twin, [n for n in _needles(data, seed=6) if n[0] == "between"])


def _assert_like_twin_ranges(engine: Engine, Patient: Any, twin: Any, needles: list[tuple[str, Any]]) -> None:
    with Session(engine) as session, engine.connect() as plain:
        for kind, needle in needles:
            expected = twin_ids(plain, twin, **{kind: needle})
            assert {p.id for p in lookup(session, Patient.born, **{kind: needle})} == expected, needle
