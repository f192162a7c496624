"""Alembic autogenerate as a user meets it (issue 13): a project made by
``alembic init``, the real ``alembic`` command in subprocesses, on every backend.

env.py gets only what every autogenerate user writes (``target_metadata``);
the models use ``EncryptedType``, ``BlindIndexType``, a search index and a
column in the middle of an online migration (nothing of ours may reach the
rendered ``create_table``'s ``info=``). The first revision
must import and upgrade; a second autogenerate against the upgraded database
must find nothing to do. The ``render_item`` variant adds
``render_item=sa_envelope.alembic.render_item`` to ``context.configure``.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from sqlalchemy import inspect
from sqlalchemy.engine import Engine

ALEMBIC = Path(sys.executable).with_name("alembic")

MODELS = '''
import os

from sqlalchemy import String, Text, create_engine
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from sa_envelope import BlindIndexType, EncryptedType, KeyManager, LocalKeyProvider, SubstringIndex


class Base(DeclarativeBase):
    pass


keys = KeyManager(create_engine(os.environ["APP_DATABASE_URL"]), LocalKeyProvider(bytes(32)), metadata=Base.metadata)


class Patient(Base):
    __tablename__ = "ag_patients"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(EncryptedType(String(200), keys))
    ssn: Mapped[str] = mapped_column(EncryptedType(String(11), keys, deterministic=True))
    notes: Mapped[str | None] = mapped_column(EncryptedType(Text, keys, scope="row"))
    email: Mapped[str] = mapped_column(EncryptedType(String(200), keys))
    email_index: Mapped[bytes] = mapped_column(BlindIndexType("email", keys, bits=64), index=True)
    __table_args__ = (SubstringIndex("name", keys),)  # PostgreSQL: a BIGINT[] column and a GIN index


class Contact(Base):  # in the middle of an online migration (docs/migrations.md)
    __tablename__ = "ag_contacts"
    id: Mapped[int] = mapped_column(primary_key=True)
    email: Mapped[str | None] = mapped_column(String(200))
    email_encrypted: Mapped[str | None] = mapped_column(EncryptedType(String(200), keys, migrating_from="email"))
'''


def _alembic(project: Path, url: str, *args: str) -> str:
    env = {**os.environ, "APP_DATABASE_URL": url}
    result = subprocess.run([str(ALEMBIC), *args], cwd=project, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    return result.stdout + result.stderr


def _project(tmp_path: Path, url: str, variant: str) -> Path:
    project = tmp_path / "app"
    project.mkdir()
    (project / "models.py").write_text(MODELS)
    _alembic(project, url, "init", "migrations")
    ini = project / "alembic.ini"
    ini.write_text(re.sub(r"(?m)^sqlalchemy\.url = .*$", f"sqlalchemy.url = {url}", ini.read_text()))
    env_py = project / "migrations" / "env.py"
    code = env_py.read_text().replace("target_metadata = None", "from models import Base\ntarget_metadata = Base.metadata")
    if variant == "render_item":
        code = code.replace("target_metadata=target_metadata,", "target_metadata=target_metadata,\n"
                            "        render_item=__import__('sa_envelope.alembic').alembic.render_item,")
    env_py.write_text(code)
    return project


def _revisions(project: Path) -> list[Path]:
    return sorted((project / "migrations" / "versions").glob("*.py"), key=lambda p: p.stat().st_mtime_ns)


@pytest.mark.parametrize("variant", ["alembic-init", "render_item"])
def test_autogenerate_round_trip(db_url: str, engine: Engine, tmp_path: Path, variant: str) -> None:
    project = _project(tmp_path, db_url, variant)
    _alembic(project, db_url, "revision", "--autogenerate", "-m", "first")
    (first,) = _revisions(project)
    script = first.read_text()
    assert "import sa_envelope\n" in script
    assert "sa.Column('name', sa_envelope.EncryptedType(sa.String(length=200)), nullable=False)" in script
    assert "sa_envelope.EncryptedType(sa.String(length=11), deterministic=True)" in script
    assert "sa_envelope.EncryptedType(sa.Text(), scope='row')" in script
    assert "sa_envelope.BlindIndexType('email', bits=64)" in script
    assert "sa.Column('email_encrypted', sa_envelope.EncryptedType(sa.String(length=200), migrating_from='email'), nullable=True)" in script
    assert "info=" not in script
    if engine.dialect.name == "postgresql":
        assert "sa.Column('name_substring_tokens', postgresql.ARRAY(sa.BigInteger()), nullable=True)" in script
        assert "postgresql_using='gin'" in script
    else:
        assert "sa_envelope_search" in script  # the token table beside the key table
    _alembic(project, db_url, "upgrade", "head")
    assert {"ag_patients", "ag_contacts", "sa_envelope_keys"} <= set(inspect(engine).get_table_names())
    _alembic(project, db_url, "revision", "--autogenerate", "-m", "second")
    second = _revisions(project)[-1]
    assert second != first
    body = second.read_text().split("def upgrade() -> None:", 1)[1].split("def downgrade", 1)[0]
    assert [line.strip() for line in body.splitlines() if line.strip() and not line.strip().startswith("#")] == ['"""Upgrade schema."""', "pass"] or \
        [line.strip() for line in body.splitlines() if line.strip() and not line.strip().startswith("#")] == ["pass"], body
    _alembic(project, db_url, "downgrade", "base")
    assert not {"ag_patients", "ag_contacts"} & set(inspect(engine).get_table_names())
