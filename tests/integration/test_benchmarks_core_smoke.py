"""Keeps the Core, async and streaming benchmark sections from rotting.

One run at a trivial size on SQLite (aiosqlite for the async part, a real
subprocess for the streaming reader, moto over HTTP for KMS). No timing is
asserted: what is checked is that every step ran for every variant, that
lookups ran exactly where equality is possible, that a cold read made its one
KMS call, that the fresh reader process read every row, and that the issue 15
targets were judged.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks import main
from benchmarks._variants import VARIANTS

ROWS, STREAM_ROWS, ROUNDS = 30, 250, 2
TRIVIAL = [
    "--backend",
    "sqlite",
    "--sections",
    "core,async,stream,micro",
    "--rows",
    str(ROWS),
    "--rounds",
    str(ROUNDS),
    "--stream-rows",
    str(STREAM_ROWS),
    "--micro-values",
    "40",
]


def test_core_async_and_stream_sections_run_at_a_trivial_size(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main([*TRIVIAL, "--output", str(tmp_path)]) == 0

    [path] = tmp_path.glob("*.json")
    results = json.loads(path.read_text())
    sqlite = results["backends"]["sqlite"]
    core = sqlite["core"]
    assert set(core["variants"]) | set(results["unavailable"]) == set(VARIANTS)
    seconds = core["timings"]["seconds"]
    for name, info in core["variants"].items():
        steps = {"insert", "select", "select_cold"} | (set() if VARIANTS[name].no_equality else {"lookup"})
        assert set(seconds[name]) == steps, name
        assert all(len(seconds[name][step]) == ROUNDS for step in steps), name
        assert ("lookup_unavailable" in info) == bool(VARIANTS[name].no_equality), name
    assert {n for n, info in core["variants"].items() if "lookup_unavailable" not in info} == {
        "plaintext",
        "sa-envelope deterministic",
    }
    assert core["lookup_values"] == ROWS  # 1,000 values, capped at the table's size
    # An emptied cache costs one KMS call per cold select (warm-up round included).
    for name in ("sa-envelope table", "sa-envelope row", "sa-envelope deterministic"):
        assert core["variants"][name]["cold_select_kms_calls"] == [1] * (ROUNDS + 1), name

    assert sqlite["async"]["driver"] == "sqlite+aiosqlite"
    assert len(sqlite["async"]["timings"]["seconds"]["sa-envelope table"]["select"]) == ROUNDS

    for scope, read in sqlite["stream"]["scopes"].items():
        assert read["rows_read"] == STREAM_ROWS, scope
        assert read["kms_calls"] == 1, scope
    assert sqlite["stream"]["row_vs_table"] > 0
    assert set(results["micro"]["us_per_value"]) >= {"floor", "sa-envelope table", "sa-envelope row"}

    judged = results["core_targets"]
    assert {t["status"] for t in judged} <= {"met", "missed", "n/a"}
    assert any(t["backend"] == "sqlite" and "cold select" in t["target"] and t["status"] != "n/a" for t in judged)
    printed = capsys.readouterr().out
    assert "### Core insert, select and lookup: sqlite" in printed
    assert "### Core targets (issue 15), every backend" in printed
    assert "| pydantic-encryption AWS KMS | n/a (not available: its AWS mode makes one KMS" in printed


def test_per_value_profile_runs_at_a_trivial_size(capsys: pytest.CaptureFixture[str]) -> None:
    from benchmarks import profile_values

    assert profile_values.main(["--values", "30", "--top", "5", "--pieces"]) == 0

    printed = capsys.readouterr().out
    for name in ("floor", "table", "deterministic", "row"):
        for step in ("encrypt", "decrypt", "core select"):
            assert f"== {name}: {step}, 30 values, unprofiled " in printed, (name, step)
    for name in ("table", "deterministic", "row"):
        # the pieces reach into the column type's internals: either they ran or they say why not
        assert f"== {name}: each piece alone" in printed or f"== {name}: pieces n/a (internals changed" in printed


def test_row_costs_run_at_a_trivial_size(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from benchmarks import row_costs
    from sa_envelope.rows import core

    before = core.plan_for
    row_costs.main(f"sqlite:///{tmp_path / 'costs.db'}", rows=20, rounds=1)

    printed = capsys.readouterr().out
    for _, _, label in row_costs.STEPS:
        assert f"bench_costs_row    {label}" in printed, label
    assert core.plan_for is before  # the timing wrappers are gone again
