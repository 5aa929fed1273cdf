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


def _readme_test_names() -> list[tuple[str, str | None]]:
    """(file, test or None) for every test the README's Reliability table names; `::name` after a file name in
    the same cell belongs to that file."""
    import re

    text = (ROOT / "README.md").read_text("utf-8")
    table = text.split("What the tool guarantees, and the test that checks each guarantee:", 1)[1].strip().split("\n\n", 1)[0]
    out = []
    for row in table.splitlines()[2:]:
        current = None
        for ref in re.findall(r"`((?:test_\w+\.py)?(?:::test_\w+)?)`", row.rsplit("|", 2)[-2]):
            file, _, name = ref.partition("::")
            current = file or current
            out.append((current, name or None))
    return out


def test_every_test_the_reliability_table_names_exists_and_make_test_runs_it():
    named = _readme_test_names()
    assert len(named) >= 20, named
    defined = {p.name: {n.name for n in ast.parse(p.read_text()).body if isinstance(n, ast.FunctionDef)}
               for p in (ROOT / "tests").glob("test_*.py")}
    missing = [(f, t) for f, t in named if f not in defined or (t and t not in defined[f])]
    assert not missing, f"the README names tests that do not exist: {missing}"
    # `make test` runs the whole tests/ folder, deselecting nothing: no -k, no --ignore, and its pytest runs' -m
    # expressions, if any, split the tests in two parts that together are all of them
    import re

    recipe = (ROOT / "Makefile").read_text().split("\ntest:", 1)[1].split("\n\n", 1)[0]
    runs = [line.split("-m pytest", 1)[1] for line in recipe.splitlines() if "-m pytest" in line]
    assert runs and all(a.rstrip().endswith(" tests") for a in runs), runs
    assert not any(f in a for a in runs for f in (" -k ", "--ignore", "--deselect", "--lf", "-x ")), runs
    marks = sorted(m.group(1) if (m := re.search(r' -m "([^"]*)"', a)) else "" for a in runs)
    assert marks in ([""], ["cluster", "not cluster"]), marks


def test_tests_readme_gives_every_module_a_budget():
    import re

    text = (ROOT / "tests" / "README.md").read_text("utf-8")
    budgets = dict(re.findall(r"^\| `(test_\w+\.py)` \| (\d+) \|", text, re.M))
    modules = {p.name for p in (ROOT / "tests").glob("test_*.py")}
    assert modules == set(budgets), (sorted(modules - set(budgets)), sorted(set(budgets) - modules))
    total = int(re.search(r"^Budgets in all: (\d+) s", text, re.M).group(1))
    assert sum(int(b) for b in budgets.values()) == total  # the table and its total agree
