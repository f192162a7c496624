"""Workers of one job as separate processes, coordinated by the database.

Threads of one process share the GIL: the Python share of each batch
(opening, sealing, building parameters) runs on one core whatever the
number of workers, which held two workers to 1.1-1.3x one. A command that
can rebuild its job from plain arguments (the CLI: a database URL, a CMK
spec, names) runs ``workers=N`` as N processes instead, each with its own
engine, KeyManager and provider. They share nothing but the database, which
decides who does which rows (claimed ranges in ``sa_envelope_claims``,
``FOR UPDATE SKIP LOCKED``, or a primary-key partition given to each
worker), exactly as processes started by hand on several hosts would.

The parent only starts them, draws one progress bar from what they report,
and waits. Each child has a pipe of its own (a dead child can corrupt no
one else's channel) over which it sends ``("progress", n)`` after each
batch and, at the end, its result or its error as one line. Then:

* a child that fails or dies (a signal, an exit without a result) makes
  the job fail with :class:`~sa_envelope.errors.WorkerFailedError`, one
  line naming it; the others are interrupted (SIGINT: they roll back their
  batch in flight and free their claims) so the command ends at once, and a
  rerun resumes from what was committed;
* Ctrl-C in the parent interrupts every child the same way, waits for them,
  and re-raises ``KeyboardInterrupt``.

How children start (:func:`start_method`): on Linux, from a parent with one
thread (the CLI), they are *forked*. A spawned child is a fresh interpreter
that imports the library, SQLAlchemy and boto3 again before its first row:
0.9-1.3 s of wall time and 0.5-0.65 s of CPU each, measured
(benchmarks/README.md), which held two workers to 1.37x one on a 300,000-row
job (median) although their rows ran at 1.9-2x. A forked child starts with
all of that loaded. It inherits the parent's memory, and so its pooled
database connections: it never uses them (it makes its own engine from the
URL), never finalizes them (the parent's objects are frozen out of the
garbage collector around the fork, :func:`gc.freeze`) and never runs the
interpreter's teardown (multiprocessing ends a forked child with
``os._exit``). Forking a process with other threads can copy a lock another
thread holds, so with more than one thread, or on another system (macOS
forbids forking its frameworks), children are spawned as before. Either way
``target`` must be a module-level function, its arguments picklable. POSIX
signals are used to stop children.
"""

from __future__ import annotations

import gc
import logging
import multiprocessing
from multiprocessing import resource_tracker
import os
import signal
import threading
import sys
from multiprocessing.connection import Connection, wait
from typing import Any, Callable

from ..errors import WorkerFailedError

__all__ = ["ChildBar", "run_processes", "start_method"]

STOP_TIMEOUT = 30.0  # seconds an interrupted child has to roll back before it is killed


class ChildBar:
    """The bar a child updates: each update goes to the parent's bar."""

    def __init__(self, pipe: Connection) -> None:
        self.pipe = pipe

    def update(self, n: int = 1) -> None:
        if n:
            self.pipe.send(("progress", int(n)))


def _interrupted(signum: int, frame: Any) -> None:
    """SIGINT in a child: stop quietly, once. A Ctrl-C reaches the child from
    the terminal and again from the parent's stop: the second would cut
    short the driver's cancel of the query the first interrupted (psycopg
    warns of it), so further ones are ignored; a child that then hangs is
    killed (:func:`_stop`). The pool's rollback of a query the interrupt
    cut short fails and would log a traceback: expected here, as psycopg's
    warning is if a second SIGINT still lands first."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    for name in ("sqlalchemy.pool", "psycopg"):
        logging.getLogger(name).addHandler(logging.NullHandler())
    raise KeyboardInterrupt


def _child(target: Callable[..., Any], args: tuple[Any, ...], index: int, count: int, pipe: Connection) -> None:
    """A child's whole life: run the target, send its result or one line of error.

    The child starts with SIGINT blocked (:func:`_start`); a Ctrl-C that came
    while it imported is pending, and arrives as ``KeyboardInterrupt`` here,
    once the handler is in place, where it stops the child quietly."""
    try:
        signal.signal(signal.SIGINT, _interrupted)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
        pipe.send(("ready", None))  # from now on a SIGINT stops this child cleanly
        result = target(*args, index=index, count=count, bar=ChildBar(pipe))
    except KeyboardInterrupt:
        sys.exit(130)  # stopped by the parent or the terminal: it says so itself
    except BaseException as exc:  # one line to the parent, which fails the job with it
        first = str(exc).splitlines()[0] if str(exc) else ""
        pipe.send(("error", f"{type(exc).__name__}: {first}" if not _ours(exc) else first))
        sys.exit(1)
    pipe.send(("result", result))
    pipe.close()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # done and disposed of: the interpreter's teardown would only delay the parent


def _ours(exc: BaseException) -> bool:
    return type(exc).__module__.startswith("sa_envelope")


def start_method() -> str:
    """``"fork"`` on Linux in a process with one thread, else ``"spawn"`` (module doc)."""
    if sys.platform.startswith("linux") and threading.active_count() == 1 and _os_threads() == 1:
        return "fork"
    return "spawn"


def _os_threads() -> int:
    """The threads the kernel counts in this process: also those a C library
    started, which :mod:`threading` does not know of."""
    try:
        with open("/proc/self/status", encoding="ascii", errors="replace") as status:
            return next(int(line.split()[1]) for line in status if line.startswith("Threads:"))
    except (OSError, StopIteration, ValueError, IndexError):
        return 0  # unknown: not forked


def run_processes(target: Callable[..., Any], args: tuple[Any, ...], count: int, bar: Any) -> list[Any]:
    """Run ``target(*args, index=i, count=count, bar=...)`` in ``count``
    processes; return their results in worker order (see module doc)."""
    if count < 1:
        raise ValueError("workers must be at least 1")
    ctx = multiprocessing.get_context(start_method())
    children: list[Any] = []
    pipes: list[Connection] = []
    ready: set[int] = set()
    try:
        _start_all(ctx, children, pipes, target, args, count)
        return _collect(children, pipes, bar, ready)
    except BaseException:
        _stop(children, pipes, ready)
        raise


def _start_all(
    ctx: Any,
    children: list[Any],
    pipes: list[Connection],
    target: Callable[..., Any],
    args: tuple[Any, ...],
    count: int,
) -> None:
    """Start the children one by one, each with a pipe of its own; the parent's
    objects stay frozen out of the garbage collector meanwhile (module doc)."""
    spawned = ctx.get_start_method() == "spawn"
    gc.freeze()
    try:
        for i in range(count):
            reader, writer = ctx.Pipe(duplex=False)
            proc = ctx.Process(target=_child, args=(target, args, i, count, writer), name=f"sa-envelope-worker-{i}")
            children.append(proc)  # before it starts: a Ctrl-C raised as it starts must stop it too
            pipes.append(reader)
            try:
                _start(proc, spawned=spawned)
            finally:
                writer.close()  # the child's end: EOF here once the child is gone
    finally:
        gc.unfreeze()


def _start(proc: Any, *, spawned: bool) -> None:
    """Start a child with SIGINT *blocked* until :func:`_child` has its
    handler (a Ctrl-C while it still imports or unpickles would print a
    traceback), and lose no Ctrl-C meant for the parent meanwhile.

    A signal mask is per thread, inherited by a forked child, and by a
    spawned interpreter across its exec; a pending SIGINT waits in the
    child until it unblocks it. The parent blocks SIGINT in this thread
    while it starts the child, with a handler that only records it
    (delivered there if another thread takes it, or here when unblocked),
    and raises ``KeyboardInterrupt`` once the child is started, so the
    usual stop runs (:func:`_stop`). Not SIG_IGN:
    a disposition is the whole process's, and a Ctrl-C arriving while it is
    set would be dropped. A spawning parent starts its resource tracker
    first: starting it unblocks SIGINT (multiprocessing.resource_tracker),
    which would reopen the window; a forking one needs none. A child
    stopped before it said it is ready is killed.
    """
    if threading.current_thread() is not threading.main_thread():
        proc.start()
        return
    if spawned:
        resource_tracker.ensure_running()
    seen: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: seen.append(signum))
    try:
        held = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
        try:
            proc.start()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, held)  # a held SIGINT is delivered (recorded) here
    finally:
        signal.signal(signal.SIGINT, previous)
    if seen:
        raise KeyboardInterrupt


def _collect(children: list[Any], pipes: list[Connection], bar: Any, ready: set[int]) -> list[Any]:
    """Read every child's messages until all have ended; fail on the first failure."""
    results: dict[int, Any] = {}
    open_pipes = dict(enumerate(pipes))
    while open_pipes:
        for waiting in wait(list(open_pipes.values())):
            i = pipes.index(waiting)  # type: ignore[arg-type]
            try:
                kind, payload = pipes[i].recv()
            except (EOFError, OSError):  # the child is gone (or died mid-message)
                del open_pipes[i]
                children[i].join()
                if i not in results:
                    raise WorkerFailedError(_died(children[i], i, len(children))) from None
                continue
            if kind == "ready":
                ready.add(i)
            elif kind == "progress":
                bar.update(payload)
            elif kind == "result":
                results[i] = payload
            else:
                raise WorkerFailedError(f"worker {i + 1} of {len(children)} (pid {children[i].pid}) failed: {payload}")
    for proc in children:
        proc.join()
    return [results[i] for i in range(len(children))]


def _died(proc: Any, i: int, count: int) -> str:
    code = proc.exitcode
    how = f"was killed by signal {-code}" if code is not None and code < 0 else f"exited with status {code}"
    return f"worker {i + 1} of {count} (pid {proc.pid}) {how} before it finished"


def _stop(children: list[Any], pipes: list[Connection], ready: set[int]) -> None:
    """Interrupt every child still running, wait for it, kill it if it hangs;
    a child that has not said it is ready (still importing, SIGINT blocked)
    is killed at once: it has touched no row."""
    _note_ready(pipes, ready)
    children = [proc for proc in children if proc.pid is not None]  # one never started (the last): nothing to stop
    for i, proc in enumerate(children):
        if proc.is_alive():
            try:
                os.kill(proc.pid, signal.SIGINT if i in ready else signal.SIGKILL)
            except OSError:  # ended meanwhile
                pass
    for proc in children:
        proc.join(STOP_TIMEOUT)
        if proc.is_alive():
            proc.kill()
            proc.join()


def _note_ready(pipes: list[Connection], ready: set[int]) -> None:
    """Read the "ready" messages still waiting in the pipes (the rest no longer matters)."""
    for i, pipe in enumerate(pipes):
        try:
            while pipe.poll():
                if pipe.recv()[0] == "ready":
                    ready.add(i)
        except (EOFError, OSError):
            continue
