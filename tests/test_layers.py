"""The package's floors (hieradet_mmdet/__init__.py): every module imports only from its own floor or
those below it, lazily or not, and no two modules import each other."""

from __future__ import annotations

import ast
from pathlib import Path

from helpers import ROOT

PACKAGE = ROOT / "hieradet_mmdet"
# Bottom to top; a name is a top-level module or subpackage of hieradet_mmdet. Modules of one floor
# may import each other's (engine/, detectors.py and export/ are side by side, but export/ never
# imports engine/: checked below).
FLOORS = [("archs", "cpu", "mmengine_adapter", "torch_compat"), ("weights",), ("models",),
          ("engine", "detectors", "export"), ("demo",), ("__init__",)]
FLOOR = {name: i for i, names in enumerate(FLOORS) for name in names}


def part(module: str) -> str:
    """'hieradet_mmdet.weights.load' -> 'weights'."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def imports(path: Path) -> set[str]:
    """The hieradet_mmdet modules a file imports (absolute names), wherever in the file."""
    here = "hieradet_mmdet." + ".".join(path.relative_to(PACKAGE).with_suffix("").parts)
    package = here.rsplit(".", 1)[0] if path.name != "__init__.py" else here.removesuffix(".__init__")
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("hieradet_mmdet")}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - node.level + 1]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module or ""
            if name.startswith("hieradet_mmdet"):
                found.add(name)
                found |= {f"{name}.{a.name}" for a in node.names}
    return {n for n in found if _exists(n)}


def _exists(name: str) -> bool:
    path = ROOT / Path(*name.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def modules() -> dict[str, set[str]]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        name = "hieradet_mmdet." + ".".join(path.relative_to(PACKAGE).with_suffix("").parts)
        out[name.removesuffix(".__init__")] = imports(path)
    return out


def test_every_module_has_a_floor():
    assert {part(m) for m in modules()} <= set(FLOOR), "a new top-level module: give it a floor in FLOORS"


def test_no_import_goes_up_a_floor():
    upward = [(m, i) for m, found in modules().items() for i in found
              if FLOOR[part(i)] > FLOOR[part(m)] and part(m) != "__init__" and part(i) != "__init__"]
    assert not upward, upward
    assert not [(m, i) for m, found in modules().items() for i in found
                if part(m) == "export" and part(i) == "engine"], "export/ imports training code"


def test_no_two_modules_import_each_other():
    graph = modules()
    pairs = sorted({tuple(sorted((a, b))) for a, found in graph.items() for b in found
                    if b != a and a in graph.get(b, set()) and not a.startswith(b) and not b.startswith(a)})
    assert not pairs, pairs


def test_the_package_never_imports_the_measuring_tools():
    """benchmarks/ sits beside the package, not in it: an installed plugin has no benchmarks to import."""
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else [])
            found += [(path.name, n) for n in names if n.split(".")[0] == "benchmarks"]
    assert not found, found
