"""The table the online-migration tests share: ``users`` with a plaintext
``email`` and its encrypted shadow, and how to read what is stored."""

from __future__ import annotations

from typing import Any

from sqlalchemy import Column, Integer, LargeBinary, MetaData, String, Table, select
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Mapped, mapped_column

from sa_envelope import EncryptedType, KeyManager

from .models import new_base

__all__ = ["migrating_users", "raw_users", "stored"]


def raw_users(name: str = "users") -> Table:
    """The table as the database has it between expand and contract (no types of ours)."""
    return Table(
        name, MetaData(),
        Column("id", Integer, primary_key=True, autoincrement=False),
        Column("email", String(200)),
        Column("email__encrypted", LargeBinary),
    )


def _options(scope: str) -> dict[str, Any]:
    """A table-scoped email is deterministic (queried by ==); a row-scoped one cannot be."""
    return {"deterministic": True} if scope == "table" else {"scope": "row"}


def migrating_users(keys: KeyManager, name: str = "users", scope: str = "table") -> Any:
    """The release deployed between expand and contract (``migrating_from``)."""

    class User(new_base()):
        __tablename__ = name
        id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
        email: Mapped[str | None] = mapped_column(
            "email__encrypted", EncryptedType(String(200), keys, migrating_from="email", **_options(scope))
        )
        email_plain: Mapped[str | None] = mapped_column("email", String(200))

    return User


def stored(engine: Engine, keys: KeyManager, name: str = "users", scope: str = "table") -> dict[int, tuple[Any, Any]]:
    """id -> (plaintext half, decrypted encrypted half) as stored."""
    enc = EncryptedType(String(200), keys, context=f"{name}.email", **_options(scope))
    table = raw_users(name)
    with engine.connect() as conn:
        rows = conn.execute(select(table)).all()
    return {r.id: (r.email, None if r.email__encrypted is None else enc.decrypt(bytes(r.email__encrypted)))
            for r in rows}
