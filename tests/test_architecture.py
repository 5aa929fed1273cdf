"""The package's seams: no import cycle (lazy imports included), no reach into another module's private
names, and no test module importing another."""

from __future__ import annotations

import ast

from helpers import ROOT

PKG = ROOT / "lifelog_ray"


def _module(path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path) -> list[tuple[str, list[str]]]:
    """(imported module, names) for every import in the file, resolved to absolute module names."""
    mod = _module(path)
    package = mod if path.name == "__init__.py" else mod.rsplit(".", 1)[0]
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            names = [a.name for a in node.names]
            if not node.module:  # `from . import storage`: the names are modules
                out += [(f"{target}.{n}", []) for n in names]
            else:
                out.append((target, names))
        elif isinstance(node, ast.Import):
            out += [(a.name, []) for a in node.names]
    return out


def _graph() -> dict[str, set[str]]:
    mods = {_module(p): p for p in PKG.rglob("*.py")}
    return {m: {t for t, _ in _imports(p) if t in mods and t != m} for m, p in mods.items()}


def test_no_import_cycle_in_the_package():
    graph, state, cycles = _graph(), {}, []

    def visit(m: str, stack: list[str]) -> None:
        state[m] = "active"
        for n in sorted(graph[m]):
            if state.get(n) == "active":
                cycles.append(stack[stack.index(n):] + [n])
            elif n not in state:
                visit(n, stack + [n])
        state[m] = "done"

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    assert not cycles, cycles


def test_no_module_imports_another_modules_private_names():
    reaches = [(str(p.relative_to(ROOT)), t, n) for p in PKG.rglob("*.py") for t, names in _imports(p)
               if t.startswith("lifelog_ray") for n in names if n.startswith("_") and n != "__version__"]
    assert not reaches, reaches


def test_no_test_module_imports_another():
    tests = {p.stem for p in (ROOT / "tests").glob("test_*.py")}
    reaches = [(p.name, t) for p in (ROOT / "tests").glob("*.py") for t, _ in _imports(p)
               if t in tests or t == "conftest"]
    assert not reaches, reaches
