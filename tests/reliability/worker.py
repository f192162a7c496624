"""The subprocess side of crash and concurrency tests: ``python -m reliability.worker``.

Commands::

    scenario NAME POINT OCCURRENCE  run a crash scenario's job, os._exit at the point
    job NAME                        run a scenario's job, printing "point P" at each
                                    fault point and waiting there for "go" on stdin
                                    (the parent kills it at the point it chose)
    bulk START STOP BATCH           insert rows [START, STOP) committing every BATCH,
                                    printing "committed N" after each commit
    race WORKER ROWS THREADS        wait for "go" on stdin, then THREADS threads
                                    write ROWS rows each and read the table back

Every command takes ``--url`` and ``--keyfile`` first.
"""

from __future__ import annotations

import argparse
import sys
import threading

from sqlalchemy import create_engine

from sa_envelope import faults

from .crash import SCENARIOS, CrashContext, exit_at
from .rows import check_rows, insert_rows

__all__ = ["main"]

NOT_REACHED = 3


def _scenario(ctx: CrashContext, name: str, point: str, occurrence: int) -> int:
    from . import scenarios  # noqa: F401 - registers them

    with exit_at(point, occurrence) as seen:
        SCENARIOS[name].run(ctx)
    print(f"point {point} #{occurrence} not reached; passed {seen}", file=sys.stderr)
    return NOT_REACHED


def _job(ctx: CrashContext, name: str) -> int:
    from . import scenarios  # noqa: F401 - registers them

    def pause(point: str) -> None:  # so the parent's SIGKILL lands at this very point
        print(f"point {point}", flush=True)
        sys.stdin.readline()

    with faults.inject(pause):
        SCENARIOS[name].run(ctx)
    print("done", flush=True)
    return 0


def _bulk(ctx: CrashContext, start: int, stop: int, batch: int) -> int:
    s = ctx.schema()
    for first in range(start, stop, batch):
        last = min(first + batch, stop)
        insert_rows(s, "patients", range(first, last))
        print(f"committed {last}", flush=True)
    return 0


def _race(ctx: CrashContext, worker: int, rows: int, threads: int) -> int:
    """Cold cache, every thread's first write at once: the first-key race."""
    s = ctx.schema()
    print("ready", flush=True)
    sys.stdin.readline()  # "go"
    errors: list[BaseException] = []

    def write(t: int) -> None:
        try:
            base = (worker * threads + t) * rows
            insert_rows(s, "patients", range(base, base + rows))
            # the checking KeyManager on an engine of its own: registering an
            # engine's event listeners while other threads run statements on
            # it races inside SQLAlchemy ("deque mutated during iteration")
            reader = create_engine(ctx.url)
            try:
                check_rows(reader, ctx.provider, "patients")
            finally:
                reader.dispose()
        except BaseException as exc:  # reported to the parent below
            errors.append(exc)

    pool = [threading.Thread(target=write, args=(t,)) for t in range(threads)]
    for thread in pool:
        thread.start()
    for thread in pool:
        thread.join()
    for exc in errors:
        print(f"{type(exc).__name__}: {exc}", file=sys.stderr)
    return 1 if errors else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="reliability.worker")
    parser.add_argument("--url", required=True)
    parser.add_argument("--keyfile", required=True)
    parser.add_argument("command", choices=("scenario", "job", "bulk", "race"))
    parser.add_argument("args", nargs="*")
    ns = parser.parse_args(argv)
    ctx = CrashContext(ns.url, ns.keyfile)
    try:
        if ns.command == "scenario":
            name, point, occurrence = ns.args
            return _scenario(ctx, name, point, int(occurrence))
        if ns.command == "job":
            return _job(ctx, *ns.args)
        ints = [int(a) for a in ns.args]
        return _bulk(ctx, *ints) if ns.command == "bulk" else _race(ctx, *ints)
    finally:
        ctx.dispose()


if __name__ == "__main__":
    sys.exit(main())
