"""Where a job's time goes: CPU of our processes and of the database server.

Samples ``/proc`` every ``interval`` seconds while a command runs: the
utime + stime of the command and of every process under it (the worker
processes), of every process of the database server (``postgres`` backends
come and go with connections; the last sample of each is kept), and the
machine's busy time from ``/proc/stat`` (so what other runs on the machine
took is the rest). Beside it, what the server was doing: on PostgreSQL the
``wait_event`` of the benchmark database's active backends (sampled), on
MariaDB the InnoDB row-lock counters and the thread states of the
processlist. Linux only; a benchmark aid, not part of the package.
"""

from __future__ import annotations

import os
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

__all__ = ["CpuSampler"]

TICK = os.sysconf("SC_CLK_TCK")


def _stat(pid: int | str) -> tuple[str, int, float] | None:
    """(comm, parent pid, utime + stime in seconds) of a process (or of the
    task at the path ``pid``, e.g. ``3785/task/3804``), or None if gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    comm = text[text.index("(") + 1 : text.rindex(")")]
    fields = text[text.rindex(")") + 2 :].split()
    return comm, int(fields[1]), (int(fields[11]) + int(fields[12])) / TICK


def _machine() -> tuple[float, float]:
    """(busy, total) CPU seconds of the machine since boot."""
    values = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = values[3] + values[4]
    return (sum(values[:8]) - idle) / TICK, sum(values[:8]) / TICK


class CpuSampler:
    """Start with :meth:`start` (the command's pid), stop with :meth:`stop` -> figures."""

    def __init__(self, server: str, interval: float = 0.05, probe: Any = None) -> None:
        # probe(): (Counter of connection states, /proc paths of the benchmark database's
        # backends: PostgreSQL processes, MariaDB threads), or None
        self.server, self.interval, self.probe = server, interval, probe
        self.backends: dict[str, float] = {}
        self.backend_base: dict[str, float] = {}
        self.ours: dict[int, tuple[int, float]] = {}  # pid -> (parent, cpu seconds)
        self.db: dict[int, float] = {}
        self.db_base: dict[int, float] = {}
        self.states: Counter[str] = Counter()
        self.samples = 0
        self._stop = threading.Event()

    def _server_pids(self) -> dict[int, float]:
        found = {}
        for entry in os.scandir("/proc"):
            if entry.name.isdigit():
                st = _stat(int(entry.name))
                if st is not None and st[0].startswith(self.server):
                    found[int(entry.name)] = st[2]
        return found

    def _tasks(self) -> set[str]:
        """Thread ids of the server's processes now (MariaDB's connections are threads)."""
        out = set()
        for pid in self.db_base:
            try:
                out |= {t.name for t in os.scandir(f"/proc/{pid}/task")}
            except OSError:
                continue
        return out

    def _descendants(self, root: int) -> list[int]:
        out, todo = [], [root]
        while todo:
            pid = todo.pop()
            out.append(pid)
            try:
                for task in os.scandir(f"/proc/{pid}/task"):
                    todo += [int(c) for c in Path(task.path, "children").read_text().split()]
            except OSError:
                continue
        return out

    def _sample(self, root: int) -> None:
        for pid in self._descendants(root):
            st = _stat(pid)
            if st is not None:
                self.ours[pid] = (st[1], st[2])
        self.db.update(self._server_pids())
        if self.probe is not None:
            states, paths = self.probe()
            self.states.update(states)
            for path in paths:
                st = _stat(path)
                if st is not None:
                    self.backend_base.setdefault(path, st[2])  # a connection already open at its first sample
                    self.backends[path] = st[2]
        self.samples += 1

    def start(self, root: int) -> None:
        self.root, self.t0, self.m0 = root, time.perf_counter(), _machine()
        self.db_base = self._server_pids()
        self.db = dict(self.db_base)
        self._old = {str(p) for p in self.db_base} | self._tasks()
        self.thread = threading.Thread(target=self._loop, daemon=True)
        self.thread.start()

    def _loop(self) -> None:
        while not self._stop.is_set():
            self._sample(self.root)
            self._stop.wait(self.interval)

    def stop(self) -> dict[str, Any]:
        self._stop.set()
        self.thread.join()
        wall = time.perf_counter() - self.t0
        m1 = _machine()
        busy, total = m1[0] - self.m0[0], m1[1] - self.m0[1]
        ours = {pid: cpu for pid, (_, cpu) in self.ours.items()}
        parent = ours.pop(self.root, 0.0)
        workers = sorted((round(v, 2) for v in ours.values()), reverse=True)
        db = sum(v - self.db_base.get(pid, 0.0) for pid, v in self.db.items())
        # a backend first seen mid-run started in it: count it from 0 unless it existed at the start
        conn = sum(v - (self.backend_base[p] if p.split("/")[-1] in self._old else 0.0) for p, v in self.backends.items())
        mine = parent + sum(workers)
        return {
            "wall_s": round(wall, 3),
            "machine_busy_s": round(busy, 2),
            "machine_capacity_s": round(total, 2),  # cores x wall, as /proc/stat counts it
            "command_cpu_s": round(parent, 2),
            "worker_cpu_s": workers,
            "db_backends_cpu_s": round(conn, 2),  # the connections to the benchmark database
            "db_server_total_cpu_s": round(db, 2),  # every client's, and the server's own threads
            "other_cpu_s": round(max(0.0, busy - mine - db), 2),
            "states": dict(self.states.most_common(8)),
            "samples": self.samples,
        }
