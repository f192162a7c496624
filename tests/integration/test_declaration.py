"""Declaring columns: bad declarations fail early, names bind, renames survive."""

from __future__ import annotations

import os
from typing import Any

import pytest
from sqlalchemy import Column, Integer, MetaData, String, Table, select, text
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Mapped, Session, mapped_column

from sa_envelope import DecryptionError, EncryptedType, EncryptionError, KeyManager, LocalKeyProvider
from support.models import new_base


def test_wrong_python_value_is_an_encryption_error_without_the_value(engine: Engine) -> None:
    keys = KeyManager(engine, LocalKeyProvider(os.urandom(32)))
    table = Table("dc_vals", MetaData(), Column("id", Integer, primary_key=True), Column("n", EncryptedType(Integer, keys)))
    keys.create_table()
    table.metadata.create_all(engine)
    with engine.begin() as conn, pytest.raises(EncryptionError) as info:
        conn.execute(table.insert().values(n="4111111111111111"))
    assert "dc_vals.n" in str(info.value) and "4111" not in str(info.value)


def test_ddl_needs_no_key_manager_but_values_do(engine: Engine) -> None:
    table = Table("dc_ddl", MetaData(), Column("id", Integer, primary_key=True), Column("s", EncryptedType(String(20))))
    table.metadata.create_all(engine)
    with engine.begin() as conn, pytest.raises(EncryptionError, match="no KeyManager"):
        conn.execute(table.insert().values(s="x"))


def models(keys: KeyManager, table: str, context: str | None) -> Any:
    Base = new_base()

    class Person(Base):
        __tablename__ = table
        id: Mapped[int] = mapped_column(primary_key=True)
        name: Mapped[str] = mapped_column(EncryptedType(String(50), keys, context=context))

    return Person


@pytest.mark.parametrize("pinned", [True, False])
def test_renaming_a_table_keeps_values_readable_when_context_is_pinned(engine: Engine, pinned: bool) -> None:
    key = os.urandom(32)
    keys = KeyManager(engine, LocalKeyProvider(key))
    keys.create_table()
    context = "dc_people.name" if pinned else None
    Old = models(keys, "dc_people", context)
    Old.metadata.create_all(engine)
    with Session(engine) as s:
        s.add(Old(name="Ada"))
        s.commit()
    with engine.begin() as conn:
        conn.execute(text("ALTER TABLE dc_people RENAME TO dc_persons"))
    New = models(KeyManager(engine, LocalKeyProvider(key)), "dc_persons", context)
    with Session(engine) as s:
        if pinned:
            assert s.scalars(select(New.name)).one() == "Ada"
            s.add(New(name="Grace"))  # new writes keep using the pinned context and its keys
            s.commit()
            assert sorted(s.scalars(select(New.name))) == ["Ada", "Grace"]
        else:
            with pytest.raises(DecryptionError):
                s.scalars(select(New.name)).all()
