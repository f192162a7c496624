"""docs/architecture.md is true to the code: the layers, the modules, the rule homes.

The import graph of ``sa_envelope/`` is read from the sources (every import,
also those inside functions): no import may run from a lower layer to a
higher one, there is no circle, and no module is loaded through importlib.
Every module is named in the architecture page, and each rule the page
gives a home is spelled only there.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "sa_envelope"
DOC = PACKAGE.parent / "docs" / "architecture.md"

# bottom first; a module may import from its own layer or the ones below
LAYERS: tuple[tuple[str, ...], ...] = (
    ("errors", "faults", "redact", "locking"),
    ("envelope", "providers"),
    ("keys",),
    ("columns",),
    ("rows",),
    ("search",),
    ("jobs",),
    ("manager", "wiring"),
    ("cli", "alembic", "__init__", "__main__"),
)
LAYER_OF = {name: i for i, names in enumerate(LAYERS) for name in names}


def _modules() -> dict[str, Path]:
    """Dotted names (``keys.store``) of every module of the package."""
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(PACKAGE).with_suffix("").parts)
        if parts[-1] == "__init__" and len(parts) > 1:
            parts.pop()
        out[".".join(parts)] = path
    return out


def _imports(name: str, path: Path) -> set[str]:
    """Package modules that ``name`` imports (relative and absolute)."""
    package = name.split(".")[:-1] if path.name != "__init__.py" else name.split(".")
    if name == "__init__":
        package = []
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
            elif node.module and node.module.startswith("sa_envelope"):
                base = []
                node_module = node.module.removeprefix("sa_envelope").lstrip(".")
                found.update(_targets(base, node_module, node.names))
                continue
            else:
                continue
            found.update(_targets(base, node.module or "", node.names))
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("sa_envelope."):
                    found.add(alias.name.removeprefix("sa_envelope."))
    return found


def _targets(base: list[str], module: str, names: list[ast.alias]) -> set[str]:
    """``from base.module import a, b``: the modules among a, b, or the module."""
    prefix = [*base, *filter(None, module.split("."))]
    known = _modules()
    subs = {".".join([*prefix, a.name]) for a in names} & set(known)
    return subs or {".".join(prefix) or "__init__"}


def _layer(module: str) -> int:
    return LAYER_OF[module.split(".")[0]]


GRAPH = {name: _imports(name, path) - {name} for name, path in _modules().items()}


@pytest.mark.parametrize("module", sorted(GRAPH))
def test_no_import_runs_up(module: str) -> None:
    upward = sorted(t for t in GRAPH[module] if _layer(t) > _layer(module))
    assert upward == [], f"{module} (layer {_layer(module)}) imports from higher layers: {upward}"


def test_no_import_circle() -> None:
    state: dict[str, int] = {}  # 1 visiting, 2 done

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for target in sorted(GRAPH.get(node, ())):
            if target not in GRAPH:
                continue
            assert state.get(target) != 1, f"import circle: {' -> '.join([*path, node, target])}"
            if target not in state:
                visit(target, [*path, node])
        state[node] = 2

    for module in sorted(GRAPH):
        if module not in state:
            visit(module, [])


def test_no_importlib_loader() -> None:
    loaders = [n for n, p in _modules().items() if re.search(r"import_module|__import__", p.read_text())]
    assert loaders == []


def test_every_module_is_in_the_architecture_page() -> None:
    text = DOC.read_text(encoding="utf-8")
    missing = []
    for name in _modules():
        if name in ("__init__", "__main__"):
            continue
        leaf = name.split(".")[-1]
        package = name.split(".")[0]
        if not re.search(rf"\b{re.escape(leaf)}\b", text) or f"{package}" not in text:
            missing.append(name)
    assert missing == [], f"docs/architecture.md does not name {missing}"


RULE_HOMES = {
    # what is spelled, and the only modules that may spell it
    r"\bHEADER_LEN\b|\bKEY_ID_START\b|_BODY\b|\bNONCE_LEN\b": {"envelope.format", "envelope.ciphers"},
    r"decrypt_siv\(|decrypt_gcm\(": {"envelope.format"},
    r"[\"']sa_envelope:": {"providers.base"},
    r"1 << 6[34]|>> 1\b": set(),
    r"def fault_point|POINTS\s*[:=]": {"faults"},
}


@pytest.mark.parametrize("pattern", sorted(RULE_HOMES))
def test_each_rule_is_spelled_in_its_home_only(pattern: str) -> None:
    spelled = {n for n, p in _modules().items() if re.search(pattern, p.read_text(encoding="utf-8"))}
    assert spelled <= RULE_HOMES[pattern], f"{pattern!r} spelled outside its home: {sorted(spelled - RULE_HOMES[pattern])}"


def test_jobs_never_reach_into_the_manager() -> None:
    """Jobs, rows and columns use the store's public names, never ``._x`` of a manager or store."""
    offenders = []
    for name, path in _modules().items():
        if name.split(".")[0] in ("keys", "manager"):
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if (
                isinstance(node, ast.Attribute)
                and node.attr.startswith("_")
                and not node.attr.startswith("__")
                and isinstance(node.value, (ast.Name, ast.Attribute))
                and (node.value.id if isinstance(node.value, ast.Name) else node.value.attr) in ("keys", "manager", "store")
            ):
                offenders.append(f"{name}: .{node.attr}")
    assert offenders == []
