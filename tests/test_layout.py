"""The library's layout: layers import only the layers below them, the library never
imports flwr, the Flower apps never import each other, and no module (library, apps, tests,
benches) grows past 400 lines."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LAYERS = ["vectors", "training", "merging", "tasks", "federated", "compare", ""]  # "" the top level


def _layer(module: str) -> int:
    """The layer of ``fl_lota.<layer>.<module>`` (a top-level module is the last layer)."""
    parts = module.split(".")
    return LAYERS.index(parts[1]) if len(parts) > 1 and parts[1] in LAYERS else LAYERS.index("")


def _imports(path: Path) -> list[str]:
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out += [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            out += [a.name for a in node.names]
    return out


def _modules(*folders: str) -> list[Path]:
    return [p for f in folders for p in sorted((ROOT / f).rglob("*.py"))]


@pytest.mark.parametrize("path", _modules("fl_lota"), ids=lambda p: str(p.relative_to(ROOT)))
def test_a_library_module_imports_only_its_layer_and_the_layers_below(path):
    mine = ".".join(path.relative_to(ROOT).with_suffix("").parts)
    mine = mine.removesuffix(".__init__")
    above = []
    for name in _imports(path):
        assert name.split(".")[0] != "flwr", f"{mine} imports {name}: the library never imports flwr"
        if name.startswith("fl_lota.") and _layer(name) > _layer(mine):
            above.append(name)
    assert not above, f"{mine} (layer {LAYERS[_layer(mine)] or 'top'}) imports from layers above it: {above}"


def test_the_flower_apps_do_not_import_each_other():
    for path in _modules("server"):
        assert not [n for n in _imports(path) if n.split(".")[0] == "clients"], path
    for path in _modules("clients"):
        assert not [n for n in _imports(path) if n.split(".")[0] == "server"], path


@pytest.mark.parametrize(
    "path", _modules("fl_lota", "clients", "server", "wire"), ids=lambda p: str(p.relative_to(ROOT))
)
def test_no_module_is_over_400_lines(path):
    assert len(path.read_text().splitlines()) <= 400
