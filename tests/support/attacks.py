"""The attacker of tests/integration/test_attacks_key_table.py: read/write access to the
database (raw SQL only) and a boto3 KMS client of their own.

Also a small schema covering every key scope (table, deterministic,
blind-index, row) and a KMS client that records which CMK each call named,
so a test can prove the application never reached the attacker's CMK.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

import boto3
from sqlalchemy import JSON, Engine, LargeBinary, MetaData, String, select, text, type_coerce
from sqlalchemy.orm import Mapped, Session, mapped_column

from sa_envelope import BlindIndexType, EncryptedType, KeyManager
from sa_envelope.envelope import format as fmt
from sa_envelope.keys import table as kt
from sa_envelope.providers.base import KeyMeta, key_context

from .models import new_base

__all__ = [
    "Attacker", "TABLE", "calls_naming", "make_model", "read_rows", "recording_client", "row", "value_keys",
    "write_rows",
]

TABLE = "atk_accounts"
FAR_FUTURE = dt.timedelta(days=365)
_KEY_ARGS = ("KeyId", "SourceKeyId", "DestinationKeyId")


def recording_client(endpoint: str) -> Any:
    """A KMS client whose ``seen`` list records ``(operation, CMK named)`` per call."""
    client = boto3.client("kms", endpoint_url=endpoint, region_name="us-east-1")
    seen: list[tuple[str, str]] = []

    def record(params: dict[str, Any], model: Any, **_: Any) -> None:
        for arg in _KEY_ARGS:
            if arg in params:
                seen.append((model.name, str(params[arg])))

    client.meta.events.register("provide-client-params.kms", record)
    client.seen = seen
    return client


def calls_naming(client: Any, cmk_arn: str) -> list[tuple[str, str]]:
    """The calls of ``client`` that named ``cmk_arn`` (its ARN or its key id)."""
    key_id = cmk_arn.rsplit("/", 1)[-1]
    return [(op, k) for op, k in client.seen if k == cmk_arn or k == key_id]


def make_model(keys: KeyManager, table: str = TABLE, schema: str | None = None, index: bool = True) -> Any:
    """One table with a column of every key scope (a new manager: a new process);
    ``index=False`` maps it without its blind index."""

    class Account(new_base()):  # type: ignore[misc]
        __tablename__ = table
        __table_args__ = {"schema": schema}
        id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
        name: Mapped[str] = mapped_column(EncryptedType(String(100), keys))
        ssn: Mapped[str] = mapped_column(EncryptedType(String(11), keys, deterministic=True))
        email: Mapped[str] = mapped_column(EncryptedType(String(100), keys))
        notes: Mapped[dict | None] = mapped_column(EncryptedType(JSON, keys, scope="row"))
        if index:
            email_index: Mapped[bytes | None] = mapped_column(BlindIndexType("email", keys))
        else:
            email_index: Mapped[bytes | None] = mapped_column(LargeBinary)

    return Account


def row(n: int) -> dict[str, Any]:
    return {"id": n, "name": f"name {n}", "ssn": f"{n:03d}-00-0000", "email": f"user{n}@example.com",
            "notes": {"n": n}}


def write_rows(engine: Engine, Account: Any, ns: range) -> None:
    with Session(engine) as s:
        s.add_all([Account(**row(n)) for n in ns])
        s.commit()


def read_rows(engine: Engine, Account: Any) -> dict[int, dict[str, Any]]:
    with Session(engine) as s:
        return {a.id: {"id": a.id, "name": a.name, "ssn": a.ssn, "email": a.email, "notes": a.notes}
                for a in s.scalars(select(Account).order_by(Account.id))}


def value_keys(engine: Engine, Account: Any, ns: range) -> dict[str, set[int]]:
    """The key ids named by the headers of rows ``ns`` (row keys: their
    parent table key), per column."""
    t = Account.__table__
    cols = ("name", "ssn", "email", "notes")
    with engine.connect() as conn:
        stored = conn.execute(
            select(*(type_coerce(t.c[c], LargeBinary) for c in cols)).where(t.c.id.in_(list(ns)))
        ).all()
        out = {c: {fmt.read_header(bytes(r[i]))[1] for r in stored} for i, c in enumerate(cols)}
        keys = kt.key_table(MetaData())
        parents = conn.execute(select(keys.c.parent_id).where(keys.c.id.in_(list(out["notes"])))).scalars().all()
    out["notes-parent"] = set(parents)
    return out


class Attacker:
    """Raw SQL on the key table and a KMS client of their own."""

    def __init__(self, engine: Engine, client: Any, cmk: str) -> None:
        self.engine, self.client, self.cmk = engine, client, cmk

    def mint(self, key_id: int, owner: str, scope: str, created: dt.datetime, *, v1: bool = False,
             namespace: str | None = None) -> tuple[bytes, str]:
        """GenerateDataKey under the attacker's CMK with the context the application uses."""
        algorithm = kt.SCOPE_ALGORITHM[scope]
        meta = KeyMeta(fmt.format_key_id(key_id), owner, scope, algorithm, kt.created_seconds(created), namespace)
        context = key_context(owner, meta.key_id) if v1 else key_context(meta)
        size = 64 if scope == kt.SCOPE_DETERMINISTIC else 32
        out = self.client.generate_data_key(KeyId=self.cmk, NumberOfBytes=size, EncryptionContext=context)
        return out["CiphertextBlob"], out["KeyId"]

    def plant(self, owner: str, scope: str, *, key_id: int | None = None, ahead: dt.timedelta = FAR_FUTURE,
              v1: bool = False) -> int:
        """Insert an active key row of the attacker's making; returns its id."""
        key_id = key_id if key_id is not None else fmt.new_key_id()
        created = (kt.utcnow() + ahead).replace(microsecond=0)
        wrapped, arn = self.mint(key_id, owner, scope, created, v1=v1)
        self.sql(
            "INSERT INTO sa_envelope_keys (id, scope, owner_table, parent_id, wrapping_key_id, wrapped_key, "
            "algorithm, status, created_at, updated_at, context_version) VALUES (:id, :scope, :owner, NULL, "
            ":arn, :wrapped, :alg, 'active', :created, :created, :version)",
            id=key_id, scope=scope, owner=owner, arn=arn, wrapped=wrapped, alg=kt.SCOPE_ALGORITHM[scope],
            created=self.stamp(created), version=None if v1 else 2,
        )
        return key_id

    def stamp(self, when: dt.datetime) -> dt.datetime:
        """A UTC time as raw SQL must pass it: aware for timestamptz, naive UTC elsewhere."""
        return when if self.engine.dialect.name == "postgresql" else when.replace(tzinfo=None)

    def sql(self, statement: str, **params: Any) -> None:
        with self.engine.begin() as conn:
            conn.execute(text(statement), params)

    def row_of(self, key_id: int) -> tuple[Any, ...]:
        with self.engine.connect() as conn:
            return tuple(conn.execute(text(
                "SELECT wrapping_key_id, wrapped_key, status, context_version FROM sa_envelope_keys WHERE id = :id"),
                {"id": key_id}).one())
