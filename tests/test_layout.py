"""The package's structure, checked from its source: layers that import only downwards (a module may
import its own layer and the layers below it; `LAYERS` lists them top to bottom), no cycles, torch
kept out of the analysis and the plans, short modules and functions, and one definition per name."""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "moescope"
LAYERS = [
    ("moescope.cli", "moescope.commands"),
    ("moescope.report",),
    ("moescope.judge",),
    ("moescope.compress",),
    ("moescope.analysis",),
    ("moescope.profiling",),
    ("moescope.backends",),
    ("moescope.models",),
    ("moescope.plans",),
    ("moescope", "moescope.calibration", "moescope.checkpoints", "moescope.identity", "moescope.output",
     "moescope.errors"),
]
TORCH_FREE = ("moescope.analysis", "moescope.plans")
HEAVY = ("torch", "transformers")
MAX_MODULE_LINES, MAX_FUNCTION_LINES = 400, 80
# Names every module of a kind defines on purpose: a verb's entry points and the outputs and inputs it
# declares to the CLI, an export format's interface, an engine dump parser's.
SHARED_NAMES = {"add_arguments", "run", "OUTPUTS", "INPUTS", "NAME", "adjust", "model_notes", "write",
                "FORMAT_VERSION", "FALLBACK_NOTE", "DESCRIPTION", "PER_REQUEST", "read", "request"}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def sources() -> dict[str, ast.Module]:
    return {module_name(path): ast.parse(path.read_text(), str(path)) for path in sorted(PACKAGE.rglob("*.py"))}


def imports(tree: ast.Module, name: str) -> set[str]:
    """Every module `tree` imports, anywhere in it (functions included), with relative imports resolved."""
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            package = name.split(".")[: -node.level] if node.level else []
            base = ".".join(package + ([node.module] if node.module else []))
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)  # `from pkg import module`
    return found


def layer_of(module: str) -> int | None:
    """Index of the layer that holds `module` (its longest matching prefix), None outside moescope."""
    best = None
    for index, prefixes in enumerate(LAYERS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and (best is None or len(prefix) > best[1]):
                best = (index, len(prefix))
    return None if best is None else best[0]


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    trees = sources()
    return {name: {m for m in imports(tree, name) if m in trees and m != name} for name, tree in trees.items()}


def test_every_module_is_in_a_layer(graph):
    assert [name for name in graph if layer_of(name) is None] == []


def test_imports_point_down(graph):
    upward = [f"{name} (layer {layer_of(name)}) imports {target} (layer {layer_of(target)})"
              for name, targets in graph.items() for target in targets if layer_of(target) < layer_of(name)]
    assert upward == []


def test_no_import_cycles(graph):
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    cycles = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for target in sorted(graph[node]):
            if state.get(target) == 1:
                cycles.append(" -> ".join(path[path.index(target):] + [node, target]) if target in path else target)
            elif target not in state:
                visit(target, path + [node])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [])
    assert cycles == []


def test_analysis_and_plans_never_import_torch():
    heavy = [f"{name} imports {module}" for name, tree in sources().items() if name.startswith(TORCH_FREE)
             for module in imports(tree, name) if module.split(".")[0] in HEAVY]
    assert heavy == []


def test_modules_and_functions_are_short():
    long = []
    for path in sorted(PACKAGE.rglob("*.py")):
        text = path.read_text()
        if len(text.splitlines()) > MAX_MODULE_LINES:
            long.append(f"{path.name}: {len(text.splitlines())} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                if node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES:
                    long.append(f"{path.name}:{node.lineno} {node.name}: {node.end_lineno - node.lineno + 1} lines")
    assert long == []


def test_each_top_level_name_is_defined_once():
    homes = defaultdict(list)
    for name, tree in sources().items():
        for node in tree.body:
            if isinstance(node, ast.FunctionDef | ast.ClassDef):
                homes[node.name].append(name)
            elif isinstance(node, ast.Assign):
                homes.update({t.id: homes[t.id] + [name] for t in node.targets if isinstance(t, ast.Name)})
    assert {n: m for n, m in homes.items() if len(m) > 1 and n not in SHARED_NAMES and not n.startswith("_")} == {}


def test_the_checks_themselves_can_fail():
    """The graph checks find an upward import, a cycle and a torch import when there is one."""
    tree = ast.parse("import torch\nfrom moescope.commands import plan\ndef f():\n    from . import store\n")
    found = imports(tree, "moescope.analysis.balance")
    assert {"torch", "moescope.commands.plan", "moescope.analysis.store"} <= found
    assert layer_of("moescope.commands.plan") < layer_of("moescope.analysis.balance")
    assert layer_of("moescope.identity") == len(LAYERS) - 1 and layer_of("numpy") is None
