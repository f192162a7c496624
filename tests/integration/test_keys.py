"""The key table and the durability rule: no value under a key not stored.

Every test ends by checking the invariant directly: each stored value's
header names a key id that is in sa_envelope_keys.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from typing import Any

from sqlalchemy import String, func, inspect, select, text
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Mapped, Session, mapped_column

from sa_envelope import EncryptedType, KeyManager, LocalKeyProvider
from sa_envelope.envelope import format as fmt
from support.models import new_base


def build(engine: Engine, key: bytes | None = None) -> tuple[KeyManager, type, type]:
    keys = KeyManager(engine, LocalKeyProvider(key or bytes(range(32))))

    Base = new_base()

    class A(Base):
        __tablename__ = "kt_a"
        id: Mapped[int] = mapped_column(primary_key=True)
        v: Mapped[str] = mapped_column(EncryptedType(String(50), keys))

    class B(Base):
        __tablename__ = "kt_b"
        id: Mapped[int] = mapped_column(primary_key=True)
        v: Mapped[str] = mapped_column(EncryptedType(String(50), keys))

    keys.create_table()
    Base.metadata.create_all(engine)
    return keys, A, B


def key_ids(engine: Engine, keys: KeyManager) -> set[int]:
    with engine.connect() as conn:
        return set(conn.execute(select(keys.table.c.id)).scalars())


def assert_every_value_has_a_stored_key(engine: Engine, keys: KeyManager, *tables: str) -> int:
    stored = key_ids(engine, keys)
    count = 0
    with engine.connect() as conn:
        for table in tables:
            for (value,) in conn.execute(text(f"SELECT v FROM {table}")):
                assert fmt.read_header(bytes(value))[1] in stored
                count += 1
    return count


def test_create_table_is_idempotent(engine: Engine) -> None:
    keys, _, _ = build(engine)
    keys.create_table()
    keys.create_table()
    assert keys.table.name in inspect(engine).get_table_names()
    assert {c["name"] for c in inspect(engine).get_columns("sa_envelope_keys")} >= {
        "id", "scope", "owner_table", "parent_id", "wrapping_key_id", "wrapped_key",
        "algorithm", "status", "created_at", "updated_at",
    }


def test_first_key_transaction_rolls_back_then_all_works(engine: Engine) -> None:
    keys, A, _ = build(engine)
    with Session(engine) as s:
        s.add(A(v="lost"))
        s.flush()
        s.rollback()
    assert key_ids(engine, keys) == set()
    with Session(engine) as s:
        s.add(A(v="kept"))
        s.commit()
    with Session(engine) as s:
        assert [a.v for a in s.scalars(select(A))] == ["kept"]
    assert len(key_ids(engine, keys)) == 1
    assert assert_every_value_has_a_stored_key(engine, keys, "kt_a") == 1


def test_cache_never_serves_a_rolled_back_key(engine: Engine) -> None:
    keys, A, _ = build(engine)
    with Session(engine) as s:
        s.add(A(v="x"))
        s.flush()
        created = keys.stats()["keys_created"]
        s.rollback()
    assert created == 1 and keys.stats()["cached_keys"] == 0
    # another session (another connection) must not reuse the rolled-back key
    with Session(engine) as s:
        s.add(A(v="y"))
        s.commit()
    assert keys.stats()["keys_created"] == 2
    assert assert_every_value_has_a_stored_key(engine, keys, "kt_a") == 1


def test_one_transaction_writes_first_rows_of_two_new_tables(engine: Engine) -> None:
    keys, A, B = build(engine)
    with Session(engine) as s:
        s.add(A(v="a"))
        s.flush()  # the first table's INSERT holds SQLite's write lock now
        s.add(B(v="b"))
        s.commit()
    with Session(engine) as s:
        assert s.scalars(select(B.v)).one() == "b" and s.scalars(select(A.v)).one() == "a"
    assert len(key_ids(engine, keys)) == 2
    assert assert_every_value_has_a_stored_key(engine, keys, "kt_a", "kt_b") == 2


def test_savepoint_rollback_does_not_leave_a_dangling_key(engine: Engine) -> None:
    keys, A, _ = build(engine)
    with Session(engine) as s:
        with s.begin_nested() as sp:
            s.add(A(v="in savepoint"))
            s.flush()
            sp.rollback()
        s.add(A(v="after savepoint"))
        s.commit()
    with Session(engine) as s:
        assert [a.v for a in s.scalars(select(A))] == ["after savepoint"]
    assert assert_every_value_has_a_stored_key(engine, keys, "kt_a") == 1


def test_key_is_reused_across_managers_once_committed(engine: Engine) -> None:
    keys, A, _ = build(engine)
    with Session(engine) as s:
        s.add(A(v="one"))
        s.commit()
    other, A2, _ = build(engine)
    with Session(engine) as s:
        s.add(A2(v="two"))
        s.commit()
    assert len(key_ids(engine, keys)) == 1 and other.stats()["keys_created"] == 0
    with Session(engine) as s:
        assert sorted(s.scalars(select(A.v))) == ["one", "two"]


def test_autocommit_connection(engine: Engine) -> None:
    keys, A, _ = build(engine)
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.execute(A.__table__.insert(), [{"v": "auto"}])
    with Session(engine) as s:
        assert s.scalars(select(A.v)).one() == "auto"
    assert assert_every_value_has_a_stored_key(engine, keys, "kt_a") == 1


RACER = textwrap.dedent(
    """
    import sys, time
    from sqlalchemy import create_engine, String
    from sqlalchemy.orm import Mapped, Session, mapped_column
    from sa_envelope import EncryptedType, KeyManager, LocalKeyProvider
    from support.models import new_base
    engine = create_engine(sys.argv[1])
    keys = KeyManager(engine, LocalKeyProvider(bytes(range(32))))
    Base = new_base()
    class A(Base):
        __tablename__ = "kt_a"
        id: Mapped[int] = mapped_column(primary_key=True)
        v: Mapped[str] = mapped_column(EncryptedType(String(50), keys))
    start = float(sys.argv[3])
    while time.time() < start:
        time.sleep(0.001)
    with Session(engine) as s:
        s.add_all(A(v=f"{sys.argv[2]}-{i}") for i in range(20))
        s.commit()
    """
)


def test_processes_racing_for_the_first_row_all_succeed(engine: Engine, db_url: str, tmp_path: Any) -> None:
    import time

    keys, A, _ = build(engine)
    script = tmp_path / "racer.py"
    script.write_text(RACER)
    start = time.time() + 2.0
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    procs = [
        subprocess.Popen([sys.executable, str(script), db_url, str(n), str(start)], env=env)
        for n in range(4)
    ]
    assert [p.wait(timeout=60) for p in procs] == [0, 0, 0, 0]
    with Session(engine) as s:
        values = sorted(s.scalars(select(A.v)))
    assert values == sorted(f"{n}-{i}" for n in range(4) for i in range(20))
    table_keys = len(key_ids(engine, keys))
    assert 1 <= table_keys <= 4  # at most one per concurrent first writer
    assert assert_every_value_has_a_stored_key(engine, keys, "kt_a") == 80


def test_process_dying_before_commit_leaves_nothing(engine: Engine, db_url: str, tmp_path: Any) -> None:
    keys, A, _ = build(engine)
    script = tmp_path / "die.py"
    script.write_text(RACER.replace("    s.commit()", "    s.flush()\n    import os; os._exit(9)"))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    assert subprocess.run([sys.executable, str(script), db_url, "x", "0"], env=env, timeout=60).returncode == 9
    assert key_ids(engine, keys) == set()
    with engine.connect() as conn:
        assert conn.execute(select(func.count()).select_from(A.__table__)).scalar() == 0
