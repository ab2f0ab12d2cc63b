"""The import structure of ``qpmcli/`` and ``plugins/`` (installed as ``qpm_plugins``), read from the source with
``ast`` (nothing is imported):

- the import graph (every import, module level or inside a function; imports under ``if TYPE_CHECKING:`` are not run
  and are skipped) has no cycle;
- every module imports only from its own layer or the layers to its right in the table of ``docs/design.md``
  (commands -> pipeline -> stages -> core; plugins use stages and core, and nothing in ``qpmcli`` imports them:
  they are found through entry points);
- every ``from <our module> import name`` names something that module defines (a removed helper fails here, not in
  a user's hands);
- no module imports a private name (``_name``) of another module, nor a private module of another package;
- the portable model format and the modules that only read models import neither torch nor matplotlib.
"""

from __future__ import annotations

import ast
import graphlib
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {"qpmcli": ROOT / "qpmcli", "qpm_plugins": ROOT / "plugins"}  # import name -> source folder
DESIGN = ROOT / "docs" / "design.md"
LAYERS = ("commands", "pipeline", "stages", "core")  # left imports right, never the reverse


def module_name(path: Path) -> str:
    for package, folder in PACKAGES.items():
        if path.is_relative_to(folder):
            parts = [package, *path.relative_to(folder).with_suffix("").parts]
            return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
    raise ValueError(path)


MODULES = {module_name(p): p for folder in PACKAGES.values() for p in sorted(folder.rglob("*.py"))
           if "thirdparty" not in p.parts}
TREES = {m: ast.parse(p.read_text(encoding="utf-8")) for m, p in MODULES.items()}


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
    """module -> the modules of ours it imports (``from pkg import sub`` counts as importing ``pkg.sub``, and
    ``from pkg import name`` as importing ``pkg``)."""
    graph: dict[str, set[str]] = {m: set() for m in MODULES}
    for mod, tree in TREES.items():
        for node in runtime_imports(tree):
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


def layer_table() -> dict[str, str]:
    """module -> layer, from the layer table of docs/design.md (`cli.py`, `commands/<name>.py`, `serve/` ...)."""
    rows = re.findall(r"^\| (commands|pipeline|stages|core|plugins) \| (.+?) \| .+ \|$", DESIGN.read_text(),
                      flags=re.M)
    assert {layer for layer, _ in rows} == {*LAYERS, "plugins"}, "docs/design.md lost its layer table"
    patterns: list[tuple[str, str]] = []
    for layer, cell in rows:
        for entry in re.findall(r"`([^`]+)`", cell):
            patterns.append((layer, entry))
    out: dict[str, str] = {}
    for mod, path in MODULES.items():
        rel = str(path.relative_to(ROOT))
        for layer, entry in patterns:
            if layer == "plugins":
                hit = rel.startswith("plugins/")
            elif entry.endswith("/"):  # a folder of qpmcli (serve/)
                hit = rel.startswith(f"qpmcli/{entry}")
            elif "<name>" in entry:  # commands/<name>.py
                hit = re.fullmatch("qpmcli/" + re.escape(entry).replace(re.escape("<name>"), r"[a-z_]+"), rel)
            else:
                hit = rel == f"qpmcli/{entry}"
            if hit:
                out[mod] = layer
                break
    return out


# ----------------------------------------------------------------------------------------------------- the tests
def test_the_import_graph_is_read_from_the_real_packages():
    graph = edges()
    assert len(MODULES) > 40 and "qpmcli.modelfile" in MODULES and "qpm_plugins.datasets.synthetic" in MODULES
    assert "qpmcli.modelfile" in graph["qpmcli.predict"] and "qpmcli.model" in graph["qpmcli.export"]
    assert "qpmcli.contracts" in graph["qpm_plugins.datasets.synthetic"]
    assert "qpm_plugins.selectors.qpm.instance" in graph["qpm_plugins.selectors.qpm.sdp"]


def test_there_is_no_import_cycle():
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


def test_every_module_is_in_the_layer_table_of_the_design():
    layers = layer_table()
    missing = sorted(m for m in MODULES if m not in layers)
    assert not missing, f"modules not in the layer table of docs/design.md: {missing}"


def test_imports_go_only_to_the_same_layer_or_to_the_right():
    layers = layer_table()
    rank = {layer: i for i, layer in enumerate(LAYERS)}
    bad = []
    for mod, targets in edges().items():
        for target in targets:
            src, dst = layers[mod], layers[target]
            if src == "plugins":
                ok = dst in ("plugins", "stages", "core")
            elif dst == "plugins":
                ok = False  # qpmcli finds plugins through entry points, never by import
            else:
                ok = rank[dst] >= rank[src]
            if not ok:
                bad.append(f"{mod} ({src}) imports {target} ({dst})")
    assert not bad, "imports against the layer order of docs/design.md:\n" + "\n".join(sorted(bad))


def test_a_layer_violation_would_be_found():
    """The layer check reads the real table: a stage importing a command is against it."""
    layers = layer_table()
    assert layers["qpmcli.cli"] == "commands" and layers["qpmcli.metrics"] == "stages"
    assert layers["qpmcli.train"] == "pipeline" and layers["qpmcli.artifact"] == "core"
    assert layers["qpm_plugins.selectors"] == "plugins"


def defined_names(tree: ast.Module) -> set[str] | None:
    """The names a module defines at its top level (functions, classes, assignments, imports); None when it
    defines ``__getattr__`` (anything may resolve)."""
    names: set[str] = set()

    def visit(body: list[ast.stmt]) -> None:
        for node in body:
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
                names.add(node.name)
            elif isinstance(node, ast.Assign):
                for t in node.targets:
                    names.update(n.id for n in ast.walk(t) if isinstance(n, ast.Name))
            elif isinstance(node, ast.AnnAssign | ast.AugAssign) and isinstance(node.target, ast.Name):
                names.add(node.target.id)
            elif isinstance(node, ast.Import | ast.ImportFrom):
                names.update((a.asname or a.name).split(".")[0] for a in node.names)
            elif isinstance(node, ast.If | ast.Try):
                visit(node.body)
                visit(node.orelse)
                for handler in getattr(node, "handlers", []):
                    visit(handler.body)

    visit(tree.body)
    return None if "__getattr__" in names else names


def test_every_from_import_of_our_modules_resolves():
    bad = []
    for mod, tree in TREES.items():
        for node in runtime_imports(tree):
            if not isinstance(node, ast.ImportFrom):
                continue
            source = resolve(mod, node)
            if source not in MODULES:
                if source.split(".")[0] in PACKAGES:
                    bad.append(f"{mod}: from {source} import ... (no such module)")
                continue
            names = defined_names(TREES[source])
            if names is None:
                continue
            for alias in node.names:
                if alias.name != "*" and alias.name not in names and f"{source}.{alias.name}" not in MODULES:
                    bad.append(f"{mod}: from {source} import {alias.name}")
    assert not bad, "imports of names that do not exist:\n" + "\n".join(bad)


def test_every_from_import_of_our_modules_in_tests_and_benchmarks_resolves():
    """The same for the code that uses the package from outside (tests, benchmarks): a helper they import that was
    moved or removed fails here, not when the benchmark is next run."""
    bad = []
    for folder in (ROOT / "tests", ROOT / "benchmarks"):
        for path in sorted(folder.rglob("*.py")):
            if "thirdparty" in path.parts:
                continue
            for node in runtime_imports(ast.parse(path.read_text(encoding="utf-8"))):
                if not isinstance(node, ast.ImportFrom) or node.level or (node.module or "").split(".")[0] \
                        not in PACKAGES:
                    continue
                source = node.module
                if source not in MODULES:
                    bad.append(f"{path.relative_to(ROOT)}: from {source} import ... (no such module)")
                    continue
                names = defined_names(TREES[source])
                if names is None:
                    continue
                bad += [f"{path.relative_to(ROOT)}: from {source} import {a.name}" for a in node.names
                        if a.name != "*" and a.name not in names and f"{source}.{a.name}" not in MODULES]
    assert not bad, "imports of names that do not exist:\n" + "\n".join(bad)


def test_a_missing_name_would_be_found():
    tree = ast.parse("def kept():\n    pass\n")
    assert "kept" in defined_names(tree) and "removed" not in defined_names(tree)


def test_no_module_imports_a_private_name_of_another():
    bad = []
    for mod, tree in TREES.items():
        for node in runtime_imports(tree):
            if isinstance(node, ast.ImportFrom):
                source = resolve(mod, node)
                if source.split(".")[0] not in PACKAGES or source == mod:
                    continue
                bad += [f"{mod}: from {source} import {a.name}" for a in node.names
                        if a.name.startswith("_") and not a.name.startswith("__")]
                private = [i for i, part in enumerate(source.split(".")) if part.startswith("_")
                           and not part.startswith("__")]
                # a private helper module (commands/_common.py) serves the modules of its own package only
                owner = ".".join(source.split(".")[:private[0]]) if private else ""
                if private and mod != owner and not mod.startswith(owner + "."):
                    bad.append(f"{mod}: from {source} import ...")
            else:
                bad += [f"{mod}: import {a.name}" for a in node.names if a.name.split(".")[0] in PACKAGES
                        and any(p.startswith("_") and not p.startswith("__") for p in a.name.split("."))]
    assert not bad, "private cross-module imports:\n" + "\n".join(bad)


def test_model_readers_import_without_torch_or_matplotlib():
    """One fresh interpreter imports each reader in turn: none of them may pull in torch, matplotlib, timm, onnx or
    onnxruntime at import time (``qpm predict model.onnx`` and ``qpm serve`` start fast)."""
    modules = ["qpmcli.modelfile", "qpmcli.prototypes", "qpmcli.images", "qpmcli.predict", "qpmcli.quantize",
               "qpmcli.runs", "qpmcli.current", "qpmcli.serve.engine"]
    code = ("import importlib, sys\n"
            f"for m in {modules!r}:\n"
            "    importlib.import_module(m)\n"
            "    heavy = sorted(h for h in ('torch', 'matplotlib', 'timm', 'onnx', 'onnxruntime')\n"
            "                   if h in sys.modules)\n"
            "    if heavy:\n"
            "        print(m, 'imports', ','.join(heavy))\n"
            "        break\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == ""
