"""Where the per-value time goes: cProfile of encrypt and decrypt on the Core path.

    python -m benchmarks.profile_values [--values 20000] [--top 14]

For table scope, deterministic and row scope (and the floor, for scale), on
a SQLite file with a local key and a warm key cache:

- ``encrypt``: the column's bind processor over N values (what an
  executemany calls per value; row scope gets one row key per value, made
  beforehand by ``keys.new_row_keys``);
- ``decrypt``: the column's result processor over the N stored values (what
  ``conn.execute(select(...)).all()`` calls per value), and
- ``core select``: a real ``select(...).all()`` of the N rows, so the
  result machinery around the processor is in the picture too.

Each line is a function: calls per value, its own time (``tottime``) and
its time with callees (``cumtime``), in us per value. cProfile adds a fixed
cost to every Python call, so the profiled totals are larger than the
unprofiled ones printed first (``timeit`` of the same loop, best of 7); read
the shares, not the absolute figures. Both clocks are this process's CPU
time (``time.process_time``), which a busy machine disturbs less than wall
time.
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import tempfile
import time
import timeit
from typing import Any, Callable

from sqlalchemy import Column, Integer, LargeBinary, MetaData, String, Table, create_engine, insert, select

from ._data import dataset
from ._variants import FloorAesGcm

__all__ = ["main", "profile_lines"]


def profile_lines(fn: Callable[[], object], per: int, top: int) -> list[str]:
    """The ``top`` functions by own time of one ``fn()``, in us per value."""
    profiler = cProfile.Profile(time.process_time)  # CPU time: a busy machine's waits left out
    profiler.enable()
    fn()
    profiler.disable()
    stats = pstats.Stats(profiler)
    rows = sorted(stats.stats.items(), key=lambda item: item[1][2], reverse=True)  # type: ignore[attr-defined]
    total = sum(item[1][2] for item in rows)
    lines = [f"    profiled total {1e6 * total / per:.2f} us/value", "    calls/value  own us  cum us  function"]
    for (path, line, name), (_, ncalls, tottime, cumtime, _) in rows[:top]:
        where = f"{os.path.basename(path)}:{line}({name})" if line else name
        lines.append(f"    {ncalls / per:11.2f} {1e6 * tottime / per:7.3f} {1e6 * cumtime / per:7.3f}  {where}")
    return lines


def _setup(directory: str, n: int) -> dict[str, Any]:
    from sa_envelope import EncryptedType, KeyManager, LocalKeyProvider

    engine = create_engine(f"sqlite:///{directory}/profile.db")
    keys = KeyManager(engine, LocalKeyProvider(os.urandom(32)))
    keys.create_table()
    texts = [row[0] for row in dataset(n)]
    metadata = MetaData()
    tables = {
        "floor": Table("p_floor", metadata, Column("id", Integer, primary_key=True), Column("v", FloorAesGcm())),
        "table": Table("p_table", metadata, Column("id", Integer, primary_key=True),
                       Column("v", EncryptedType(String(64), keys))),
        "deterministic": Table("p_det", metadata, Column("id", Integer, primary_key=True),
                               Column("v", EncryptedType(String(64), keys, deterministic=True))),
        "row": Table("p_row", metadata, Column("id", Integer, primary_key=True),
                     Column("v", EncryptedType(String(64), keys, scope="row"))),
    }
    metadata.create_all(engine)
    values: dict[str, list[Any]] = {}
    with engine.begin() as conn:
        for name, table in tables.items():
            if name == "row":
                values[name] = [k.value(t) for k, t in zip(keys.new_row_keys(conn, table.name, n), texts)]
            else:
                values[name] = texts
            conn.execute(insert(table), [{"v": v} for v in values[name]])
    return {"engine": engine, "keys": keys, "tables": tables, "values": values}


def _processors(table: Table, engine: Any) -> tuple[Callable[[Any], Any], Callable[[Any], Any], list[Any]]:
    column_type = table.c.v.type
    dialect = engine.dialect
    bind = column_type.bind_processor(dialect) or (lambda v: v)
    result = column_type.result_processor(dialect, LargeBinary()) or (lambda v: v)
    raw = Table(table.name, MetaData(), Column("v", LargeBinary))
    with engine.connect() as conn:
        stored = list(conn.execute(select(raw.c.v)).scalars())
    return bind, result, stored


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.profile_values", description=__doc__)
    parser.add_argument("--values", type=int, default=20_000)
    parser.add_argument("--top", type=int, default=14)
    args = parser.parse_args(argv)
    n = args.values
    with tempfile.TemporaryDirectory() as directory:
        env = _setup(directory, n)
        engine, tables, values = env["engine"], env["tables"], env["values"]
        for name, table in tables.items():
            bind, result, stored = _processors(table, engine)
            for value in stored[:3]:
                result(value)  # warm: the decrypt memo is filled on the first value

            def enc(bind: Any = bind, vals: list[Any] = values[name]) -> None:
                for v in vals:
                    bind(v)

            def dec(result: Any = result, stored: list[Any] = stored) -> None:
                for c in stored:
                    result(c)

            def core_select(table: Table = table) -> None:
                with engine.connect() as conn:
                    conn.execute(select(table.c.v)).all()

            for step, fn in (("encrypt", enc), ("decrypt", dec), ("core select", core_select)):
                best = min(timeit.repeat(fn, timer=time.process_time, number=1, repeat=7))
                print(f"== {name}: {step}, {n:,} values, unprofiled {1e6 * best / n:.2f} us/value")
                print("\n".join(profile_lines(fn, n, args.top)))
        engine.dispose()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
