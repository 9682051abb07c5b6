"""The house's shape, as a test: each package of bastion/ imports only packages below it, nothing imports in a
circle (imports under TYPE_CHECKING count: a type-only circle is still a circle for the reader), only
transport/ reaches into asyncssh's internals, and policy/ stays pure. A quiet upward import fails here, not in
review.

    cli -> ops -> service -> gateway -> transport -> audit -> store -> config -> policy -> base

base: the package itself (__version__), errors, clock, printable, safe_files, toml_input.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2] / "bastion"
LAYERS = ["base", "policy", "config", "store", "audit", "transport", "gateway", "service", "ops", "cli", "__main__"]
BASE = {"bastion", "errors", "clock", "printable", "safe_files", "toml_input"}
# What the pure decisions may import: the standard library's pure parts and each other.
POLICY_FORBIDDEN = {"asyncssh", "sqlite3", "sqlite_utils", "socket", "asyncio", "logging", "os", "subprocess",
                    "psutil", "time", "threading"}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def layer(module: str) -> str:
    parts = module.split(".")
    if len(parts) == 1 or parts[1] in BASE:
        return "base"
    return parts[1]


def imports(path: Path) -> list[tuple[str, int]]:
    """Every bastion module `path` imports (whole modules, or the module a name comes from), with line numbers."""
    module = module_name(path)
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names if alias.name.split(".")[0] == "bastion"]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != "bastion":
                continue
            if node.module is None or target in PACKAGES:  # `from . import x`: x may be a module
                found += [(f"{target}.{alias.name}" if f"{target}.{alias.name}" in MODULES else target, node.lineno)
                          for alias in node.names]
            else:
                found.append((target, node.lineno))
    return found


FILES = sorted(p for p in ROOT.rglob("*.py") if "__pycache__" not in p.parts)
MODULES = {module_name(p) for p in FILES}
PACKAGES = {module_name(p) for p in FILES if p.name == "__init__.py"}


def test_every_module_belongs_to_a_known_layer():
    unknown = {module_name(p) for p in FILES if layer(module_name(p)) not in LAYERS}
    assert not unknown, f"modules outside the layers {LAYERS}: {sorted(unknown)}"


@pytest.mark.parametrize("path", FILES, ids=lambda p: module_name(p))
def test_imports_point_down_only(path):
    here = layer(module_name(path))
    upward = [f"line {line}: {target} ({layer(target)})" for target, line in imports(path)
              if LAYERS.index(layer(target)) > LAYERS.index(here)]
    assert not upward, f"{module_name(path)} ({here}) imports upward: {upward}"


def test_no_import_cycles():
    graph = {module_name(p): {t for t, _ in imports(p) if t in MODULES and t != module_name(p)} for p in FILES}
    # a package's __init__ is imported by every module inside it; edges *into* a package init from its own modules
    # are how Python loads them, not a design circle
    for module in graph:
        graph[module] = {t for t in graph[module] if not (t in PACKAGES and module.startswith(t + "."))}
    cycles, state, stack = [], {}, []

    def visit(module: str) -> None:
        state[module] = "open"
        stack.append(module)
        for target in sorted(graph[module]):
            if state.get(target) == "open":
                cycles.append(stack[stack.index(target):] + [target])
            elif target not in state:
                visit(target)
        stack.pop()
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module)
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_only_transport_reaches_into_asyncssh():
    """asyncssh's submodules and private names are transport/'s business; the rest uses its public API."""
    offenders = []
    for path in FILES:
        if module_name(path).startswith("bastion.transport"):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("asyncssh."):
                offenders.append(f"{module_name(path)}:{node.lineno} from {node.module} import …")
            if (isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__")
                    and isinstance(node.value, ast.Name) and node.value.id == "asyncssh"):
                offenders.append(f"{module_name(path)}:{node.lineno} asyncssh.{node.attr}")
    assert not offenders, offenders


def test_policy_is_pure():
    offenders = []
    for path in FILES:
        if not module_name(path).startswith("bastion.policy"):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and not node.level:
                names = [node.module or ""]
            offenders += [f"{module_name(path)}:{node.lineno} {name}" for name in names
                          if name.split(".")[0] in POLICY_FORBIDDEN]
    assert not offenders, f"policy/ must not do I/O or read the clock: {offenders}"


def test_transport_is_used_through_its_facade():
    """Outside transport/, bastion imports `bastion.transport` itself, never one of its modules: the asyncssh
    patch has one door (install, status, the per-connection hooks), and its insides can move behind it."""
    offenders = []
    for path in FILES:
        if module_name(path).startswith("bastion.transport"):
            continue
        offenders += [f"{module_name(path)}:{line} imports {target}" for target, line in imports(path)
                      if target.startswith("bastion.transport.")]
    assert not offenders, f"use `from bastion import transport` instead: {offenders}"
