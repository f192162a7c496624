"""Markdown cells and tables shared by every report module."""

from __future__ import annotations

__all__ = ["ratio", "seconds", "table"]


def table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"
