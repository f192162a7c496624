"""The one batched-job runner: small transactions, progress, resume.

Every data-moving job (rewrap, re-encryption, column encryption) is a loop
of batches, each one transaction: pick up to N items that still need the
work (so a rerun after a crash finds exactly what is left: that is the
resume), do it, commit. The runner owns the loop, the transaction, the
progress bar and the fault points around each commit; a job supplies
``batch(conn) -> int``, which does one batch on ``conn`` inside the open
transaction and returns how many items it handled (0: nothing left).
"""

from __future__ import annotations

from typing import Any, Callable

from sqlalchemy import Connection, Engine

from ..faults import batch_points, fault_point
from .progress import progress_bar
from .throttle import Throttle

__all__ = ["run_batches"]


def run_batches(
    engine: Engine,
    job: str,
    batch: Callable[[Connection], int],
    *,
    total: int | None,
    desc: str,
    progress: bool | None = None,
    connect: Callable[[Engine], Connection] | None = None,
    bar: Any = None,
    throttle: Throttle | None = None,
    max_batches: int | None = None,
) -> int:
    """Run ``batch`` in one transaction after another until it returns 0.

    ``job`` names the fault points (``<job>.batch.before_commit`` and
    ``.after_commit``); ``connect`` makes each batch's connection (default
    ``engine.connect``). ``bar``: a progress bar shared by several workers
    (else one is made from ``total``, ``desc`` and ``progress``);
    ``throttle`` paces the items; ``max_batches`` stops after that many
    batches (the job resumes on its next run). Returns the number of items handled.
    """
    if bar is None:
        with progress_bar(total, desc, progress) as own:
            return run_batches(
                engine, job, batch, total=total, desc=desc, connect=connect, bar=own,
                throttle=throttle, max_batches=max_batches,
            )  # fmt: skip
    before_commit, after_commit = batch_points(job)
    done = batches = 0
    while max_batches is None or batches < max_batches:
        with (connect or Engine.connect)(engine) as conn, conn.begin():
            handled = batch(conn)
            if handled:
                fault_point(before_commit)
        if not handled:
            break
        fault_point(after_commit)
        done += handled
        batches += 1
        bar.update(handled)
        if throttle is not None:
            throttle.wait(handled)
    return done
