"""Where a row-scoped Core insert and cold select spend their time, per row.

    python -m benchmarks.row_costs sqlite:////tmp/costs.db [ROWS] [ROUNDS]

A Core executemany of ROWS rows (the benchmark's three columns, primary keys
made by the database) into a row-scoped table and into the floor's table,
then a cold select of each (key cache emptied first). The steps of the Core
hook and of the key loading are timed by wrapping the functions that do them
(wall time, us per row, median of ROUNDS rounds after a discarded one); what
is left of the insert is the INSERT itself with its bind processors.
Keys come from a local master key: no KMS call is timed. Every table it makes
starts with ``bench_costs_`` and is dropped at the end.
"""

from __future__ import annotations

import functools
import gc
import statistics
import sys
import time
from typing import Any

from sqlalchemy import Column, Integer, MetaData, String, Table, create_engine, insert, select

from sa_envelope import EncryptedType, KeyManager, LocalKeyProvider
from sa_envelope.rows import binding, core, keyrows
from sa_envelope.rows import keys as row_keys

from ._data import dataset
from ._variants import COLUMNS, FloorAesGcm

__all__ = ["STEPS", "main"]

# (module or class, function, label): each is timed where it is looked up at run time
STEPS: list[tuple[Any, str, str]] = [
    (core._CoreWrites, "before", "Core hook before the INSERT"),
    (core, "plan_for", "  plan (who writes what)"),
    (row_keys.RowKeys, "create", "  row keys made (material, a RowKeyCipher each, cached)"),
    (core, "_rewrite", "  parameters paired with their keys"),
    (core._CoreWrites, "after", "Core hook after the INSERT"),
    (binding, "row_digests", "  row digests (HMAC-SHA256)"),
    (core, "retire", "  earlier keys of these rows looked up (SELECT)"),
    (row_keys, "_wrapped_now", "  wraps (AES-GCM under the table key)"),
    (keyrows, "insert_key_rows", "  key-row INSERT"),
    (row_keys.RowKeys, "load", "cold select: key rows read and unwrapped"),
]


def _instrument(spent: dict[str, float]) -> list[tuple[Any, str, Any]]:
    """Wrap every step; returns what :func:`_restore` puts back."""
    originals = []
    for owner, name, label in STEPS:
        original = getattr(owner, name)
        originals.append((owner, name, original))

        @functools.wraps(original)
        def timed(*args: Any, _f: Any = original, _label: str = label, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return _f(*args, **kwargs)
            finally:
                spent[_label] = spent.get(_label, 0.0) + time.perf_counter() - start

        setattr(owner, name, timed)
    return originals


def _restore(originals: list[tuple[Any, str, Any]]) -> None:
    for owner, name, original in reversed(originals):
        setattr(owner, name, original)


def main(url: str, rows: int = 2_000, rounds: int = 5) -> None:
    spent: dict[str, float] = {}
    originals = _instrument(spent)
    engine = create_engine(url)
    keys = KeyManager(engine, LocalKeyProvider(b"\x01" * 32), table_name="bench_costs_keys")
    keys.table.drop(engine, checkfirst=True)
    keys.create_table()
    metadata = MetaData()
    row = Table(
        "bench_costs_row",
        metadata,
        Column("id", Integer, primary_key=True),
        *(Column(c, EncryptedType(String(n), keys, scope="row")) for c, n in COLUMNS.items()),
    )
    floor = Table(
        "bench_costs_floor",
        metadata,
        Column("id", Integer, primary_key=True),
        *(Column(c, FloorAesGcm()) for c in COLUMNS),
    )
    data = dataset(rows)
    seen: dict[tuple[str, str], list[float]] = {}
    try:
        for round_no in range(rounds + 1):
            for t in (floor, row):
                metadata.drop_all(engine)
                metadata.create_all(engine)
                with engine.begin() as conn:
                    conn.execute(keys.table.delete().where(keys.table.c.owner_table == row.name))
                keys.rows.cache.clear()
                spent.clear()
                params = [dict(zip(COLUMNS, r)) for r in data]
                gc.collect()
                start = time.perf_counter()
                with engine.begin() as conn:
                    conn.execute(insert(t), params)
                inserted = time.perf_counter() - start
                keys.clear_cache()
                gc.collect()
                start = time.perf_counter()
                with engine.connect() as conn:
                    conn.execute(select(t.c.email, t.c.ssn, t.c.notes)).all()
                cold = time.perf_counter() - start
                if round_no:  # the first round warms up
                    for label, seconds in {"insert": inserted, "cold select": cold, **spent}.items():
                        seen.setdefault((t.name, label), []).append(seconds)
        print(f"{engine.dialect.name}, {rows:,} rows, median of {rounds} rounds, wall us per row")
        for (name, label), values in seen.items():
            print(f"{name:18s} {label:52s} {1e6 * statistics.median(values) / rows:8.2f}")
    finally:
        metadata.drop_all(engine)
        keys.table.drop(engine)
        engine.dispose()
        _restore(originals)


if __name__ == "__main__":
    main(sys.argv[1], *(int(a) for a in sys.argv[2:4]))
