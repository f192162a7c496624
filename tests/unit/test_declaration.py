"""Declaring columns without a database: bad declarations fail early, names bind."""

from __future__ import annotations

import pytest
from sqlalchemy import ARRAY, Column, Integer, MetaData, String, Table
from sqlalchemy.orm import Mapped, mapped_column

from sa_envelope import ConfigurationError, EncryptedType
from support.models import new_base


def test_bad_declarations_raise_configuration_error() -> None:
    with pytest.raises(ConfigurationError, match="scope"):
        EncryptedType(String(10), scope="column")
    with pytest.raises(ConfigurationError, match="deterministic"):
        EncryptedType(String(10), scope="row", deterministic=True)
    with pytest.raises(ConfigurationError, match="cannot serialise"):
        EncryptedType(ARRAY(Integer))
    with pytest.raises(ConfigurationError, match="table.column"):
        EncryptedType(String(10), context="nodot")
    shared = EncryptedType(String(10))
    Table("dc_a", MetaData(), Column("x", shared))
    with pytest.raises(ConfigurationError, match="own instance"):
        Table("dc_b", MetaData(), Column("y", shared))


def test_names_are_learned_from_the_table_and_copied_for_mixins() -> None:
    Base = new_base()

    class Mixin:
        secret: Mapped[str] = mapped_column(EncryptedType(String(10)))

    class One(Mixin, Base):
        __tablename__ = "dc_one"
        id: Mapped[int] = mapped_column(primary_key=True)

    class Two(Mixin, Base):
        __tablename__ = "dc_two"
        id: Mapped[int] = mapped_column(primary_key=True)

    assert One.__table__.c.secret.type.bound_context == "dc_one.secret"
    assert Two.__table__.c.secret.type.bound_context == "dc_two.secret"
    pinned = EncryptedType(String(10), context="legacy.name")
    Table("dc_new", MetaData(), Column("renamed", pinned))
    assert pinned.bound_context == "legacy.name"
