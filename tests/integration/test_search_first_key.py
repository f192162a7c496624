"""The table's first blind-index key, wanted by a column and by the search
tokens of one statement.

A ``BlindIndexType`` column and a search index of one table share the
table's blind-index key. The tokens are made in a ``before_execute`` hook,
which runs before the statement's connection is known to the key store:
they made the first key on a connection of their own, whose INSERT then
waited for the row lock of the key the flush's transaction had made
(PostgreSQL): a process waiting on itself. The first write runs in a
subprocess, so a hang fails the test instead of the suite.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

from support.rotation import subprocess_env

SCRIPT = textwrap.dedent(
    """
    import os, sys
    from sqlalchemy import Integer, String, create_engine
    from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column
    from sa_envelope import BlindIndexType, EncryptedType, KeyManager, LocalKeyProvider, PrefixIndex, lookup

    engine = create_engine(sys.argv[1])
    keys = KeyManager(engine, LocalKeyProvider(os.urandom(32)))

    class Base(DeclarativeBase):
        pass

    class Person(Base):
        __tablename__ = "first_key_people"
        id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
        name: Mapped[str] = mapped_column(EncryptedType(String(100), keys))
        email: Mapped[str] = mapped_column(EncryptedType(String(100), keys))
        email_index: Mapped[bytes] = mapped_column(BlindIndexType("email", keys, bits=16))
        __table_args__ = (PrefixIndex("name", keys, max_length=4, bits=12),)

    keys.create_table()
    Base.metadata.create_all(engine)
    with Session(engine) as s:  # the first write: no blind-index key exists yet
        s.add(Person(id=1, name="Ada", email="ada@example.org", email_index="ada@example.org"))
        s.commit()
    with Session(engine) as s:
        print([p.id for p in lookup(s, Person.name, startswith="Ad")])
        print([p.id for p in lookup(s, Person.email, "ada@example.org")])
    with engine.connect() as conn:
        print(conn.execute(keys.table.select().where(keys.table.c.scope == "blind-index")).all().__len__())
    """
)


def test_the_first_write_makes_one_blind_index_key(db_url: str, tmp_path: Path) -> None:
    script = tmp_path / "first.py"
    script.write_text(SCRIPT)
    done = subprocess.run(
        [sys.executable, str(script), db_url], env=subprocess_env(None), capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split("\n")[:3] == ["[1]", "[1]", "1"], done.stdout
