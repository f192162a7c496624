"""Behaviour that depended on the installed versions or the environment (issue 13).

- A first key inserted ``if_absent`` where the id is taken reports "not
  inserted" on every backend and every supported SQLAlchemy: on 2.0.27 with
  psycopg the rowcount was -1, taken for "inserted", and the loser of two
  concurrent first writers sealed values with key material never stored.
- ``AWS_REGION`` is honoured (botocore reads only ``AWS_DEFAULT_REGION``);
  no region at all is a one-line ConfigurationError naming the variable.
"""

from __future__ import annotations

import os
import threading
from typing import Any

import pytest
from sqlalchemy import String, create_engine, select
from sqlalchemy.engine import Engine
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

from sa_envelope import AwsKmsProvider, ConfigurationError, EncryptedType, KeyManager, LocalKeyProvider
from sa_envelope.keys import table as kt


def _record(key_id: int, wrapped: bytes) -> kt.KeyRecord:
    return kt.KeyRecord(
        id=key_id, scope=kt.SCOPE_DETERMINISTIC, owner_table="compat", parent_id=None,
        wrapping_key_id="local:test", wrapped_key=wrapped, algorithm=kt.SCOPE_ALGORITHM[kt.SCOPE_DETERMINISTIC],
        status=kt.ACTIVE,
    )


def test_insert_if_absent_reports_a_taken_id(local_keys: Any, engine: Engine) -> None:
    key_id = kt.singleton_key_id("compat", kt.SCOPE_DETERMINISTIC)
    with engine.begin() as conn:
        assert kt.insert_record(conn, local_keys.table, _record(key_id, b"first"), if_absent=True) is True
    with engine.begin() as conn:
        assert kt.insert_record(conn, local_keys.table, _record(key_id, b"second"), if_absent=True) is False
        stored = conn.execute(select(local_keys.table.c.wrapped_key).where(local_keys.table.c.id == key_id)).scalar()
    assert bytes(stored) == b"first"


@pytest.mark.backends("postgresql", "mysql")
def test_concurrent_first_writers_leave_readable_rows(db_url: str, engine: Engine) -> None:
    """Writers racing for a table's first deterministic key: every row opens
    in a fresh KeyManager (which has only the key table to go by)."""
    master = os.urandom(32)

    def model(keys: KeyManager) -> Any:
        class Base(DeclarativeBase):
            pass

        class Row(Base):
            __tablename__ = "compat_race"
            id: Mapped[int] = mapped_column(primary_key=True)
            ssn: Mapped[str] = mapped_column(EncryptedType(String(20), keys, deterministic=True))
        return Row

    setup_keys = KeyManager(engine, LocalKeyProvider(master))
    setup_keys.create_table()
    model(setup_keys).__table__.create(engine)
    for attempt in range(3):
        writers = [create_engine(db_url) for _ in range(2)]
        barrier = threading.Barrier(2)
        errors: list[BaseException] = []

        def write(eng: Engine, row_id: int) -> None:
            keys = KeyManager(eng, LocalKeyProvider(master))
            Row = model(keys)
            try:
                barrier.wait(10)
                with Session(eng) as s:
                    s.add(Row(id=row_id, ssn=f"ssn-{row_id}"))
                    s.commit()
            except BaseException as exc:  # reported below, in the test's thread
                errors.append(exc)

        threads = [threading.Thread(target=write, args=(w, attempt * 2 + i + 1)) for i, w in enumerate(writers)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        for w in writers:
            w.dispose()
        assert not errors, errors
        reader = create_engine(db_url)
        try:
            Row = model(KeyManager(reader, LocalKeyProvider(master)))
            with Session(reader) as s:
                got = {r.id: r.ssn for r in s.scalars(select(Row))}
        finally:
            reader.dispose()
        assert got == {i: f"ssn-{i}" for i in (attempt * 2 + 1, attempt * 2 + 2)}  # not 0: MySQL auto-increments it
        with engine.begin() as conn:  # the next attempt races for the first key again
            conn.execute(setup_keys.table.delete())
            conn.execute(Row.__table__.delete())


def test_aws_region_is_honoured(monkeypatch: pytest.MonkeyPatch, kms_server: str, cmk: str) -> None:
    monkeypatch.delenv("AWS_DEFAULT_REGION")
    monkeypatch.setenv("AWS_REGION", "us-east-1")
    monkeypatch.setenv("AWS_ENDPOINT_URL_KMS", kms_server)
    provider = AwsKmsProvider(cmk)
    assert provider.client.meta.region_name == "us-east-1"
    assert provider.resolve() == cmk  # a real call, over HTTP, in that region


def test_missing_region_is_one_line_naming_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("AWS_DEFAULT_REGION")
    monkeypatch.delenv("AWS_REGION", raising=False)
    with pytest.raises(ConfigurationError) as info:
        AwsKmsProvider("alias/app").resolve()
    message = str(info.value)
    assert "\n" not in message and "AWS_REGION" in message


def test_empty_string_in_a_deterministic_column(local_keys: Any, engine: Engine) -> None:
    """'' seals and opens under AES-SIV, and is found by equality (cryptography
    45.0.0 and earlier raised a raw ValueError: the floor is 45.0.1)."""

    class Base(DeclarativeBase):
        pass

    class Code(Base):
        __tablename__ = "compat_codes"
        id: Mapped[int] = mapped_column(primary_key=True)
        code: Mapped[str] = mapped_column(EncryptedType(String(20), local_keys, deterministic=True))

    Base.metadata.create_all(engine)
    with Session(engine) as s:
        s.add_all([Code(id=1, code=""), Code(id=2, code="x")])
        s.commit()
    with Session(engine) as s:
        assert [c.id for c in s.scalars(select(Code).where(Code.code == ""))] == [1]
        assert s.get(Code, 1).code == ""
