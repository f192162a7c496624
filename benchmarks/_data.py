"""The rows every variant stores: same values, same order, every run."""

from __future__ import annotations

import random

__all__ = ["NOTES_LENGTH", "dataset", "ssn"]

NOTES_LENGTH = 200
_WORDS = (
    "patient reports mild headache since monday no fever prescribed rest fluids "
    "follow up in two weeks allergy penicillin blood pressure normal referred to "
    "cardiology history of asthma vaccinated declined imaging scheduled review"
).split()


def ssn(i: int) -> str:
    """A distinct SSN-shaped string per ``i`` (a bijection on 0..10**9-1)."""
    digits = f"{(i * 7919 + 12345) % 10**9:09d}"
    return f"{digits[:3]}-{digits[3:5]}-{digits[5:]}"


def _notes(rng: random.Random) -> str:
    words: list[str] = []
    length = 0
    while length < NOTES_LENGTH:
        words.append(rng.choice(_WORDS))
        length += len(words[-1]) + 1
    return " ".join(words)[:NOTES_LENGTH]


def dataset(n: int, seed: int = 20_000) -> list[tuple[str, str, str]]:
    """``n`` rows of (email, SSN, ~200-character notes)."""
    rng = random.Random(seed)
    return [(f"user{i:07d}@example.com", ssn(i), _notes(rng)) for i in range(n)]
