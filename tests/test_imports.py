"""The package's import graph, read from the source (ast): no cycle between modules, and no import from
a lower layer into a higher one. Imports inside functions count as much as those at the top.

The layers, lowest first, written down once here (docs/CONTRACTS.md shows the same picture):
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "dpoq_jax"

# A module may import modules of its own layer or of lower layers only. A top-level module is named by
# its file (dpoq_jax/paths.py -> "paths"), a subpackage by its folder (dpoq_jax/models/* -> "models").
LAYERS: list[set[str]] = [
    # the core: functions of arrays, paths, argv
    {"__init__", "paths", "parser", "tokenq", "prm", "losses"},
    {"models"},  # the decoder, its configs and checkpoint formats (HF, params), sharding rules, LoRA
    {"data"},  # sources, tokenization, layouts, loader, synthetic tasks
    {"decode"},  # sampling, beam search, reward-guided search (any model with init_cache/decode)
    {"analysis"},  # token rewards of responses, scores, reports
    # the training run (config, mesh, state, step, loop, checkpoints, load_model); explicit reward models
    {"train", "reward_model"},
    {"experiments", "configs"},  # the paper's experiments and the shipped config files
    {"commands"},  # `dpoq NAME` entry points: parse argv, call the layers below
    {"demo", "cli"},  # `dpoq demo`, the dispatcher
]
LEVEL = {name: i for i, layer in enumerate(LAYERS) for name in layer}


def _unit(module: str) -> str:
    """dpoq_jax.models.hf -> models; dpoq_jax.paths -> paths."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__" and len(parts) > 1:
        parts = parts[:-1]
    return ".".join(parts)


def import_graph() -> dict[str, set[str]]:
    """module -> the dpoq_jax modules it imports (anywhere in the file)."""
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        is_pkg = path.name == "__init__.py"
        deps: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative import
                    pkg = name.split(".") if is_pkg else name.split(".")[:-1]
                    pkg = pkg[: len(pkg) - node.level + 1]
                    base = ".".join(pkg + ([base] if base else []))
                # `from pkg import mod` depends on pkg.mod; `from mod import name` on mod
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
            for t in targets:
                # the longest prefix that is a module of the package (`from x import name` may name one)
                while t and t not in modules:
                    t = t.rpartition(".")[0]
                if t.startswith("dpoq_jax") and t != name:
                    deps.add(t)
        graph[name] = deps
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as [a, b, ..., a], or None (depth-first search)."""
    colour: dict[str, int] = {}
    stack: list[str] = []

    def visit(n: str) -> list[str] | None:
        colour[n] = 1
        stack.append(n)
        for m in sorted(graph.get(n, ())):
            if colour.get(m) == 1:
                return stack[stack.index(m) :] + [m]
            if m not in colour and (c := visit(m)):
                return c
        stack.pop()
        colour[n] = 2
        return None

    for n in sorted(graph):
        if n not in colour and (c := visit(n)):
            return c
    return None


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    bad = []
    for a, deps in sorted(graph.items()):
        for b in sorted(deps):
            ua, ub = _unit(a), _unit(b)
            if ua not in LEVEL or ub not in LEVEL:
                bad.append(f"{a} -> {b}: {ua if ua not in LEVEL else ub} is in no layer of this test")
            elif LEVEL[ub] > LEVEL[ua]:
                bad.append(f"{a} (layer {LEVEL[ua]}) imports {b} (layer {LEVEL[ub]})")
    return bad


def test_no_import_cycle():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_no_upward_import():
    bad = upward_imports(import_graph())
    assert not bad, "imports against the layer order:\n" + "\n".join(bad)


def test_the_checks_can_fail():
    """The checks themselves: a planted cycle and a planted upward import are found."""
    g = {"dpoq_jax.a": {"dpoq_jax.b"}, "dpoq_jax.b": {"dpoq_jax.c"}, "dpoq_jax.c": {"dpoq_jax.a"}}
    assert find_cycle(g) == ["dpoq_jax.a", "dpoq_jax.b", "dpoq_jax.c", "dpoq_jax.a"]
    assert find_cycle({"dpoq_jax.a": {"dpoq_jax.b"}, "dpoq_jax.b": set()}) is None
    up = upward_imports({"dpoq_jax.models.hf": {"dpoq_jax.train.mesh"}, "dpoq_jax.train.mesh": set()})
    assert up == ["dpoq_jax.models.hf (layer 1) imports dpoq_jax.train.mesh (layer 5)"]
    assert upward_imports({"dpoq_jax.train.mesh": {"dpoq_jax.models.hf"}, "dpoq_jax.models.hf": set()}) == []


def test_graph_sees_function_level_and_relative_imports(tmp_path, monkeypatch):
    pkg = tmp_path / "dpoq_jax"
    (pkg / "models").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "models" / "__init__.py").write_text("from . import hf\n")
    (pkg / "models" / "hf.py").write_text("def f():\n    from dpoq_jax.train import mesh\n")
    (pkg / "train").mkdir()
    (pkg / "train" / "__init__.py").write_text("")
    (pkg / "train" / "mesh.py").write_text("from ..models.hf import f\n")
    monkeypatch.setattr(__import__(__name__), "PACKAGE", pkg)
    g = import_graph()
    assert g["dpoq_jax.models.hf"] == {"dpoq_jax.train.mesh"}
    assert g["dpoq_jax.train.mesh"] == {"dpoq_jax.models.hf"}
    assert g["dpoq_jax.models"] == {"dpoq_jax.models.hf"}
    assert find_cycle(g) is not None


@pytest.mark.parametrize("unit", sorted({_unit(m) for m in import_graph()}))
def test_every_part_has_a_layer(unit):
    assert unit in LEVEL, f"dpoq_jax/{unit} is in no layer: add it to LAYERS in this test"
