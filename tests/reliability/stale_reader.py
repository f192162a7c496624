"""The subprocess side of the stale-cache rotation test: ``python -m reliability.stale_reader``.

Another application process, with its own KeyManager and caches: it reads
and writes the ``people`` table of test_rotation_processes while the parent
rotates the deterministic key under it. Commands on stdin, one per line,
each answered on stdout::

    count VALUE       number of rows whose city == VALUE    -> "N"
    insert ID VALUE   insert a row with that city           -> "ok"
"""

from __future__ import annotations

import argparse
import sys

from sqlalchemy import Column, Integer, MetaData, String, Table, create_engine, func, select

from sa_envelope import EncryptedType, KeyManager, LivePolicy, LocalKeyProvider

__all__ = ["main", "people"]

POLICY = LivePolicy(ttl=0.2, grace=1.0)


def people(keys: KeyManager) -> Table:
    return Table(
        "people", MetaData(),
        Column("id", Integer, primary_key=True, autoincrement=False),
        Column("city", EncryptedType(String(20), keys, deterministic=True)),
    )  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--url", required=True)
    parser.add_argument("--keyfile", required=True)
    ns = parser.parse_args()
    engine = create_engine(ns.url)
    keys = KeyManager(engine, LocalKeyProvider.from_file(ns.keyfile), live=POLICY)
    table = people(keys)
    print("ready", flush=True)
    for line in sys.stdin:
        command, *args = line.split()
        if command == "count":
            with engine.connect() as conn:
                found = conn.execute(select(func.count()).select_from(table).where(table.c.city == args[0]))
                print(found.scalar_one(), flush=True)
        elif command == "insert":
            with engine.begin() as conn:
                conn.execute(table.insert(), [{"id": int(args[0]), "city": args[1]}])
            print("ok", flush=True)
    engine.dispose()
    return 0


if __name__ == "__main__":
    sys.exit(main())
