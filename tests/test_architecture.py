"""The package's import structure, read from the source with ``ast`` (nothing is imported):

- the import graph of ``qpmcli/`` and the built-in selectors ``plugins/selectors/`` (installed as
  ``qpm_plugins.selectors``; every import, module level or inside a function; imports under
  ``if TYPE_CHECKING:`` are not run and are skipped) has no cycle;
- no module imports a private name (``_name``) of another module, nor a private module of another package;
- the portable model format and the modules that only read models import neither torch nor matplotlib at module level.
"""

from __future__ import annotations

import ast
import graphlib
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "qpmcli"
# the built-in plugins are installed as the package qpm_plugins (pyproject.toml's package-dir). Only the selectors are
# checked here (the qpm selector is a package of modules since issue 31)
PLUGINS = ROOT / "plugins"
PLUGIN_PACKAGES = [PLUGINS / "__init__.py", *(PLUGINS / "selectors").rglob("*.py")]
OURS = ("qpmcli", "qpm_plugins")


def module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[0] == "plugins":
        parts[0] = "qpm_plugins"
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


MODULES = {module_name(p): p for p in sorted([*PACKAGE.rglob("*.py"), *PLUGIN_PACKAGES])}


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def runtime_imports(tree: ast.AST) -> list[ast.Import | ast.ImportFrom]:
    """Every import statement that can run (skipping ``if TYPE_CHECKING:`` bodies)."""
    out: list[ast.Import | ast.ImportFrom] = []

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import | ast.ImportFrom):
            out.append(node)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return out


def resolve(module: str, node: ast.ImportFrom) -> str:
    """The absolute module an ``ImportFrom`` names (relative imports resolved against ``module``)."""
    if not node.level:
        return node.module or ""
    is_pkg = MODULES[module].name == "__init__.py"
    base = module.split(".") if is_pkg else module.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def edges() -> dict[str, set[str]]:
    """module -> the modules of MODULES it imports (``from pkg import sub`` counts as importing ``pkg.sub``)."""
    graph: dict[str, set[str]] = {m: set() for m in MODULES}
    for mod, path in MODULES.items():
        for node in runtime_imports(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                base = resolve(mod, node)
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names]
            for target in targets:
                while target and target not in MODULES and "." in target:
                    target = target.rsplit(".", 1)[0]
                if target in MODULES and target != mod:
                    graph[mod].add(target)
    return graph


def test_the_import_graph_is_read_from_the_real_package():
    graph = edges()
    assert len(MODULES) > 20 and "qpmcli.modelfile" in MODULES
    assert "qpmcli.modelfile" in graph["qpmcli.predict"] and "qpmcli.model" in graph["qpmcli.export"]
    assert "qpm_plugins.selectors.qpm.instance" in graph["qpm_plugins.selectors.qpm.sdp"]


def test_qpmcli_and_the_plugins_have_no_import_cycle():
    graph = edges()
    try:
        tuple(graphlib.TopologicalSorter(graph).static_order())
    except graphlib.CycleError as exc:
        cycle = exc.args[1]
        pytest.fail("import cycle: " + " -> ".join(reversed(cycle)))


def test_a_cycle_would_be_found():
    """The check itself can fail: a graph with a back edge raises."""
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}}
    with pytest.raises(graphlib.CycleError):
        tuple(graphlib.TopologicalSorter(graph).static_order())


def test_no_module_imports_a_private_name_of_another():
    bad = []
    for mod, path in MODULES.items():
        for node in runtime_imports(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom):
                source = resolve(mod, node)
                if not source.startswith(OURS) or source == mod:
                    continue
                bad += [f"{mod}: from {source} import {a.name}" for a in node.names
                        if a.name.startswith("_") and not a.name.startswith("__")]
                private = [i for i, part in enumerate(source.split(".")) if part.startswith("_")
                           and not part.startswith("__")]
                # a private helper module (commands/_common.py) serves the modules of its own package only
                if private and not mod.startswith(".".join(source.split(".")[:private[0]]) + "."):
                    bad.append(f"{mod}: from {source} import ...")
            else:
                bad += [f"{mod}: import {a.name}" for a in node.names if a.name.startswith(OURS)
                        and any(p.startswith("_") and not p.startswith("__") for p in a.name.split("."))]
    assert not bad, "private cross-module imports:\n" + "\n".join(bad)


@pytest.mark.parametrize("module", ["qpmcli.modelfile", "qpmcli.prototypes", "qpmcli.predict", "qpmcli.images"])
def test_model_readers_import_without_torch_or_matplotlib(module):
    code = (f"import sys, {module}\n"
            "heavy = sorted(m for m in ('torch', 'matplotlib', 'timm', 'onnx', 'onnxruntime') if m in sys.modules)\n"
            "print(','.join(heavy))")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == ""
