"""README.md and docs/api.md list exactly the commands the CLI has, with options it has.

The commands are read from the argparse parser itself (sub-commands and
their sub-commands), and each page's "Command line" section is read for
its `sa-envelope ...` spans: the two sets must be equal, and every
``--option`` a span shows must be an option of that command.
"""

from __future__ import annotations

import argparse
import re

import pytest

from sa_envelope.cli import build_parser
from support import DOCS

PAGES = (DOCS.parent / "README.md", DOCS / "api.md")


def _subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def parser_commands() -> dict[str, set[str]]:
    """Every command ("keys list", "rewrap", "--version") -> its option strings."""
    root = build_parser()
    out: dict[str, set[str]] = {"--version": set()}
    for name, sub in _subcommands(root).items():
        nested = _subcommands(sub)
        for full, command in ({f"{name} {n}": p for n, p in nested.items()} if nested else {name: sub}).items():
            out[full] = {o for a in command._actions for o in a.option_strings}
    return out


def documented(page: str) -> dict[str, set[str]]:
    section = page.split("## Command line", 1)[1].split("\n## ", 1)[0]
    out: dict[str, set[str]] = {}
    for span in re.findall(r"`sa-envelope ([^`]*)`", section):
        words = span.split()
        name = " ".join(words[:2] if words[0] == "keys" else words[:1])  # "keys list", "rewrap", "--version"
        out.setdefault(name, set()).update(re.findall(r"--[a-z][a-z-]*", span))
    return out


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_the_page_lists_exactly_the_commands_that_exist(page: object) -> None:
    listed = documented(page.read_text(encoding="utf-8"))  # type: ignore[attr-defined]
    actual = parser_commands()
    assert sorted(listed) == sorted(actual)
    for name, options in listed.items():
        if name != "--version":
            assert options <= actual[name], f"{name}: no such option {sorted(options - actual[name])}"


def test_the_parser_is_read_whole() -> None:
    commands = parser_commands()
    assert {"keys list", "keys sweep", "verify", "export", "--version"} <= set(commands)
    assert "--pk" in commands["export"] and "--json" in commands["keys list"]
