"""Composite primary keys on the command line: real subprocesses, every backend.

``--pk NAME=VALUE`` once per primary-key column (in any order) names one row
for ``export`` and ``shred``; ``verify`` names a tampered value's row the
same way (``region=eu, num=2``). The table's primary key is declared in
another order than its columns, so the row digest that ``shred`` computes
must follow the key's order, as the application's does.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

from sqlalchemy import JSON, Integer, LargeBinary, MetaData, PrimaryKeyConstraint, String, Table, select, type_coerce
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Mapped, Session, mapped_column

from sa_envelope import EncryptedType, KeyManager, LocalKeyProvider
from sa_envelope.envelope import format as fmt
from support.models import new_base
from support.rotation import PYTHON, subprocess_env

ROWS = [("eu", 1, "Ada"), ("eu", 2, "Bea"), ("us", 1, "Cy")]


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([PYTHON, "-m", "sa_envelope", *args], env=subprocess_env(None),
                          capture_output=True, text=True, timeout=180)  # fmt: skip


def as_json(result: subprocess.CompletedProcess[str]) -> Any:
    assert "Traceback" not in result.stderr, result.stderr
    (line,) = result.stdout.strip().splitlines()  # one JSON object, nothing else
    return json.loads(line)


def model(keys: KeyManager) -> Any:
    class Thing(new_base()):
        __tablename__ = "things"
        __table_args__ = (PrimaryKeyConstraint("region", "num"),)  # not the columns' order
        num: Mapped[int] = mapped_column(Integer, autoincrement=False)
        region: Mapped[str] = mapped_column(String(10))
        name: Mapped[str] = mapped_column(EncryptedType(String(100), keys))
        notes: Mapped[dict | None] = mapped_column(EncryptedType(JSON, keys, scope="row"))

    return Thing


def filled(engine: Engine, tmp_path: Path) -> tuple[LocalKeyProvider, str]:
    provider = LocalKeyProvider.from_file(tmp_path / "master.key")
    keys = KeyManager(engine, provider)
    keys.create_table()
    Thing = model(keys)
    Thing.metadata.create_all(engine)
    with Session(engine) as session:
        session.add_all(Thing(region=r, num=n, name=name, notes={"who": name}) for r, n, name in ROWS)
        session.commit()
    return provider, f"local:{tmp_path / 'master.key'}"


def read_back(engine: Engine, provider: LocalKeyProvider) -> dict[tuple[str, int], tuple[str, Any]]:
    """What the application reads (a new manager, as a new process)."""
    Thing = model(KeyManager(engine, provider))
    with Session(engine) as session:
        return {(t.region, t.num): (t.name, t.notes) for t in session.scalars(select(Thing))}


def test_export_and_shred_one_row_of_a_composite_key(engine: Engine, db_url: str, tmp_path: Path) -> None:
    provider, cmk = filled(engine, tmp_path)
    base = ("export", "--database-url", db_url, "--cmk", cmk, "--table", "things", "--format", "jsonl",
            "--type", "notes=JSON", "--columns", "region,num,name,notes")  # fmt: skip
    for pk in (["region=eu", "num=2"], ["num=2", "region=eu"]):
        one = cli(*base, *(a for p in pk for a in ("--pk", p)))
        assert one.returncode == 0, one.stderr
        assert [json.loads(x) for x in one.stdout.splitlines()] == [
            {"region": "eu", "num": 2, "name": "Bea", "notes": {"who": "Bea"}}
        ]
    for wrong in (["2"], ["region=eu"], ["region=eu", "num=2", "num=3"], ["region=eu", "id=2"]):
        refused = cli(*base, *(a for p in wrong for a in ("--pk", p)))
        assert refused.returncode == 1 and refused.stderr.strip().splitlines() == [
            "sa-envelope: error: the primary key of things is (region, num): give --pk NAME=VALUE once for "
            "each of its columns"
        ]
    not_a_number = cli(*base, "--pk", "region=eu", "--pk", "num=two")
    assert not_a_number.returncode == 1
    assert not_a_number.stderr.strip() == "sa-envelope: error: --pk 'two' is not a value of things.num"

    shred = ("shred", "--database-url", db_url, "--cmk", cmk, "--table", "things", "--yes")
    by_row = cli(*shred, "--pk", "num=2", "--pk", "region=eu")
    assert by_row.returncode == 0, by_row.stderr
    assert "keys of row region=eu, num=2 of things:" in by_row.stdout
    assert len(as_json(cli(*shred, "--pk", "region=us", "--pk", "num=9", "--json"))["shredded"]) == 0  # no such row
    assert read_back(engine, provider) == {
        ("eu", 1): ("Ada", {"who": "Ada"}),
        ("eu", 2): ("Bea", None),  # its row key is gone: the row-scoped value is erased
        ("us", 1): ("Cy", {"who": "Cy"}),
    }
    verify = cli("verify", "--database-url", db_url, "--cmk", cmk)
    assert verify.returncode == 0, verify.stdout
    assert "things.notes: 2 ok, 1 erased, 0 failed" in verify.stdout


def test_verify_names_the_composite_key_of_a_tampered_value(engine: Engine, db_url: str, tmp_path: Path) -> None:
    _, cmk = filled(engine, tmp_path)
    table = Table("things", MetaData(), autoload_with=engine)
    where = (table.c.region == "eu") & (table.c.num == 2)
    with engine.begin() as conn:
        stored = bytes(conn.execute(select(type_coerce(table.c.name, LargeBinary)).where(where)).scalar_one())
        conn.execute(table.update().where(where).values(name=stored[:-1] + bytes([stored[-1] ^ 1])))
    result = cli("verify", "--database-url", db_url, "--cmk", cmk)
    assert result.returncode == 1
    key = fmt.format_key_id(fmt.key_id_of(stored))
    assert f"value region=eu, num=2 of things.name does not authenticate (key {key})" in result.stdout
    report = as_json(cli("verify", "--database-url", db_url, "--cmk", cmk, "--json"))
    assert report["bad_values"] == [{"table": "things", "column": "name", "key": key, "row": "region=eu, num=2"}]


def test_rotate_and_reencrypt_a_table_of_a_composite_key(engine: Engine, db_url: str, tmp_path: Path) -> None:
    """reencrypt pages through the rows by the reflected (composite) primary key."""
    provider, cmk = filled(engine, tmp_path)
    with engine.connect() as conn:
        (old,) = {fmt.key_id_of(bytes(v)) for v in conn.execute(select(type_coerce(model(None).__table__.c.name,
                                                                                    LargeBinary))).scalars()}  # fmt: skip
    rotated = as_json(cli("rotate", "--database-url", db_url, "--cmk", cmk, "--table", "things", "--json"))
    done = cli("reencrypt", "--database-url", db_url, "--cmk", cmk, "--key", fmt.format_key_id(old), "--json",
               "--batch-size", "2")  # fmt: skip
    report = as_json(done)
    assert done.returncode == 0 and (report["reencrypted"], report["remaining"], report["failed"]) == (3, 0, 0)
    with engine.connect() as conn:
        heads = conn.execute(select(type_coerce(model(None).__table__.c.name, LargeBinary))).scalars().all()
    assert {fmt.format_key_id(fmt.key_id_of(bytes(h))) for h in heads} == {rotated["key"]}
    assert {k: v[0] for k, v in read_back(engine, provider).items()} == {(r, n): name for r, n, name in ROWS}
