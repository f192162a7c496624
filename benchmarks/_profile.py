"""Where the time goes: pyinstrument around one step, as text."""

from __future__ import annotations

import gc
from typing import Callable

__all__ = ["profile_text"]


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
