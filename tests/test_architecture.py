"""The package's shape, checked from its source: imports run one way, no module reaches for
another's private names, no import cycle, no module too large to read. The map of which
module owns which rule is in docs/design.md ("Package map")."""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

import volnorm

ROOT = Path(volnorm.__file__).parent
#: The limits docs/design.md promises.
MAX_LINES = 800
MAX_FUNCTION_LEVEL_IMPORTS = 20
#: Package-private on purpose: the numba kernels are shared by every statistic.
SHARED_PRIVATE = ("volnorm._kernels", "volnorm._color_kernels")


def _modules() -> dict[str, Path]:
    out = {}
    for p in sorted(ROOT.rglob("*.py")):
        parts = list(p.relative_to(ROOT.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = p
    return out


MODULES = _modules()


def _imports(name: str, path: Path) -> Iterator[tuple[str, str | None, bool]]:
    """(imported module, imported name or None, inside a function) for every import of a
    volnorm module in ``path`` (``if TYPE_CHECKING:`` blocks left out)."""
    tree = ast.parse(path.read_text())
    parents = {c: n for n in ast.walk(tree) for c in ast.iter_child_nodes(n)}

    def where(node: ast.AST) -> tuple[bool, bool]:
        in_func = type_only = False
        while node in parents:
            node = parents[node]
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                in_func = True
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
                type_only = True
        return in_func, type_only

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [(a.name, None) for a in node.names if a.name.split(".")[0] == "volnorm"]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
                base = base[: len(base) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            if module.split(".")[0] != "volnorm":
                continue
            targets = [(f"{module}.{a.name}", None) if f"{module}.{a.name}" in MODULES else (module, a.name) for a in node.names]
        else:
            continue
        in_func, type_only = where(node)
        if not type_only:
            for t in targets:
                yield t[0], t[1], in_func


IMPORTS = {name: list(_imports(name, path)) for name, path in MODULES.items()}


@pytest.mark.parametrize("name", list(MODULES))
def test_no_module_is_over_the_line_limit(name):
    n = len(MODULES[name].read_text().splitlines())
    assert n <= MAX_LINES, f"{MODULES[name]} has {n} lines (limit {MAX_LINES}): split it by concern"


def test_few_imports_of_volnorm_modules_sit_inside_functions():
    inside = [(m, t) for m, imps in IMPORTS.items() for t, _, f in imps if f]
    assert len(inside) <= MAX_FUNCTION_LEVEL_IMPORTS, inside


def test_no_private_name_crosses_a_module_boundary():
    crossing = [(m, t, n) for m, imps in IMPORTS.items() for t, n, _ in imps
                if n and n.startswith("_") and not n.startswith("__") and t != m and t not in SHARED_PRIVATE]
    assert crossing == []


def test_the_library_does_not_import_its_own_facade():
    """Modules import the module that defines a name, not ``volnorm`` (whose __init__ imports
    them all); only the command line, a layer above the package, may."""
    users = sorted(m for m, imps in IMPORTS.items() if any(t == "volnorm" for t, _, _ in imps) and m not in ("volnorm", "volnorm.cli", "volnorm.__main__"))
    assert users == []


def test_there_is_no_import_cycle():
    graph = {m: {t for t, _, _ in imps if t in MODULES and t != m} for m, imps in IMPORTS.items()}
    # a package imports its submodules when one of them is imported: that edge is not a cycle
    for m in graph:
        graph[m] = {t for t in graph[m] if not m.startswith(t + ".")}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    cycles: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                cycles.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    assert cycles == []


#: The layers, lowest first: a module may import only from its own layer or lower ones.
LAYERS = [
    {"volnorm._utils", "volnorm._eager", "volnorm._kernels", "volnorm._color_kernels", "volnorm._dims", "volnorm.params", "volnorm.arrays", "volnorm.engine", "volnorm.engine.address",
     "volnorm.engine.clusters", "volnorm.engine.faults", "volnorm.testing"},
    {"volnorm.integrity", "volnorm.io", "volnorm.io.gzipstream", "volnorm.io.manifest", "volnorm.io.nifti", "volnorm.io.niftizarr",
     "volnorm.io.readers", "volnorm.io.store", "volnorm.io.location", "volnorm.io.objectstore", "volnorm.io.writers", "volnorm.io.pyramid", "volnorm.datasets", "volnorm.datasets.samples",
     "volnorm.datasets.phantom", "volnorm.datasets.cohort"},
    {"volnorm._histogram", "volnorm._minmax", "volnorm.stats", "volnorm.fsl"},
    {"volnorm.transforms", "volnorm.transforms.common", "volnorm.transforms.intensity", "volnorm.transforms.equalization",
     "volnorm.transforms.nyul", "volnorm.transforms.binary", "volnorm.transforms.thresholds", "volnorm.transforms.bias", "volnorm.transforms.tissue", "volnorm.transforms.harmonize", "volnorm.color",
     "volnorm.color.grey", "volnorm.color.colormaps", "volnorm.color.palette", "volnorm.color.spaces",
     "volnorm.normative", "volnorm.voxel", "volnorm.conversion", "volnorm.info", "volnorm.plot", "volnorm.accessor"},
    {"volnorm.pipeline", "volnorm.pipeline.spec", "volnorm.pipeline.steps", "volnorm.pipeline.planner", "volnorm.pipeline.runner",
     "volnorm.pipeline.outputs"},
    {"volnorm", "volnorm.cli", "volnorm.__main__"},
]


def test_every_module_has_a_layer():
    placed = set().union(*LAYERS)
    assert set(MODULES) - placed == set(), "add new modules to LAYERS (and to the package map in docs/design.md)"


def test_imports_run_one_way():
    """cli -> pipeline -> public functions -> statistics -> io, engine, dims, params."""
    level = {m: i for i, layer in enumerate(LAYERS) for m in layer}
    upward = [(m, t) for m, imps in IMPORTS.items() for t, _, _ in imps
              if t in level and m in level and level[t] > level[m]]
    assert upward == []
