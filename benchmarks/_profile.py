"""Where the time goes: pyinstrument around one step, as text."""

from __future__ import annotations

import gc
from typing import Any, Callable, Sequence

__all__ = ["profile_steps", "profile_text"]


def profile_text(fn: Callable[[], object], title: str) -> str:
    """Run ``fn`` once under pyinstrument; the call tree, or why there is none."""
    try:
        from pyinstrument import Profiler
    except ImportError:
        return f"{title}: pyinstrument is not installed (pip install -e '.[bench]')\n"
    profiler = Profiler(interval=0.0005)
    gc.collect()
    gc.freeze()  # as in the timed rounds: old objects are not this step's garbage
    profiler.start()
    try:
        fn()
    finally:
        profiler.stop()
        gc.unfreeze()
    return f"== {title}\n" + profiler.output_text(unicode=False, color=False, show_all=False)


def profile_steps(tables: Sequence[Any], name: str, label: str) -> str:
    """Insert then select of the table whose variant is ``name``, profiled
    (``tables`` are a section's OrmTable or CoreTable objects)."""
    chosen = [t for t in tables if t.variant.name == name]
    if not chosen:
        return f"--profile {name!r}: no such available variant\n"
    table = chosen[0]
    table.recreate()
    text = profile_text(table.insert, f"{name} insert {label}")
    return text + profile_text(table.select, f"{name} select {label}")
