"""The floors of docs/design.md section 5, read from the source: no module imports a module
above its floor, the import graph has no cycles, and nothing in the package imports the
benchmarks."""

from __future__ import annotations

import ast
import pathlib

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "convrec"

# Module name prefixes per floor; the longest matching prefix decides.
FLOORS = {
    "base": ("schedule", "checks", "build_status", "checkpoint_file", "time_context"),
    "kernels": ("ops.triton",),
    "ops": ("ops",),
    "models": ("encoder", "item_encoder", "readouts", "recommender", "model", "baselines"),
    "registry": ("registry", "compat"),
    "data": ("data",),
    "evaluation": ("evaluation",),
    "serving": ("serving",),
    "training": ("training",),
    "top": ("", "cli", "demo", "__main__", "bench"),
}
# What each floor may import besides itself. Data knows no model; serving no training code.
MAY_IMPORT = {
    "base": set(),
    "kernels": {"base"},
    "ops": {"base", "kernels"},
    "models": {"base", "ops"},
    "registry": {"base", "ops", "models"},
    "data": {"base", "ops"},
    "evaluation": {"base", "data"},
    "serving": {"base", "ops", "models", "registry"},
    "training": {"base", "ops", "models", "registry", "data", "evaluation"},
    "top": set(FLOORS),
}


def _modules() -> dict[str, pathlib.Path]:
    modules = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        modules[".".join(("convrec", *parts))] = path
    return modules


MODULES = _modules()


def _imports(name: str, path: pathlib.Path) -> set[str]:
    """convrec modules ``name`` imports anywhere in its source (function-level imports too)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([node.module] if node.module else [])])
            found.add(base)
            found |= {f"{base}.{alias.name}" for alias in node.names}
    # a module's parent packages are imported with it whatever it says: not an edge
    return {m for m in found if m in MODULES and not (name == m or name.startswith(m + "."))}


def _floor(name: str) -> str:
    relative = name.removeprefix("convrec").removeprefix(".")
    best = max(
        (
            (len(prefix), floor)
            for floor, prefixes in FLOORS.items()
            for prefix in prefixes
            if relative == prefix or relative.startswith(prefix + ".")
        ),
        default=None,
    )
    assert best is not None, f"{name} belongs to no floor: add it to FLOORS"
    return best[1]


GRAPH = {name: _imports(name, path) for name, path in MODULES.items()}


@pytest.mark.parametrize("name", sorted(MODULES))
def test_no_module_imports_above_its_floor(name: str) -> None:
    floor = _floor(name)
    for imported in GRAPH[name]:
        other = _floor(imported)
        assert other == floor or other in MAY_IMPORT[floor], (
            f"{name} ({floor}) imports {imported} ({other})"
        )


def test_the_import_graph_has_no_cycles() -> None:
    """Package ``__init__`` files re-export their children: those edges are not cycles."""
    edges = {
        name: {m for m in targets if not m.startswith(name + ".")}
        for name, targets in GRAPH.items()
    }
    state: dict[str, str] = {}

    def visit(name: str, path: list[str]) -> None:
        state[name] = "open"
        for target in sorted(edges[name]):
            assert state.get(target) != "open", "import cycle: " + " -> ".join([*path, target])
            if target not in state:
                visit(target, [*path, target])
        state[name] = "done"

    for name in sorted(edges):
        if name not in state:
            visit(name, [name])


def test_the_package_never_imports_the_benchmarks() -> None:
    for name, path in MODULES.items():
        tree = ast.parse(path.read_text())
        names = [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
        names += [n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
        assert not any(n.split(".")[0] == "benchmarks" for n in names), name
