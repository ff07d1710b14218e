"""The library's layout: layers import only the layers below them, the library never
imports flwr, the Flower apps never import each other and import the model libraries first
through one module, and no module of the library or the apps grows past 400 lines."""

from __future__ import annotations

import ast
import subprocess
import sys
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


def test_both_flower_apps_import_the_model_libraries_first_through_one_module():
    """Flower's simulation imports the ServerApp in a thread while its main thread imports the
    ClientApp; accelerate's circular imports fail when two threads import it at once. Both apps
    import fl_lota.preload before any other module of ours, and it imports the transformers code
    that pulls in accelerate, so the second app waits on its import lock."""
    ours = ("fl_lota", "wire", "clients", "server")
    for app in ("clients/app.py", "server/app.py"):
        first = next(n for n in _imports(ROOT / app) if n.split(".")[0] in ours)
        assert first == "fl_lota.preload", (app, first)
    preload = _imports(ROOT / "fl_lota" / "preload.py")
    assert {"transformers.generation.utils", "transformers.modeling_utils"} <= set(preload)


def test_nothing_the_apps_import_before_the_preload_imports_transformers_or_accelerate():
    code = (
        "import sys, fl_lota, wire, flwr.app, flwr.clientapp, flwr.serverapp, flwr.common; "
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('transformers', 'accelerate', 'peft')))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout[:500]
