"""Crypto-shredding: destroy one row's key, and only that row's row-scoped values go."""

from __future__ import annotations

from typing import Any

import pytest
from sqlalchemy import Engine, delete, select, update
from sqlalchemy.orm import Session

from sa_envelope import ConfigurationError, DecryptionError, KeyManager, KeyNotFoundError
from sa_envelope.envelope import format as fmt
from support.models import row_scope_model
from support.row_scope import LOCAL, keys_and_patients, row_key_ids

A = {"id": 1, "name": "Alice", "notes": {"diagnosis": "a"}, "ssn": "111-11"}
B = {"id": 2, "name": "Bob", "notes": {"diagnosis": "b"}, "ssn": "222-22"}


def two_patients(engine: Engine) -> tuple[KeyManager, Any]:
    keys, Patient = keys_and_patients(engine)
    with Session(engine) as s:
        s.add_all([Patient(**A), Patient(**B)])
        s.commit()
    return keys, Patient


def read_fresh(engine: Engine) -> dict[int, tuple[Any, ...]]:
    """Read every patient as a new process would: new manager, new session."""
    Fresh = row_scope_model(KeyManager(engine, LOCAL))
    with Session(engine) as s:
        return {p.id: (p.name, p.notes, p.ssn) for p in s.scalars(select(Fresh))}


def test_shredded_row_reads_none_for_row_scoped_attributes_only(engine: Engine) -> None:
    keys, Patient = two_patients(engine)
    with engine.connect() as conn:
        key_a = row_key_ids(conn, Patient)[1][0]
    with Session(engine) as s:
        a = s.get(Patient, 1)
        assert keys.shred(a) == [fmt.format_key_id(key_a)]
        assert a.notes is None  # the plaintext held by the session is gone too
        s.commit()
    assert read_fresh(engine) == {1: ("Alice", None, None), 2: ("Bob", B["notes"], B["ssn"])}
    t = keys.table
    with engine.connect() as conn:  # the key row stays as a tombstone
        tomb = conn.execute(select(t.c.status, t.c.wrapped_key).where(t.c.id == key_a)).one()
    assert tuple(tomb) == ("shredded", None)


def test_row_key_deleted_by_hand_raises_key_not_found(engine: Engine) -> None:
    keys, Patient = two_patients(engine)
    with engine.begin() as conn:
        key_a = row_key_ids(conn, Patient)[1][0]
        conn.execute(delete(keys.table).where(keys.table.c.id == key_a))
    Fresh = row_scope_model(KeyManager(engine, LOCAL))
    with Session(engine) as s:
        with pytest.raises(KeyNotFoundError) as err:
            s.get(Fresh, 1)
        assert fmt.format_key_id(key_a) in str(err.value)
    with Session(engine) as s:
        assert s.get(Fresh, 2).notes == B["notes"]


def test_rolled_back_shred_destroys_nothing(engine: Engine) -> None:
    keys, Patient = two_patients(engine)
    with Session(engine) as s:
        keys.shred(s.get(Patient, 1))
        assert s.get(Patient, 1).notes is None  # read inside the shredding transaction
        s.rollback()
        assert s.get(Patient, 1).notes == A["notes"]  # same manager: the tombstone went too
    assert read_fresh(engine)[1] == ("Alice", A["notes"], A["ssn"])


def test_other_manager_detects_a_shred_when_it_reloads_the_key(engine: Engine) -> None:
    keys, Patient = two_patients(engine)
    other = KeyManager(engine, LOCAL)
    Other = row_scope_model(other)
    with Session(engine) as s:
        assert s.get(Other, 1).notes == A["notes"]  # cached in the other manager
    with Session(engine) as s:
        keys.shred(s.get(Patient, 1))
        s.commit()
    other.clear_cache()  # what CacheLimits.max_age does on its own
    with Session(engine) as s:
        assert s.get(Other, 1).notes is None
        queries = other.rows.key_queries
    with Session(engine) as s:
        assert s.get(Other, 1).ssn is None
    assert other.rows.key_queries == queries  # the tombstone is cached


def test_shred_key_outside_the_orm(engine: Engine) -> None:
    keys, Patient = two_patients(engine)
    with engine.connect() as conn:
        key_b = row_key_ids(conn, Patient)[2][0]
        table_key = conn.execute(select(keys.table.c.id).where(keys.table.c.scope == "table")).scalar_one()
    keys.shred_key(fmt.format_key_id(key_b))  # a transaction of its own
    assert read_fresh(engine) == {1: ("Alice", A["notes"], A["ssn"]), 2: ("Bob", None, None)}
    with engine.begin() as conn:
        with pytest.raises(ConfigurationError):
            keys.shred_key(table_key, conn)
    with pytest.raises(KeyNotFoundError):
        keys.shred_key(12345)
    assert read_fresh(engine)[1] == ("Alice", A["notes"], A["ssn"])


def test_shredded_row_takes_new_values_under_a_new_key(engine: Engine) -> None:
    keys, Patient = two_patients(engine)
    with Session(engine) as s:
        a = s.get(Patient, 1)
        old = keys.shred(a)
        s.commit()
        a.notes = {"after": "erasure"}
        s.commit()
    with engine.connect() as conn:
        new_key, ssn_key = row_key_ids(conn, Patient)[1]
    assert fmt.format_key_id(new_key) not in old and fmt.format_key_id(ssn_key) in old
    assert read_fresh(engine)[1] == ("Alice", {"after": "erasure"}, None)


def test_a_value_copied_from_a_shredded_row_is_shredded_with_it(engine: Engine) -> None:
    """Row keys are bound to their row (issue 12): a copied value is refused
    while its source key lives, and dies with that key."""
    keys, Patient = two_patients(engine)
    t = Patient.__table__
    with engine.begin() as conn:  # copy the stored bytes of A's notes into B
        raw = conn.execute(select(t.c.notes.label("n")).where(t.c.id == 1).execution_options()).one()
        conn.execute(update(t).where(t.c.id == 2).values(notes=None))
        conn.exec_driver_sql(
            "UPDATE patients SET notes = (SELECT notes FROM (SELECT notes FROM patients WHERE id = 1) AS src) WHERE id = 2"
        )
    assert raw.n == A["notes"]
    with pytest.raises(DecryptionError, match="bound to another row"):
        read_fresh(engine)
    with Session(engine) as s:
        keys.shred(s.get(Patient, 1))
        s.commit()
    assert read_fresh(engine)[2] == ("Bob", None, B["ssn"])
