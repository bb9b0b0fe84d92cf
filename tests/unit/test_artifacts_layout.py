"""The layout of ``edgephi/artifacts``, read from the source: no import cycle (imports inside functions
included: a lazy import is a dependency too), production code never imports the dev stand-in, and importing
the package pulls in neither torch nor vLLM."""

from __future__ import annotations

import ast
import importlib
import sys
from pathlib import Path

import pytest

import edgephi

PACKAGE = Path(edgephi.__file__).resolve().parent
ARTIFACTS = PACKAGE / "artifacts"
TESTS_UNIT = Path(__file__).resolve().parent


def _module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: Path, *, top_level_only: bool = False) -> set[str]:
    """Absolute module names ``path`` imports (``from a.b import c`` yields ``a.b`` and ``a.b.c``)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    package = _module_name(path) if path.name == "__init__.py" else _module_name(path).rpartition(".")[0]
    out: set[str] = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([base] if base else [])])
            out.add(base)
            out.update(f"{base}.{alias.name}" for alias in node.names)
    return out


def _graph() -> dict[str, set[str]]:
    modules = {_module_name(p): p for p in ARTIFACTS.glob("*.py")}
    return {name: {m for m in _imports(path) if m in modules and m != name} for name, path in modules.items()}


def test_no_import_cycle_inside_artifacts() -> None:
    graph = _graph()
    assert "edgephi.artifacts.build" in graph and "edgephi.artifacts.gate" in graph
    state: dict[str, int] = {}  # 1: on the stack, 2: done

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for dep in sorted(graph[node]):
            assert state.get(dep) != 1, "import cycle: " + " -> ".join([*stack, node, dep])
            if dep not in state:
                visit(dep, [*stack, node])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [])


def test_the_pipeline_depends_on_its_parts_not_the_reverse() -> None:
    graph = _graph()
    a = "edgephi.artifacts."
    assert graph[a + "corpus"] == set() and graph[a + "checkpoint"] == set() and graph[a + "manifest"] == set()
    assert a + "build" not in graph[a + "gate"] and a + "build" not in graph[a + "autoround"]
    assert {a + "autoround", a + "gate", a + "corpus", a + "checkpoint"} <= graph[a + "build"]


def test_production_code_never_imports_the_dev_standin() -> None:
    allowed = {"edgephi.devmodel", "edgephi.cli.devmodel"}  # the `edgephi devmodel` command builds it
    offenders = [
        _module_name(p)
        for p in sorted(PACKAGE.rglob("*.py"))
        if _module_name(p) not in allowed and "edgephi.devmodel" in _imports(p)
    ]
    assert offenders == []
    assert "edgephi.artifacts.corpus" in _imports(PACKAGE / "devmodel.py")


def test_artifacts_import_no_torch_or_vllm_at_module_level() -> None:
    heavy = ("torch", "vllm", "transformers", "auto_round", "safetensors", "httpx")
    for path in [*ARTIFACTS.glob("*.py"), PACKAGE / "devmodel.py"]:
        top = _imports(path, top_level_only=True)
        assert not [m for m in top if m.split(".")[0] in heavy], path.name


def test_no_unit_test_imports_vllm() -> None:
    if "vllm" in sys.modules:
        pytest.skip("vLLM was imported by another tier in this process")
    for path in TESTS_UNIT.glob("test_*.py"):
        importlib.import_module(f"tests.unit.{path.stem}")
    assert "vllm" not in sys.modules
