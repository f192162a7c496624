"""The CLI's pieces that need no database: the progress bar."""

from __future__ import annotations

from typing import Any


def test_progress_bar_only_when_asked_or_on_a_terminal(capsys: Any) -> None:
    from sa_envelope.jobs.progress import NullBar, progress_bar

    assert isinstance(progress_bar(10, "rewrap keys"), NullBar)  # pytest's stderr is no terminal
    with progress_bar(10, "rewrap keys", enabled=True) as bar:
        bar.update(10)
    assert "10/10" in capsys.readouterr().err
