"""Keeps the benchmark harness from rotting: one run at a trivial size, SQLite only.

No timing is asserted (the numbers at this size mean nothing); what is
checked is that every section runs, every registered variant is either
measured or reported "n/a" with its reason, and the results are written.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from sqlalchemy import String

from benchmarks import main
from sa_envelope.envelope.format import GCM_OVERHEAD
from benchmarks._variants import VARIANTS, Variant

TRIVIAL = [
    "--backend", "sqlite", "--rows", "20", "--rounds", "2", "--lookup-rows", "50", "--lookups", "5",
    "--rewrap-sizes", "10,20", "--job-rows", "20", "--micro-values", "50", "--stream-rows", "100",
]


def test_harness_runs_every_section_at_a_trivial_size(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = Variant("missing feature", "sa-envelope", lambda length, keys: String(length),
                      probe=lambda: "not built yet")
    monkeypatch.setitem(VARIANTS, missing.name, missing)

    assert main([*TRIVIAL, "--output", str(tmp_path)]) == 0

    [path] = tmp_path.glob("*.json")
    results = json.loads(path.read_text())
    orm = results["backends"]["sqlite"]["orm"]
    for name in VARIANTS:
        assert name in orm["variants"] or results["unavailable"][name], name
    assert results["unavailable"]["missing feature"] == "not built yet"
    for name in orm["variants"]:
        assert [len(orm["timings"]["seconds"][name][step]) for step in ("insert", "select")] == [2, 2]
    # The envelope's documented overhead: header + nonce + tag.
    assert orm["variants"]["sa-envelope table"]["stored_overhead"]["mean"] == pytest.approx(GCM_OVERHEAD)
    assert orm["variants"]["plaintext"]["stored_overhead"]["mean"] == 0
    kms = results["backends"]["sqlite"]["kms"]["variants"]["sa-envelope table"]["no_latency"]
    assert 1 <= sum(kms["insert_calls"].values()) <= 2 and 1 <= sum(kms["select_calls"].values()) <= 2
    assert results["backends"]["sqlite"]["lookup"]["rows"] == 50
    assert {"rewrap", "reencrypt", "encrypt_column"} <= set(results["backends"]["sqlite"]["jobs"])
    assert "sa-envelope table" in results["micro"]["us_per_value"]
    assert {t["status"] for t in results["targets"]["targets"]} <= {"met", "missed", "n/a"}

    printed = capsys.readouterr().out
    assert "| missing feature | n/a (not available: not built yet) |" in printed
    assert "### Targets, judged on sqlite" in printed
    assert path.with_suffix(".md").read_text().strip() == printed.strip()
