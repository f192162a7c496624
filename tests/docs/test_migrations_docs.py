"""docs/migrations.md runs: its forward ```python blocks, in order, as the four deploys
(each migration function inside a real Alembic migration context, each model
used through a Session), on every backend."""

from __future__ import annotations

import re
import sys
import types
from pathlib import Path
from typing import Any

import pytest
from alembic.config import Config
from alembic.migration import MigrationContext
from alembic.operations import Operations
from sqlalchemy import Column, Integer, MetaData, String, Table, insert, inspect, select
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Mapped, Session, mapped_column

import sa_envelope.alembic
from sa_envelope import EncryptedType, KeyManager, LocalKeyProvider
from support import DOCS
from support.models import new_base


def python_blocks(page: str) -> list[str]:
    """The forward part's blocks (the reverse is walked in test_migrations_walk.py)."""
    forward = (DOCS / page).read_text().split("## The reverse: decrypting a column", 1)[0]
    return re.findall(r"```python\n(.*?)```", forward, flags=re.S)


def _migrate(engine: Engine, keys: KeyManager, function: Any) -> None:
    """Run ``function`` (an ``upgrade``) as Alembic runs one revision."""
    with engine.connect() as conn:
        context = MigrationContext.configure(conn, opts={"transaction_per_migration": True})
        config = Config()
        config.attributes[sa_envelope.alembic.KEYS_ATTRIBUTE] = keys
        context.environment_context = types.SimpleNamespace(config=config)  # as env.py's
        with context.begin_transaction(_per_migration=True), Operations.context(context):
            function()


def test_migrations_runbook_runs(engine: Engine, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    keys = KeyManager(engine, LocalKeyProvider.from_file(tmp_path / "master.key"))
    keys.create_table()
    users = Table("users", MetaData(), Column("id", Integer, primary_key=True), Column("email", String(200)))
    users.create(engine)
    with engine.begin() as conn:
        conn.execute(insert(users), [{"id": i, "email": f"u{i}@example.org"} for i in range(1, 51)])
    blocks = python_blocks("migrations.md")
    assert len(blocks) == 5
    module = types.ModuleType("docs_migrations")  # the models' annotations resolve here
    monkeypatch.setitem(sys.modules, module.__name__, module)
    ns: dict[str, Any] = module.__dict__
    ns.update(keys=keys, Mapped=Mapped, mapped_column=mapped_column, String=String, EncryptedType=EncryptedType)

    exec(compile(blocks[0], "migrations.md", "exec"), ns)  # 1. expand
    _migrate(engine, keys, ns["upgrade"])
    assert "email__encrypted" in {c["name"] for c in inspect(engine).get_columns("users")}

    ns["Base"] = new_base()
    exec(compile(blocks[1], "migrations.md", "exec"), ns)  # 2. dual writes
    User = ns["User"]
    with Session(engine) as session:
        session.get(User, 1).email = "first@example.org"
        session.commit()
        assert session.scalars(select(User.id).where(User.email == "u2@example.org")).all() == [2]

    exec(compile(blocks[2], "migrations.md", "exec"), ns)  # 3. backfill
    _migrate(engine, keys, ns["upgrade"])

    exec(compile(blocks[3], "migrations.md", "exec"), ns)  # 4. contract
    _migrate(engine, keys, ns["upgrade"])
    ns["Base"] = new_base()
    exec(compile(blocks[4], "migrations.md", "exec"), ns)
    with Session(engine) as session:
        emails = {u.id: u.email for u in session.scalars(select(ns["User"]))}
    assert emails == {1: "first@example.org", **{i: f"u{i}@example.org" for i in range(2, 51)}}
