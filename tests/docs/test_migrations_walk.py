"""docs/migrations.md walked literally, as its user would, deploy by deploy.

Everything the page prints is read from the page: its migrations become
revision files of an Alembic project in tmp_path (the example's env.py and
ini), run by ``alembic upgrade head`` / ``alembic downgrade -1`` as real
subprocesses; its models are the application; its ``sa-envelope`` commands
run as printed through ``sh`` (only ``$URL``, PATH and AWS's environment
supplied, moto as KMS with ``alias/app-data``), while a thread of the
application keeps writing through the model the page says is deployed; its
"Watch it" queries run as printed. Then: every row holds its last write,
no row is left, each rollback the page gives rolls back, the reverse path
decrypts everything back. The example chain runs as printed too.
"""

from __future__ import annotations

import random
import re
import subprocess
import sys
import threading
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Column, Index, Integer, MetaData, String, Table, insert, inspect, select, text
from sqlalchemy.engine import Engine
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Mapped, Session, mapped_column

from sa_envelope import AwsKmsProvider, EncryptedType, KeyManager
from sa_envelope.keys import table as kt
from support import DOCS, ROOT
from support.models import new_base
from support.online import stored
from support.rotation import subprocess_env

PAGE = (DOCS / "migrations.md").read_text(encoding="utf-8")
FORWARD, REVERSE = PAGE.split("## The reverse: decrypting a column")
ROWS = 400


# -- what the page prints -----------------------------------------------------------------------


def fenced(text_: str, lang: str) -> list[str]:
    """The ```lang blocks of ``text_``, in order."""
    return re.findall(rf"```{lang}\n(.*?)```", text_, flags=re.S)


def spans(text_: str, start: str) -> list[str]:
    """Its inline `code` spans that start with ``start`` (fenced blocks left out, lines joined)."""
    prose = re.sub(r"```.*?```", "", text_, flags=re.S)
    return [" ".join(s.split()) for s in re.findall(r"`([^`]+)`", prose) if s.startswith(start)]


def section(title: str) -> str:
    """The forward part's ``## title`` section."""
    return FORWARD.split(f"\n## {title}", 1)[1].split("\n## ", 1)[0]


FORWARD_PY, REVERSE_PY = fenced(FORWARD, "python"), fenced(REVERSE, "python")
EXPAND, DUAL_MODEL, _BACKFILL_MIGRATION, CONTRACT, FINAL_MODEL = FORWARD_PY
R_EXPAND, R_DUAL_MODEL, R_CONTRACT, R_FINAL_MODEL = REVERSE_PY
(ENCRYPT_COMMAND,) = fenced(FORWARD, "sh")
(DECRYPT_COMMAND,) = fenced(REVERSE, "sh")
PREAMBLE = EXPAND.split("def upgrade", 1)[0]  # the revision's imports and EMAIL, as step 1 prints them
UPGRADE = "alembic upgrade head"
ROLLBACK = "alembic downgrade -1"
ROWS_LEFT, CLAIMS = spans(section("3. Backfill"), "SELECT")
(R_ROWS_LEFT,) = spans(REVERSE, "SELECT")
(EXAMPLE_CHAIN,) = spans(FORWARD, "alembic -c")


def test_the_page_prints_what_the_walk_runs() -> None:
    table = "\n".join(line for line in FORWARD.splitlines() if line.startswith("| "))
    assert set(spans(table, "alembic ")) == {UPGRADE}  # steps 1 and 4
    assert spans(section("1. Expand: add the shadow column"), "alembic ") == [ROLLBACK]
    assert spans(REVERSE, "alembic ") == [ROLLBACK]
    assert "def downgrade" in EXPAND and "def downgrade" in R_EXPAND
    assert ENCRYPT_COMMAND.startswith('sa-envelope encrypt-column --url "$URL"')
    assert DECRYPT_COMMAND.startswith('sa-envelope decrypt-column --url "$URL"')


# -- running it ---------------------------------------------------------------------------------


@pytest.fixture
def app_data(kms_server: str, kms_admin: Any, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """``alias/app-data`` on moto, and this process's boto3 pointed there; yields moto's URL."""
    key_id = kms_admin.create_key()["KeyMetadata"]["KeyId"]
    kms_admin.create_alias(AliasName="alias/app-data", TargetKeyId=key_id)
    monkeypatch.setenv("AWS_ENDPOINT_URL_KMS", kms_server)
    try:
        yield kms_server
    finally:
        kms_admin.delete_alias(AliasName="alias/app-data")


def shell(command: str, cwd: Path, env: dict[str, str]) -> str:
    """``command`` run by sh exactly as printed; its stdout (it must succeed)."""
    path = f"{Path(sys.executable).parent}:{env['PATH']}"  # alembic and sa-envelope of this venv
    result = subprocess.run(["sh", "-c", command], cwd=cwd, env={**env, "PATH": path},
                            capture_output=True, text=True, timeout=300)  # fmt: skip
    assert result.returncode == 0, f"{command}\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}"
    return result.stdout


def alembic_env(kms_server: str, db_url: str) -> dict[str, str]:
    """What the example's env.py reads (the page says to set them)."""
    return subprocess_env(kms_server, SA_ENVELOPE_DATABASE_URL=db_url, SA_ENVELOPE_CMK="alias/app-data")


class Project:
    """The user's Alembic project: the example's env.py and ini, the page's migrations as revisions."""

    def __init__(self, root: Path, env: dict[str, str]) -> None:
        self.root, self.env = root, env
        self.head: str | None = None
        (root / "versions").mkdir(parents=True)
        ini = (ROOT / "migrations_example" / "online.ini").read_text()
        (root / "alembic.ini").write_text(ini.replace("%(here)s/online_versions", "%(here)s/versions"))
        (root / "env.py").write_text((ROOT / "migrations_example" / "env.py").read_text())

    def add(self, revision: str, block: str) -> None:
        """A revision file: the page's block, after step 1's imports and EMAIL."""
        ids = f"revision = {revision!r}\ndown_revision = {self.head!r}\nbranch_labels = None\ndepends_on = None\n\n"
        body = f'"""docs/migrations.md\n\nRevision ID: {revision}\nRevises: {self.head or ""}\n"""\n'
        (self.root / "versions" / f"{revision}.py").write_text(body + PREAMBLE + ids + block.removeprefix(PREAMBLE))
        self.head = revision

    def run(self, command: str) -> None:
        shell(command, self.root, self.env)


def model(block: str, keys: KeyManager, monkeypatch: pytest.MonkeyPatch) -> Any:
    """The page's model block, as the deployed release declares it (a fresh module)."""
    module = types.ModuleType(f"docs_migrations_walk_{len(sys.modules)}")  # annotations resolve here
    monkeypatch.setitem(sys.modules, module.__name__, module)
    ns: dict[str, Any] = module.__dict__
    ns.update(keys=keys, Base=new_base(), Mapped=Mapped, mapped_column=mapped_column, String=String,
              EncryptedType=EncryptedType)  # fmt: skip
    exec(compile(block, "migrations.md", "exec"), ns)
    return ns["User"]


class Writer(threading.Thread):
    """The live application: ORM inserts, updates, NULLs and deletes through ``User``,
    each committed alone; ``expected`` is every row's last committed write."""

    def __init__(self, engine: Engine, User: Any, expected: dict[int, str | None], seed: int) -> None:
        super().__init__(daemon=True)
        self.engine, self.User, self.expected, self.seed = engine, User, expected, seed
        self.rng, self.stop, self.writes, self.locked = random.Random(seed), threading.Event(), 0, 0
        self.error: BaseException | None = None
        self.next_id = max(expected) + 1

    def run(self) -> None:
        try:
            with Session(self.engine) as session:
                while not self.stop.is_set():
                    self.write_one(session)
        except BaseException as exc:  # reported on exit
            self.error = exc

    def write_one(self, session: Session) -> None:
        value: str | None = f"s{self.seed}w{self.writes}@example.org"  # unique, as the index wants
        roll, deleted = self.rng.random(), False
        i = self.next_id if roll < 0.1 else self.rng.randrange(1, self.next_id)
        user = session.get(self.User, i)
        if user is None:  # a new row, or one deleted earlier
            session.add(self.User(id=i, email=value))
        elif roll < 0.15:
            session.delete(user)
            deleted = True
        else:
            user.email = value = None if roll < 0.25 else value
        try:
            session.commit()
        except OperationalError as exc:  # SQLite, one writer at a time: what an application there retries
            if "database is locked" not in str(exc):
                raise
            session.rollback()  # nothing of this write was committed: it is not logged
            self.locked += 1
            return
        if deleted:
            del self.expected[i]
        else:
            self.expected[i] = value
        self.next_id, self.writes = max(self.next_id, i + 1), self.writes + 1

    def __enter__(self) -> Writer:
        self.start()
        while self.writes < 20 and self.is_alive():  # live before the command starts
            self.stop.wait(0.01)
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.join(30)
        assert self.error is None, repr(self.error)


def backfill_under_writes(command: str, cwd: Path, env: dict[str, str], engine: Engine, User: Any,
                          expected: dict[int, str | None], seed: int) -> str:  # fmt: skip
    """The page's command, run while the application writes; its stdout."""
    with Writer(engine, User, expected, seed) as writer:
        before = writer.writes
        out = shell(command, cwd, env)
        assert writer.writes > before, "the application wrote nothing while the command ran"
    return out


def same(got: dict[int, Any], expected: dict[int, Any]) -> None:
    """``got`` is ``expected``; else the rows that differ, (got, expected), and how many."""
    wrong = {i: (got.get(i, "<no row>"), expected.get(i, "<no row>")) for i in got.keys() | expected.keys()
             if got.get(i, "<no row>") != expected.get(i, "<no row>")}  # fmt: skip
    assert not wrong, f"{len(wrong)} of {len(expected)} rows differ (got, expected): {dict(sorted(wrong.items())[:10])}"


def scalar(engine: Engine, query: str) -> Any:
    with engine.connect() as conn:
        return conn.execute(text(query)).scalar_one()


def columns(engine: Engine) -> set[str]:
    return {c["name"] for c in inspect(engine).get_columns("users")}


def indexes(engine: Engine) -> list[tuple[str | None, bool]]:
    return [(ix["name"], bool(ix.get("unique"))) for ix in inspect(engine).get_indexes("users")]


def starting_point(engine: Engine) -> dict[int, str | None]:
    """``users`` with a plaintext, unique ``email``, as before step 1."""
    users = Table(
        "users", MetaData(),
        Column("id", Integer, primary_key=True), Column("email", String(200)),
        Index("ix_users_email", "email", unique=True),
    )  # fmt: skip
    users.create(engine)
    emails = {i: f"user{i}@example.org" if i % 7 else None for i in range(1, ROWS + 1)}
    with engine.begin() as conn:
        conn.execute(insert(users), [{"id": i, "email": v} for i, v in emails.items()])
    return emails


def decrypted_shadow(engine: Engine, keys: KeyManager) -> dict[int, tuple[Any, Any]]:
    """id -> (decrypted email, email__plaintext) between the reverse's expand and contract."""
    enc = EncryptedType(String(200), keys, deterministic=True, context="users.email")
    with engine.connect() as conn:
        rows = conn.execute(text("SELECT id, email, email__plaintext FROM users")).all()
    return {r.id: (None if r.email is None else enc.decrypt(bytes(r.email)), r.email__plaintext) for r in rows}


def test_walk_the_page(engine: Engine, db_url: str, app_data: str, tmp_path: Path,
                       monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    keys = KeyManager(engine, AwsKmsProvider("alias/app-data"))  # the application's
    keys.create_table()  # the application already uses sa-envelope (getting-started.md)
    expected = starting_point(engine)
    project = Project(tmp_path / "project", alembic_env(app_data, db_url))
    cli_env = subprocess_env(app_data, URL=db_url)

    project.add("w1_expand", EXPAND)  # 1. expand, and its rollback
    project.run(UPGRADE)
    assert columns(engine) == {"id", "email", "email__encrypted"}
    project.run(ROLLBACK)
    assert columns(engine) == {"id", "email"}
    project.run(UPGRADE)

    User = model(DUAL_MODEL, keys, monkeypatch)  # 2. the dual-writing release, live from here on
    out = backfill_under_writes(ENCRYPT_COMMAND, tmp_path, cli_env, engine, User, expected, seed=1)  # 3.
    assert "rows written" in out and "KMS calls:" in out, out
    assert scalar(engine, ROWS_LEFT) == 0
    with engine.connect() as conn:
        (job,) = conn.execute(text(CLAIMS)).all()
    assert job[1] == job[2] and job[3] > 0, job  # every range done
    again = shell(ENCRYPT_COMMAND, tmp_path, cli_env)  # "run it again": once done, nothing to do
    assert ": 0 rows written" in again and "KMS calls: 0" in again, again
    same(stored(engine, keys), {i: (v, v) for i, v in expected.items()})  # both halves: step 2's rollback
    with Session(engine) as session:
        same({u.id: u.email for u in session.scalars(select(User))}, expected)

    project.add("w4_contract", CONTRACT)  # 4. contract, with the final model
    project.run(UPGRADE)
    assert columns(engine) == {"id", "email"}
    assert indexes(engine) == [("ix_users_email", True)]  # on the ciphertext; step 1's index gone
    User = model(FINAL_MODEL, keys, monkeypatch)
    some = next(i for i, v in expected.items() if v is not None)
    with Session(engine) as session:
        same({u.id: u.email for u in session.scalars(select(User))}, expected)
        assert session.scalars(select(User.id).where(User.email == expected[some])).all() == [some]

    project.add("r1_expand", R_EXPAND)  # the reverse (step 4's rollback): 1. expand, and its rollback
    project.run(UPGRADE)
    assert columns(engine) == {"id", "email", "email__plaintext"}
    project.run(ROLLBACK)
    assert columns(engine) == {"id", "email"}
    project.run(UPGRADE)
    User = model(R_DUAL_MODEL, keys, monkeypatch)  # 2.
    out = backfill_under_writes(DECRYPT_COMMAND, tmp_path, cli_env, engine, User, expected, seed=2)  # 3.
    assert "rows written" in out, out
    assert scalar(engine, R_ROWS_LEFT) == 0
    same(decrypted_shadow(engine, keys), {i: (v, v) for i, v in expected.items()})
    project.add("r4_contract", R_CONTRACT)  # 4.
    project.run(UPGRADE)
    User = model(R_FINAL_MODEL, keys, monkeypatch)
    with Session(engine) as session:
        same({u.id: u.email for u in session.scalars(select(User))}, expected)
    with engine.connect() as conn:
        same(dict(conn.execute(text("SELECT id, email FROM users")).all()), expected)  # plaintext, stored
    assert indexes(engine) == [("ix_users_email", True)]


def test_the_example_chain_runs_as_printed(engine: Engine, db_url: str, app_data: str) -> None:
    shell(EXAMPLE_CHAIN, ROOT, alembic_env(app_data, db_url))
    assert columns(engine) == {"id", "email"}
    assert scalar(engine, "SELECT version_num FROM alembic_version") == "o003"
    assert kt.KEY_TABLE_NAME in inspect(engine).get_table_names()
