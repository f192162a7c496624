"""``python worker_start.py URL MODE``: run two workers through jobs/processes.py
from a fresh process and print what they report, as one JSON object.

MODE ``alone``: this process has one thread, as the CLI has (its workers
are forked); ``threaded``: another thread is alive meanwhile (they are
spawned). Each worker reports its start method, its pid and whether it
found the CLI's modules already loaded. The database session of this
process's pooled connection is read before and after (workers that return,
then workers that fail), to show that no child closed it.
"""

from __future__ import annotations

import gc
import json
import multiprocessing
import os
import sys
import threading
from typing import Any

from sqlalchemy import create_engine, text

import sa_envelope.cli.workers  # noqa: F401  (what the CLI has loaded when it starts them)
from sa_envelope.errors import WorkerFailedError
from sa_envelope.jobs.processes import run_processes, start_method
from sa_envelope.jobs.progress import NullBar

SESSION = {"postgresql": "SELECT pg_backend_pid()", "mysql": "SELECT CONNECTION_ID()"}


def report(*, index: int, count: int, bar: Any) -> dict[str, Any]:
    """A worker that says how it was started and what it found loaded."""
    gc.collect()  # whatever the child's collector could finalize, it does now
    loaded = "sa_envelope.cli.workers" in sys.modules
    return {"index": index, "method": multiprocessing.get_start_method(), "pid": os.getpid(), "loaded": loaded}


def fail(*, index: int, count: int, bar: Any) -> None:
    gc.collect()
    raise RuntimeError(f"worker {index} gives up")


def main(url: str, mode: str) -> None:
    engine = create_engine(url)

    def session() -> int:
        with engine.connect() as conn:  # the pool's one connection, checked in again after
            return int(conn.execute(text(SESSION[engine.dialect.name])).scalar_one())

    stop = threading.Event()
    other = threading.Thread(target=stop.wait, name="an application thread")
    if mode == "threaded":
        other.start()
    try:
        out: dict[str, Any] = {"session_before": session(), "method": start_method(), "pid": os.getpid()}
        out["results"] = run_processes(report, (), 2, NullBar())
        try:
            run_processes(fail, (), 2, NullBar())
        except WorkerFailedError as exc:
            out["failure"] = str(exc)
        out["session_after"] = session()
    finally:
        stop.set()
        if other.is_alive():
            other.join()
    print(json.dumps(out))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
