"""``python -m benchmarks``."""

from __future__ import annotations

from . import main

__all__: list[str] = []

raise SystemExit(main())
