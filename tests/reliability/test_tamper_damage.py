"""Damaged, moved or foreign values fail closed with DecryptionError.

Each case edits stored bytes with raw SQL, then reads through the ORM: the
error must be ours, name the table and column, and never be an IndexError,
a struct.error or another row's data.
"""

from __future__ import annotations

import os
from typing import Callable

import pytest
from sqlalchemy import String, select
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Mapped, Session, mapped_column

from reliability.tamper import read_raw, write_raw
from sa_envelope import DecryptionError, EncryptedType, EnvelopeError, KeyManager, LocalKeyProvider
from support.models import new_base


def build(engine: Engine) -> tuple[KeyManager, type, type]:
    keys = KeyManager(engine, LocalKeyProvider(os.urandom(32)))

    Base = new_base()

    class Patient(Base):
        __tablename__ = "tp_patients"
        id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
        name: Mapped[str] = mapped_column(EncryptedType(String(100), keys))
        ssn: Mapped[str] = mapped_column(EncryptedType(String(100), keys))

    class Doctor(Base):
        __tablename__ = "tp_doctors"
        id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
        name: Mapped[str] = mapped_column(EncryptedType(String(100), keys))

    keys.create_table()
    Base.metadata.create_all(engine)
    with Session(engine) as s:
        s.add_all([Patient(id=1, name="alice", ssn="111-11-1111"), Patient(id=2, name="bob", ssn="222-22-2222")])
        s.add(Doctor(id=1, name="dr who"))
        s.commit()
    return keys, Patient, Doctor


def set_name(engine: Engine, value: bytes, table: str = "tp_patients", column: str = "name", row: int = 1) -> None:
    """Store ``value`` as is in a ``name`` cell (by default), committed."""
    write_raw(engine, table, column, row, value)


def stored(engine: Engine, table: str = "tp_patients", column: str = "name", row: int = 1) -> bytes:
    """The bytes stored in a ``name`` cell (by default)."""
    return read_raw(engine, table, column, row)


def flip_low_bit(b: bytes, i: int) -> bytes:
    return b[:i] + bytes([b[i] ^ 0x01]) + b[i + 1 :]


CASES: dict[str, Callable[[bytes], bytes]] = {
    "flip-version": lambda b: flip_low_bit(b, 0),
    "flip-key-id": lambda b: flip_low_bit(b, 5),
    "flip-nonce": lambda b: flip_low_bit(b, 12),
    "flip-ciphertext": lambda b: flip_low_bit(b, 25),
    "flip-tag": lambda b: flip_low_bit(b, len(b) - 1),
    "truncated-tag": lambda b: b[:-1],
    "truncated-to-header": lambda b: b[:9],
    "truncated-to-one": lambda b: b[:1],
    "extended": lambda b: b + b"\x00",
    "garbage": lambda b: b"this is not an envelope at all",
    "empty": lambda b: b"",
}


@pytest.mark.parametrize("case", CASES)
def test_damaged_value_raises_decryption_error(engine: Engine, case: str) -> None:
    keys, Patient, _ = build(engine)
    set_name(engine, CASES[case](stored(engine)))
    with Session(engine) as s, pytest.raises(DecryptionError) as info:
        s.get(Patient, 1)
    assert info.value.table == "tp_patients" and info.value.column == "name"
    assert "tp_patients.name" in str(info.value)
    assert "alice" not in str(info.value)
    with Session(engine) as s:  # the other row is untouched
        assert s.get(Patient, 2).name == "bob"


def test_value_moved_to_another_column_fails(engine: Engine) -> None:
    keys, Patient, _ = build(engine)
    set_name(engine, stored(engine, column="ssn"))
    with Session(engine) as s, pytest.raises(DecryptionError) as info:
        s.get(Patient, 1)
    assert info.value.column == "name" and info.value.key_id


def test_value_moved_to_another_table_fails(engine: Engine) -> None:
    keys, Patient, Doctor = build(engine)
    set_name(engine, stored(engine, table="tp_patients"), table="tp_doctors")
    with Session(engine) as s, pytest.raises(DecryptionError) as info:
        s.get(Doctor, 1)
    assert info.value.table == "tp_doctors"


def test_core_select_raises_ours_unwrapped(engine: Engine) -> None:
    keys, Patient, _ = build(engine)
    set_name(engine, b"\x01" + bytes(60))
    with engine.connect() as conn, pytest.raises(EnvelopeError):
        conn.execute(select(Patient.__table__)).all()
