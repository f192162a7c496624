"""A progress bar for long jobs: tqdm on a terminal, silence otherwise.

Jobs (rewrap, re-encryption, column encryption) report progress through
:func:`progress_bar`. A bar is drawn only when stderr is a terminal and the
optional ``progress`` extra (tqdm) is installed, so logs and CI stay quiet.
Asked for explicitly (``enabled=True``) without tqdm, it says which extra to
install instead of drawing nothing.
"""

from __future__ import annotations

import sys
from typing import Any

from ..errors import ConfigurationError

__all__ = ["PROGRESS_EXTRA", "NullBar", "progress_bar"]

PROGRESS_EXTRA = "sa-envelope[progress]"


class NullBar:
    """The bar used when none is shown: accepts updates, prints nothing."""

    def update(self, n: int = 1) -> None:
        pass

    def close(self) -> None:
        pass

    def __enter__(self) -> NullBar:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def progress_bar(total: int | None, desc: str, enabled: bool | None = None) -> Any:
    """A tqdm bar when ``enabled`` (default: stderr is a terminal), else a NullBar."""
    explicit = enabled is True
    if enabled is None:
        enabled = sys.stderr.isatty()
    if not enabled:
        return NullBar()
    try:
        from tqdm import tqdm
    except ImportError:  # the optional ``progress`` extra is not installed
        if explicit:
            raise ConfigurationError(f"a progress bar needs tqdm: pip install '{PROGRESS_EXTRA}'") from None
        return NullBar()
    return tqdm(total=total, desc=desc, unit="key" if "key" in desc else "row", file=sys.stderr)
