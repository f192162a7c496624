"""Row scope: one data key per row, wrapped by the table key, written with the row."""

from __future__ import annotations

from typing import Any

import pytest
from sqlalchemy import Engine, LargeBinary, insert, select, type_coerce, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from sa_envelope import AwsKmsProvider, DecryptionError, KeyManager, KeyNotFoundError
from sa_envelope import faults
from sa_envelope.columns.rowvalue import RowValue
from sa_envelope.envelope import format as fmt
from support.models import row_scope_model
from support.row_scope import key_table_rows, keys_and_patients, row_key_ids, sql_count


def patients(n: int, start: int = 0) -> list[dict[str, Any]]:
    return [{"id": i, "name": f"name {i}", "notes": {"i": i}, "ssn": f"{i:03d}-00"} for i in range(start, start + n)]


def stored(engine: Engine, n: int) -> tuple[KeyManager, Any]:
    """Set up, then store patients 0..n-1 through the ORM."""
    keys, Patient = keys_and_patients(engine)
    with Session(engine) as s:
        s.add_all([Patient(**p) for p in patients(n)])
        s.commit()
    return keys, Patient


def test_thousand_rows_get_thousand_row_keys_with_two_kms_calls(engine: Engine, kms_client: Any, cmk: str) -> None:
    keys, Patient = keys_and_patients(engine, AwsKmsProvider(cmk, client=kms_client))
    with Session(engine) as s:
        s.add_all([Patient(**p) for p in patients(1000)])
        s.commit()
    assert sum(kms_client.calls.values()) <= 2
    with engine.connect() as conn:
        ids = row_key_ids(conn, Patient)
        t = keys.table
        table_key = conn.execute(select(t.c.id).where(t.c.scope == "table")).scalar_one()
        rows = conn.execute(select(t.c.id, t.c.parent_id, t.c.wrapping_key_id).where(t.c.scope == "row")).all()
    assert all(notes == ssn for notes, ssn in ids.values())  # one key per row, shared by its columns
    assert len({notes for notes, _ in ids.values()}) == 1000
    assert {r.id for r in rows} == {notes for notes, _ in ids.values()}
    assert {(r.parent_id, r.wrapping_key_id) for r in rows} == {(table_key, "parent")}

    reader = KeyManager(engine, AwsKmsProvider(cmk, client=kms_client))  # a new process
    Fresh = row_scope_model(reader)
    before = sum(kms_client.calls.values())
    with Session(engine) as s:
        got = {p.id: (p.name, p.notes, p.ssn) for p in s.scalars(select(Fresh))}
    assert got == {p["id"]: (p["name"], p["notes"], p["ssn"]) for p in patients(1000)}
    assert sum(kms_client.calls.values()) - before <= 1  # the table key's Decrypt
    assert reader.rows.key_queries == 1  # one batched lookup, not one query per row


def test_flush_then_rollback_leaves_key_table_as_it_was(engine: Engine) -> None:
    keys, Patient = stored(engine, 1)
    with engine.connect() as conn:
        before = key_table_rows(conn, keys)
    with Session(engine) as s:
        new = [Patient(**p) for p in patients(150, start=10)]  # >= 100: COPY on psycopg
        s.add_all(new)
        s.flush()
        assert sql_count(s.connection(), "SELECT count(*) FROM sa_envelope_keys WHERE scope = 'row'") == 151
        s.rollback()
    with engine.connect() as conn:
        assert key_table_rows(conn, keys) == before
    assert new[0].notes == {"i": 10}  # the instance holds its plain value again


def test_failed_flush_restores_plain_values(engine: Engine) -> None:
    keys, Patient = stored(engine, 1)
    with Session(engine) as s:
        dup = Patient(id=0, name="dup", notes={"dup": True}, ssn="999-99")
        s.add(dup)
        with pytest.raises(IntegrityError):
            s.commit()
        assert (dup.notes, dup.ssn) == ({"dup": True}, "999-99")
        assert not isinstance(dup.__dict__["notes"], RowValue)
    with engine.connect() as conn:
        assert sql_count(conn, "SELECT count(*) FROM sa_envelope_keys WHERE scope = 'row'") == 1


def test_updates_keep_the_row_key(engine: Engine) -> None:
    keys, Patient = keys_and_patients(engine)
    with Session(engine) as s:
        s.add_all([Patient(**p) for p in patients(3)])
        s.add(Patient(id=3, name="no row values"))  # no row-scoped value: no key yet
        s.commit()
    with engine.connect() as conn:
        before = row_key_ids(conn, Patient)
    assert before[3] == (None, None)
    with Session(engine) as s:
        p0, p3 = s.get(Patient, 0), s.get(Patient, 3)
        p0.notes = {"changed": 1}
        s.commit()  # expires p0: the next update finds the key from the stored row
        p0.ssn = "111-11"
        p3.notes = {"first": 1}
        s.commit()
    with engine.connect() as conn:
        after = row_key_ids(conn, Patient)
        assert sql_count(conn, "SELECT count(*) FROM sa_envelope_keys WHERE scope = 'row'") == 4
    assert after[0] == before[0] and after[1] == before[1]
    assert after[3][0] is not None and after[3][0] not in {k for k, _ in before.values()}
    with Session(engine) as s:
        assert (s.get(Patient, 0).notes, s.get(Patient, 0).ssn) == ({"changed": 1}, "111-11")
        assert s.get(Patient, 3).notes == {"first": 1}


def test_merge_keeps_existing_keys_and_gives_new_rows_their_own(engine: Engine) -> None:
    keys, Patient = stored(engine, 1)
    with engine.connect() as conn:
        old_key = row_key_ids(conn, Patient)[0][0]
    with Session(engine) as s:
        s.merge(Patient(id=0, name="name 0", notes={"merged": 0}, ssn="000-00"))
        s.merge(Patient(id=1, name="name 1", notes={"merged": 1}, ssn=None))
        s.commit()
    with engine.connect() as conn:
        ids = row_key_ids(conn, Patient)
    assert ids[0] == (old_key, old_key)
    assert ids[1][0] not in (None, old_key) and ids[1][1] is None
    with Session(engine) as s:
        assert [p.notes for p in s.scalars(select(Patient).order_by(Patient.id))] == [{"merged": 0}, {"merged": 1}]


def test_orm_bulk_insert_and_bulk_update_by_primary_key(engine: Engine) -> None:
    keys, Patient = keys_and_patients(engine)
    with Session(engine) as s:
        s.execute(insert(Patient), patients(50))
        s.commit()
    with engine.connect() as conn:
        before = row_key_ids(conn, Patient)
    assert len({k for k, _ in before.values()}) == 50
    assert all(a == b for a, b in before.values())
    with Session(engine) as s:
        s.execute(update(Patient), [{"id": i, "notes": {"bulk": i}} for i in range(0, 50, 2)])
        s.commit()
    with engine.connect() as conn:
        assert row_key_ids(conn, Patient) == before
    with Session(engine) as s:
        got = {p.id: p.notes for p in s.scalars(select(Patient))}
    assert got == {i: ({"bulk": i} if i % 2 == 0 else {"i": i}) for i in range(50)}


def test_core_insert_gets_row_keys_and_explicit_keys_still_work(engine: Engine) -> None:
    keys, Patient = keys_and_patients(engine)
    table = Patient.__table__
    with engine.connect() as conn:  # plain values: the Core hook makes the keys in this transaction
        conn.execute(insert(table), [{**p, "id": p["id"] + 100} for p in patients(2)])
        conn.rollback()
        assert sql_count(conn, "SELECT count(*) FROM patients") == 0
        assert sql_count(conn, "SELECT count(*) FROM sa_envelope_keys WHERE scope = 'row'") == 0
    with engine.begin() as conn:  # the explicit Core API: keys inserted in the same transaction
        row_keys = keys.new_row_keys(conn, "patients", 3)
        conn.execute(insert(table), [
            {**p, "notes": k.value(p["notes"]), "ssn": k.value(p["ssn"])}
            for k, p in zip(row_keys, patients(3))
        ])
    with Session(engine) as s:
        assert [(p.notes, p.ssn) for p in s.scalars(select(Patient).order_by(Patient.id))] == [
            (p["notes"], p["ssn"]) for p in patients(3)
        ]
    with engine.connect() as conn:
        assert {k for k, _ in row_key_ids(conn, Patient).values()} == {k.key_id for k in row_keys}


def test_table_and_row_scoped_columns_mix_in_one_model(engine: Engine) -> None:
    keys, Patient = stored(engine, 2)
    t = keys.table
    with engine.connect() as conn:
        table_key = conn.execute(select(t.c.id).where(t.c.scope == "table")).scalar_one()
        names = conn.execute(select(type_coerce(Patient.__table__.c.name, LargeBinary()))).scalars()
        assert {fmt.read_header(bytes(v))[1] for v in names} == {table_key}
        ids = row_key_ids(conn, Patient)
    assert table_key not in {k for k, _ in ids.values()}
    reader = KeyManager(engine, keys.provider)
    with Session(engine) as s:
        got = [(p.name, p.notes, p.ssn) for p in s.scalars(select(row_scope_model(reader)).order_by("id"))]
    assert got == [(p["name"], p["notes"], p["ssn"]) for p in patients(2)]


def test_swapped_wrapped_row_keys_do_not_unwrap(engine: Engine) -> None:
    keys, Patient = stored(engine, 2)
    t = keys.table
    with engine.begin() as conn:
        ids = row_key_ids(conn, Patient)
        k0, k1 = ids[0][0], ids[1][0]
        w0, w1 = (conn.execute(select(t.c.wrapped_key).where(t.c.id == k)).scalar_one() for k in (k0, k1))
        conn.execute(update(t).where(t.c.id == k0).values(wrapped_key=w1))
        conn.execute(update(t).where(t.c.id == k1).values(wrapped_key=w0))
    with Session(engine) as s:
        with pytest.raises(DecryptionError) as err:
            s.scalars(select(row_scope_model(KeyManager(engine, keys.provider)))).all()
        assert not isinstance(err.value, KeyNotFoundError)


@pytest.mark.parametrize("point", ["rowkey.create.before_insert", "rowkey.create.after_insert"])
def test_failure_around_the_key_insert_leaves_nothing_behind(engine: Engine, point: str) -> None:
    keys, Patient = stored(engine, 1)
    with engine.connect() as conn:
        before = key_table_rows(conn, keys)

    def fail(name: str) -> None:
        if name == point:
            raise RuntimeError(f"injected at {name}")

    with Session(engine) as s:
        p = Patient(**patients(1, start=5)[0])
        s.add(p)
        with faults.inject(fail), pytest.raises(RuntimeError):
            s.commit()
        s.rollback()
        assert p.notes == {"i": 5}
    with engine.connect() as conn:
        assert key_table_rows(conn, keys) == before
        assert sql_count(conn, "SELECT count(*) FROM patients") == 1


def test_streamed_reads_load_keys_without_cutting_the_stream(engine: Engine) -> None:
    """yield_per uses a server-side cursor (unbuffered on MySQL): key misses
    must not run a second query on the streaming connection."""
    keys, Patient = stored(engine, 30)
    Fresh = row_scope_model(KeyManager(engine, keys.provider))
    with Session(engine) as s:
        stmt = select(Fresh.id, Fresh.notes, Fresh.ssn).order_by(Fresh.id).execution_options(yield_per=10)
        got = [tuple(r) for r in s.execute(stmt)]
    assert got == [(p["id"], p["notes"], p["ssn"]) for p in patients(30)]
