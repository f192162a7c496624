"""``python -m benchmarks``: parse options, run the sections, write the report."""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import sys
import tempfile
from dataclasses import asdict
from importlib import metadata
from pathlib import Path
from typing import Any

from ._settings import SIZES, Settings, backend_url

__all__ = ["main"]

SECTIONS = ("orm", "core", "async", "stream", "kms", "lookup", "jobs", "micro")
RESULTS = Path(__file__).parent / "results"
PACKAGES = ("sqlalchemy", "cryptography", "boto3", "moto", "sqlalchemy-utils", "sqlalchemy-encrypted-field",
            "sealed-fields", "pydantic-encryption", "psycopg", "pymysql", "aiosqlite", "asyncpg", "pyinstrument")


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(part.replace("_", "")) for part in text.split(",") if part)


def _names(text: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in text.split(",") if part.strip())


def parse(argv: list[str] | None) -> tuple[Settings, list[str] | None]:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description="sa-envelope beside its peers, as ratios measured in one run (see benchmarks/README.md).",
    )
    parser.add_argument("--full", action="store_true", help="the README size (20,000 rows, 100,000 lookups rows, ...)")
    parser.add_argument("--backend", default="sqlite,postgresql,mysql",
                        help="comma-separated: sqlite, postgresql, mysql (URLs from SA_ENVELOPE_TEST_*_URL)")
    parser.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated subset of {SECTIONS}")
    parser.add_argument("--variants", default="", help="comma-separated variant names (default: all registered)")
    parser.add_argument("--rows", type=int, help="rows per ORM insert/select round")
    parser.add_argument("--rounds", type=int, help="timed rounds (at least 5 for reported numbers)")
    parser.add_argument("--lookup-rows", type=int)
    parser.add_argument("--lookups", type=int)
    parser.add_argument("--rewrap-sizes", type=_ints, help="row-key counts, e.g. 1000,100000,1000000")
    parser.add_argument("--job-rows", type=int)
    parser.add_argument("--micro-values", type=int)
    parser.add_argument("--kms-latency-ms", type=float)
    parser.add_argument("--stream-rows", type=int, help="rows of the streaming section (checkpoint at a tenth)")
    parser.add_argument("--output", default=str(RESULTS), help="directory for the JSON and markdown results")
    parser.add_argument("--profile", help="variant name to profile with pyinstrument (insert and select)")
    args = parser.parse_args(argv)
    base = SIZES["full" if args.full else "quick"]
    sections = _names(args.sections)
    if set(sections) - set(SECTIONS):
        parser.error(f"--sections: unknown {sorted(set(sections) - set(SECTIONS))}")
    settings = base.with_(
        rows=args.rows, rounds=args.rounds, lookup_rows=args.lookup_rows, lookups=args.lookups,
        rewrap_sizes=args.rewrap_sizes, job_rows=args.job_rows, micro_values=args.micro_values,
        kms_latency_ms=args.kms_latency_ms, stream_rows=args.stream_rows, backends=_names(args.backend), sections=sections,
        output_dir=args.output, profile=args.profile,
    )
    return settings, list(_names(args.variants)) or None


def _machine() -> dict[str, Any]:
    versions = {}
    for package in PACKAGES:
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    return {
        "when": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "platform": platform.platform(), "processor": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(), "python": platform.python_version(), "versions": versions,
        "loadavg": " ".join(f"{x:.2f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "-",
    }


def _run_backend(env: Any, variants: list[Any], settings: Settings) -> dict[str, Any]:
    from ._async import run_async
    from ._core import run_core
    from ._jobs import run_jobs
    from ._kmscalls import run_kms_calls
    from ._lookup import run_lookup
    from ._orm import run_orm
    from ._stream import run_stream

    env.reset()
    result: dict[str, Any] = {"server": env.server_version()}
    try:
        for section, run in (("orm", lambda: run_orm(env, variants, settings)),
                             ("core", lambda: run_core(env, variants, settings)),
                             ("async", lambda: run_async(env, variants, settings)),
                             ("stream", lambda: run_stream(env, settings)),
                             ("kms", lambda: run_kms_calls(env, variants, settings)),
                             ("lookup", lambda: run_lookup(env, settings)),
                             ("jobs", lambda: run_jobs(env, settings))):
            if section in settings.sections:
                print(f"  {env.name}: {section} ...", file=sys.stderr, flush=True)
                result[section] = run()
    finally:
        env.reset()
    return result


def run(settings: Settings, variant_names: list[str] | None) -> dict[str, Any]:
    from ._backend import BackendEnv
    from ._kms import MotoKms
    from ._micro import run_micro
    from ._targets import evaluate
    from ._targets_core import evaluate_core
    from ._variants import select_variants

    variants = select_variants(variant_names)
    unavailable = {v.name: reason for v in variants if (reason := v.unavailable())}
    available = [v for v in variants if v.name not in unavailable]
    results: dict[str, Any] = {"settings": asdict(settings), "machine": _machine(),
                               "unavailable": unavailable, "backends": {}}
    with tempfile.TemporaryDirectory() as tmp, MotoKms() as kms:
        for name in settings.backends:
            env = BackendEnv(name, backend_url(name, tmp), kms, kms.create_cmk())
            try:
                env.server_version()
            except Exception as exc:
                first = (str(exc).splitlines() or [""])[0][:200]
                results["backends"][name] = {"unavailable": f"server does not answer: {first}"}
                continue
            results["backends"][name] = _run_backend(env, available, settings)
    if "micro" in settings.sections:
        print("  micro ...", file=sys.stderr, flush=True)
        results["micro"] = run_micro(settings)
    results["targets"] = evaluate(results)
    results["core_targets"] = evaluate_core(results)
    return results


def write(results: dict[str, Any], markdown: str, directory: str) -> Path:
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    stem = out / f"{stamp}-{results['settings']['size']}"
    stem.with_suffix(".json").write_text(json.dumps(results, indent=2, default=str) + "\n")
    stem.with_suffix(".md").write_text(markdown + "\n")
    return stem.with_suffix(".json")


def main(argv: list[str] | None = None) -> int:
    from ._report import render

    settings, variant_names = parse(argv)
    if settings.rounds < 5:
        print(f"warning: {settings.rounds} rounds; reported numbers need at least 5", file=sys.stderr)
    results = run(settings, variant_names)
    markdown = render(results)
    path = write(results, markdown, settings.output_dir)
    print(markdown)
    for name, backend in results["backends"].items():
        for section in ("orm", "core"):
            text = (backend.get(section) or {}).get("profile")
            if text:
                print(f"\n#### {section} profile on {name}\n\n```\n{text}```")
    print(f"\nresults: {path}", file=sys.stderr)
    return 0
