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

__all__ = ["main", "pieces", "profile_lines"]


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


def _cpu_us(fn: Callable[[], object], n: int) -> float:
    """Unprofiled CPU us per value of ``fn()`` (one pass over n values), best of 7."""
    return 1e6 * min(timeit.repeat(fn, timer=time.process_time, number=1, repeat=7)) / n


def _loop(call: Callable[[Any], Any], items: list[Any]) -> Callable[[], None]:
    def run() -> None:
        for item in items:
            call(item)

    return run


def pieces(env: dict[str, Any], n: int) -> list[str]:
    """Each step of the per-value path timed alone (no profiler), in us per value.

    Reaches into the column type's internals (``_store``, ``_codec``, ``_ctx``,
    ``_read_memo``...): a diagnostic, so a piece whose internals moved prints
    "n/a" instead of failing the run."""
    from sa_envelope.envelope import format as fmt

    lines: list[str] = []
    for name in ("table", "deterministic", "row"):
        table = env["tables"][name]
        column_type = table.c.v.type
        texts = [getattr(v, "value", v) for v in env["values"][name]]
        data = [t.encode() for t in texts]
        bind, result, stored = _processors(table, env["engine"])
        result(stored[0])
        try:
            store, codec, ctx = column_type._store, column_type._codec, column_type._ctx
            key = (store.encryption_key(table.name, column_type._key_scope) if name != "row"
                   else column_type._row_keys.cache.peek(fmt.read_header(stored[0])[1]))
            cipher, head = key.cipher, key.head
            # one cipher per stored value: its row key's (row scope), else the column's key
            ciphers = ([column_type._row_keys.cache.peek(fmt.read_header(v)[1]).cipher for v in stored]
                       if name == "row" else [cipher] * len(stored))
            aad = head + ctx
            nonces = [os.urandom(12) for _ in range(n)]
            steps: list[tuple[str, Callable[[], None]]] = [
                ("encrypt: bind processor, whole", _loop(bind, env["values"][name])),
                ("encrypt: EncryptedType.encrypt", _loop(column_type.encrypt, env["values"][name])),
                ("encrypt: codec.encode (isinstance + str.encode)", _loop(codec.encode, texts)),
                ("encrypt: os.urandom(12)", _loop(lambda _: os.urandom(12), texts)),
                ("encrypt: aad = head + context", _loop(lambda _: head + ctx, texts)),
            ]
            if name == "deterministic":
                steps.append(("encrypt: AESSIV.encrypt (aad precomputed)",
                              _loop(lambda d: cipher.encrypt(d, [aad]), data)))
            else:
                pairs = list(zip(nonces, data))
                steps.append(("encrypt: AESGCM.encrypt (nonce, aad precomputed)",
                              _loop(lambda p: cipher.encrypt(p[0], p[1], aad), pairs)))
            if name != "row":
                steps.append(("encrypt: store.encryption_key (cache get, use count, monotonic)",
                              _loop(lambda _: store.encryption_key(table.name, column_type._key_scope), texts)))
            steps += [
                ("decrypt: result processor, whole", _loop(result, stored)),
                ("decrypt: EncryptedType.decrypt", _loop(column_type.decrypt, stored)),
                ("decrypt: header slice value[:9] + memo dict get",
                 _loop(lambda v: column_type._read_memo.get(v[:9]), stored)),
                ("decrypt: time.monotonic()", _loop(lambda _: time.monotonic(), stored)),
                ("decrypt: fmt.open_value (slices + cipher)",
                 _loop(lambda p: fmt.open_value(p[0], p[1][0], p[1], ctx), list(zip(ciphers, stored)))),
                ("decrypt: codec.decode (bytes.decode)", _loop(codec.decode, data)),
            ]
            if name == "row":
                rows = column_type._row_keys
                ids = [fmt.read_header(v)[1] for v in stored]
                steps += [
                    ("decrypt: fmt.read_header", _loop(fmt.read_header, stored)),
                    ("decrypt: row_keys.decryption_key (cache get, use count)",
                     _loop(lambda k: rows.decryption_key(k, table=table.name, column="v"), ids)),
                ]
        except (AttributeError, TypeError, KeyError) as exc:
            lines.append(f"== {name}: pieces n/a (internals changed: {type(exc).__name__}: {exc})")
            continue
        lines.append(f"== {name}: each piece alone, CPU us per value ({n:,} values, best of 7)")
        lines += [f"    {_cpu_us(fn, n):6.2f}  {label}" for label, fn in steps]
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.profile_values", description=__doc__)
    parser.add_argument("--values", type=int, default=20_000)
    parser.add_argument("--top", type=int, default=14)
    parser.add_argument("--pieces", action="store_true", help="also time each step of the path alone")
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
        if args.pieces:
            print("\n".join(pieces(env, n)))
        engine.dispose()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
