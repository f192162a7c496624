"""Issue 12: row keys are bound to their row, and shredding a row erases every
key it ever had (ORM delete, values replaced, values copied between rows, Core).

After each scenario, a backup of the row's earlier values, taken before the
shred and put back afterwards, reads ``None`` or raises ``DecryptionError``,
and every other row still reads.
"""

from __future__ import annotations

import subprocess
from typing import Any

import pytest
from sqlalchemy import JSON, Column, Engine, Integer, Table, LargeBinary, MetaData, String, insert, select, type_coerce, update
from sqlalchemy.orm import Mapped, Session, mapped_column

from support.models import new_base
from support.rotation import PYTHON, subprocess_env
from support.models import row_scope_model
from support.row_scope import LOCAL, keys_and_patients, row_key_ids
from sa_envelope import DecryptionError, EncryptedType, KeyManager, LocalKeyProvider
from sa_envelope.envelope import format as fmt
from sa_envelope.keys import table as kt

A = {"id": 1, "name": "Alice", "notes": {"diagnosis": "a"}, "ssn": "111-11"}
B = {"id": 2, "name": "Bob", "notes": {"diagnosis": "b"}, "ssn": "222-22"}
C = {"id": 3, "name": "Carol", "notes": {"diagnosis": "c"}, "ssn": "333-33"}


def three_patients(engine: Engine, provider: Any = LOCAL, **manager: Any) -> tuple[KeyManager, Any]:
    keys = KeyManager(engine, provider, **manager)
    keys.create_table()
    Patient = row_scope_model(keys)
    Patient.metadata.create_all(engine)
    with Session(engine) as s:
        s.add_all([Patient(**A), Patient(**B), Patient(**C)])
        s.commit()
    return keys, Patient


def backup(engine: Engine, Patient: Any, pid: int) -> dict[str, Any]:
    """The stored bytes of one row, as a database backup holds them."""
    t = Patient.__table__
    raw = [type_coerce(t.c[n], LargeBinary()).label(n) for n in ("name", "notes", "ssn")]
    with engine.connect() as conn:
        row = conn.execute(select(t.c.id, *raw).where(t.c.id == pid)).one()
    return dict(row._mapping)


def raw_table(name: str = "patients") -> Table:
    """The table as a database writer sees it: bytes, no encryption."""
    return Table(name, MetaData(), Column("id", Integer, primary_key=True),
                 *(Column(n, LargeBinary) for n in ("name", "notes", "ssn")))


def restore(engine: Engine, Patient: Any, saved: dict[str, Any]) -> None:
    """Put a backed-up row back (replacing the row, or re-inserting it)."""
    t = raw_table()
    with engine.begin() as conn:
        conn.execute(t.delete().where(t.c.id == saved["id"]))
        conn.execute(insert(t).values(**saved))


def read_each(engine: Engine) -> dict[int, Any]:
    """Each row read alone by a new process: its values, or the error it raises."""
    Fresh = row_scope_model(KeyManager(engine, LOCAL))
    out: dict[int, Any] = {}
    with Session(engine) as s:
        ids = s.scalars(select(Fresh.id)).all()
    for pid in ids:
        with Session(engine) as s:
            try:
                p = s.get(Fresh, pid)
                out[pid] = (p.name, p.notes, p.ssn)
            except DecryptionError:
                out[pid] = DecryptionError
    return out


def key_statuses(engine: Engine, keys: KeyManager) -> dict[int, str]:
    t = keys.table
    with engine.connect() as conn:
        return dict(conn.execute(select(t.c.id, t.c.status).where(t.c.scope == "row")).all())


def orm_delete(engine: Engine, Patient: Any, pid: int, *, commit: bool = True) -> None:
    with Session(engine) as s:
        s.delete(s.get(Patient, pid))
        s.commit() if commit else s.rollback()


def erased(result: Any) -> bool:
    return result is DecryptionError or result[1:] == (None, None)


def test_orm_delete_shreds_the_row_keys_in_the_same_transaction(engine: Engine) -> None:
    keys, Patient = three_patients(engine)
    saved = backup(engine, Patient, 1)
    with engine.connect() as conn:
        key_a = row_key_ids(conn, Patient)[1][0]
    orm_delete(engine, Patient, 1, commit=False)  # a rolled-back delete destroys nothing
    assert key_statuses(engine, keys)[key_a] == "active"
    orm_delete(engine, Patient, 1)
    assert key_statuses(engine, keys)[key_a] == "shredded"
    restore(engine, Patient, saved)
    got = read_each(engine)
    assert erased(got[1]) and got[1][0] == "Alice"  # table-scoped values are not row data
    assert got[2] == ("Bob", B["notes"], B["ssn"]) and got[3] == ("Carol", C["notes"], C["ssn"])


def test_shred_on_delete_can_be_turned_off(engine: Engine) -> None:
    keys, Patient = three_patients(engine, shred_on_delete=False)
    saved = backup(engine, Patient, 1)
    orm_delete(engine, Patient, 1)
    assert set(key_statuses(engine, keys).values()) == {"active"}
    restore(engine, Patient, saved)
    assert read_each(engine)[1] == ("Alice", A["notes"], A["ssn"])


def test_values_set_to_none_then_new_keep_the_rows_key_and_shred_erases_every_backup(engine: Engine) -> None:
    keys, Patient = three_patients(engine)
    first = backup(engine, Patient, 1)
    with engine.connect() as conn:
        key_a = row_key_ids(conn, Patient)[1][0]
    with Session(engine) as s:
        a = s.get(Patient, 1)
        a.notes, a.ssn = None, None
        s.commit()
        a.notes, a.ssn = {"diagnosis": "new"}, "999-99"
        s.commit()
        second = backup(engine, Patient, 1)
        with engine.connect() as conn:
            assert row_key_ids(conn, Patient)[1] == (key_a, key_a)  # the key bound to the row, not a new one
        shredded = keys.shred(a)
        s.commit()
    assert fmt.format_key_id(key_a) in shredded
    for saved in (first, second):
        restore(engine, Patient, saved)
        got = read_each(engine)
        assert erased(got[1]) and got[2] == ("Bob", B["notes"], B["ssn"]) and got[3][0] == "Carol"


def test_a_value_copied_into_another_row_neither_reads_nor_chooses_the_write_key(engine: Engine) -> None:
    keys, Patient = three_patients(engine)
    t = Patient.__table__
    saved_b = backup(engine, Patient, 2)
    with engine.connect() as conn:
        key_a, key_b = row_key_ids(conn, Patient)[1][0], row_key_ids(conn, Patient)[2][0]
    raw_a = backup(engine, Patient, 1)
    with engine.begin() as conn:  # a database writer copies row 1's ciphertext into row 2
        raw = raw_table()
        conn.execute(update(raw).where(raw.c.id == 2).values(notes=raw_a["notes"], ssn=raw_a["ssn"]))
    assert read_each(engine)[2] is DecryptionError  # refused: row 1's key is bound to row 1
    with Session(engine) as s:  # the application then updates row 2
        s.execute(update(Patient), [{"id": 2, "ssn": "222-new"}])
        s.commit()
    with engine.connect() as conn:
        assert row_key_ids(conn, Patient)[2] == (key_a, key_b)  # sealed under row 2's own key
    assert keys.shred_row(t, 2) == [fmt.format_key_id(key_b)]
    statuses = key_statuses(engine, keys)
    assert statuses[key_a] == "active" and statuses[key_b] == "shredded"
    restore(engine, Patient, saved_b)
    got = read_each(engine)
    assert erased(got[2])
    assert got[1] == ("Alice", A["notes"], A["ssn"]) and got[3] == ("Carol", C["notes"], C["ssn"])


def test_core_shred_row_finds_keys_no_value_names(engine: Engine) -> None:
    keys, Patient = three_patients(engine)
    saved = backup(engine, Patient, 3)
    with engine.connect() as conn:
        key_c = row_key_ids(conn, Patient)[3][0]
    with engine.begin() as conn:  # raw SQL erases the values: no header names the key any more
        raw = raw_table()
        conn.execute(update(raw).where(raw.c.id == 3).values(notes=None, ssn=None))
    assert keys.shred_row("patients", 3) == [fmt.format_key_id(key_c)]
    assert keys.shred_row("patients", 3) == []  # nothing live is left
    restore(engine, Patient, saved)
    got = read_each(engine)
    assert erased(got[3]) and got[1][1] == A["notes"] and got[2][1] == B["notes"]



def auto_model(keys: KeyManager) -> Any:
    Base = new_base()

    class Visit(Base):
        __tablename__ = "visits"
        id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
        reason: Mapped[str | None] = mapped_column(EncryptedType(String(50), keys, scope="row"))
        extra: Mapped[dict | None] = mapped_column(EncryptedType(JSON, keys, scope="row"))

    return Visit


def test_autoincrement_rows_are_bound_at_flush_and_relabelled_keys_fail(engine: Engine) -> None:
    keys = KeyManager(engine, LOCAL)
    keys.create_table()
    Visit = auto_model(keys)
    Visit.metadata.create_all(engine)
    with Session(engine) as s:
        s.add_all([Visit(reason=f"r{i}", extra={"i": i}) for i in range(3)])
        s.commit()
    t = keys.table
    with engine.connect() as conn:
        rows = conn.execute(select(t.c.id, t.c.row_digest, t.c.wrapped_key).where(t.c.scope == "row")).all()
    assert len(rows) == 3 and all(r.row_digest is not None and bytes(r.wrapped_key)[0] == 2 for r in rows)
    assert len({bytes(r.row_digest) for r in rows}) == 3
    with Session(engine) as s:
        assert sorted(v.reason for v in s.scalars(select(auto_model(KeyManager(engine, LOCAL))))) == ["r0", "r1", "r2"]
    with engine.begin() as conn:  # relabel: swap the digests of two key rows
        conn.execute(update(t).where(t.c.id == rows[0].id).values(row_digest=rows[1].row_digest))
        conn.execute(update(t).where(t.c.id == rows[1].id).values(row_digest=rows[0].row_digest))
    with Session(engine) as s, pytest.raises(DecryptionError):
        s.scalars(select(auto_model(KeyManager(engine, LOCAL)))).all()


def test_core_row_key_with_primary_key_is_bound(engine: Engine) -> None:
    keys, Patient = keys_and_patients(engine)
    t = Patient.__table__
    with engine.begin() as conn:
        key = keys.new_row_key(conn, "patients", primary_key=7)
        conn.execute(insert(t).values(id=7, name="Dan", notes=key.value({"d": 1}), ssn=key.value("777")))
    assert keys.shred_row(t, (7,)) == [fmt.format_key_id(key.key_id)]
    Fresh = row_scope_model(KeyManager(engine, LOCAL))
    with Session(engine) as s:
        d = s.get(Fresh, 7)
        assert (d.name, d.notes, d.ssn) == ("Dan", None, None)


def test_sweep_finds_and_shreds_keys_of_rows_deleted_by_raw_sql(engine: Engine, db_url: str, tmp_path: Any) -> None:
    keyfile = tmp_path / "master.key"
    keys, Patient = three_patients(engine, LocalKeyProvider.from_file(keyfile))
    saved = backup(engine, Patient, 2)
    with engine.connect() as conn:
        key_b = row_key_ids(conn, Patient)[2][0]
    with engine.begin() as conn:
        raw = raw_table()
        conn.execute(raw.delete().where(raw.c.id == 2))
    report = keys.sweep_orphans(dry_run=True)
    assert (report.found, report.shredded) == (1, 0) and key_statuses(engine, keys)[key_b] == "active"

    def sweep(*args: str) -> str:
        done = subprocess.run([PYTHON, "-m", "sa_envelope", "keys", "sweep", "--database-url", db_url,
                               "--cmk", f"local:{keyfile}", *args],
                              env=subprocess_env(None), capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        return done.stdout

    assert "1 orphaned row keys in 1 tables, 1 would shred" in sweep()
    assert "1 orphaned row keys in 1 tables, 1 shredded" in sweep("--apply")
    assert key_statuses(engine, keys)[key_b] == "shredded"
    assert keys.sweep_orphans(dry_run=False).found == 0  # nothing left: a rerun is a no-op
    restore(engine, Patient, saved)
    reader = KeyManager(engine, LocalKeyProvider.from_file(keyfile))
    Fresh = row_scope_model(reader)
    with Session(engine) as s:
        got = {p.id: (p.notes, p.ssn) for p in s.scalars(select(Fresh))}
    assert got == {1: (A["notes"], A["ssn"]), 2: (None, None), 3: (C["notes"], C["ssn"])}
    with Session(engine) as s:  # one more row, then the table renamed away: never taken for gone
        s.add(Patient(id=4, name="Dee", notes={"d": 4}, ssn="444-44"))
        s.commit()
    with engine.begin() as conn:
        conn.exec_driver_sql("ALTER TABLE patients RENAME TO patients_old")
    report = keys.sweep_orphans(dry_run=False)
    assert (report.found, report.shredded, report.missing) == (0, 0, ["patients"])
    with engine.begin() as conn:
        conn.exec_driver_sql("ALTER TABLE patients_old RENAME TO patients")
        raw = raw_table()  # every row gone at once (TRUNCATE, a cascade)
        conn.execute(raw.delete())
    assert keys.sweep_orphans(dry_run=False, batch_size=1).shredded == 3


def test_a_new_row_with_a_deleted_rows_primary_key_replaces_and_shreds_its_key(engine: Engine) -> None:
    keys, Patient = three_patients(engine)
    saved = backup(engine, Patient, 2)
    with engine.connect() as conn:
        old_key = row_key_ids(conn, Patient)[2][0]
    with engine.begin() as conn:  # deleted behind the ORM's back: the key stays live
        raw = raw_table()
        conn.execute(raw.delete().where(raw.c.id == 2))
    with Session(engine) as s:  # the same primary key again: its key replaces the old one
        s.add(Patient(id=2, name="Bea", notes={"diagnosis": "new"}, ssn="200-00"))
        s.commit()
    statuses = key_statuses(engine, keys)
    with engine.connect() as conn:
        new_key = row_key_ids(conn, Patient)[2][0]
    assert statuses[old_key] == "shredded" and statuses[new_key] == "active" and new_key != old_key
    assert read_each(engine)[2] == ("Bea", {"diagnosis": "new"}, "200-00")
    restore(engine, Patient, saved)
    got = read_each(engine)
    assert erased(got[2]) and got[1][1] == A["notes"] and got[3][1] == C["notes"]


def test_the_digest_key_follows_the_table_key_so_a_retired_key_altered_stops_nothing(engine: Engine) -> None:
    """The row-digest key sits under the current table key: after a roll-over,
    a database writer who destroys the retired table key destroys the values
    under it, never the binding (and so the writing) of new rows."""
    keys, Patient = three_patients(engine)
    t = keys.table
    digest_id = kt.singleton_key_id(Patient.__tablename__, "row-digest")
    with engine.connect() as conn:
        old = conn.execute(select(t.c.parent_id).where(t.c.id == digest_id)).scalar_one()
    new = keys.rotate_table_key(Patient.__tablename__)
    with engine.begin() as conn:
        assert conn.execute(select(t.c.parent_id).where(t.c.id == digest_id)).scalar_one() == new
        conn.execute(update(t).where(t.c.id == old).values(wrapped_key=b"\x00" * 64))  # the writer destroys it
    keys = KeyManager(engine, LOCAL)  # a fresh process: nothing cached
    Patient = row_scope_model(keys)
    with Session(engine) as s:
        s.add(Patient(id=4, name="Dan", notes={"diagnosis": "d"}, ssn="444-44"))
        s.commit()
    with Session(engine) as s:
        assert s.get(Patient, 4).notes == {"diagnosis": "d"}  # type: ignore[union-attr]
