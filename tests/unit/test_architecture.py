"""The package's shape, checked: no import cycle inside ``edgephi/`` (lazy imports included), the core knows no
transport (only the gRPC door, the gRPC client and the test/CLI helpers around them import grpc), only the
engine adapter and the kernel plugin import vLLM at module level, and the dev stand-in is imported by no
production module."""

from __future__ import annotations

import ast
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "edgephi"
#: Modules that may import grpc: the gRPC front door, the gRPC client library and the commands/tests built on it.
GRPC_ALLOWED = ("edgephi.grpc_door", "edgephi.client", "edgephi.testing", "edgephi.cli", "edgephi.v1")
#: Modules that may import vllm (anywhere in them): the engine adapter and the kernel plugin; the artifact
#: pipeline checks what vLLM can load.
VLLM_ALLOWED = ("edgephi.engine.vllm", "edgephi.vllm_plugin", "edgephi.artifacts", "edgephi.devmodel", "edgephi.doctor")
#: Production modules that must not import the dev stand-in.
DEVMODEL_USERS = ("edgephi.devmodel", "edgephi.testing", "edgephi.cli")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: Path) -> Iterator[str]:
    """Every module ``path`` imports, at any depth of its code (lazy imports included)."""
    name = _module_name(path)
    is_pkg = path.name == "__init__.py"
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            yield from (a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".")
                base = base[: len(base) - node.level + (1 if is_pkg else 0)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            yield mod
            yield from (f"{mod}.{a.name}" for a in node.names)  # `from pkg import module`


def _graph() -> dict[str, set[str]]:
    files = [p for p in PACKAGE.rglob("*.py") if "_pb2" not in p.name]
    modules = {_module_name(p): p for p in files}
    graph: dict[str, set[str]] = {}
    for mod, path in modules.items():
        targets = set()
        for imported in _imports(path):
            while imported and imported not in modules:
                imported = imported.rpartition(".")[0]
            if imported and imported != mod and not mod.startswith(imported + "."):
                targets.add(imported)
        graph[mod] = targets
    return graph


def _external(prefix: str) -> set[str]:
    users = set()
    for path in PACKAGE.rglob("*.py"):
        if "_pb2" in path.name:
            continue
        if any(i == prefix or i.startswith(prefix + ".") for i in _imports(path)):
            users.add(_module_name(path))
    return users


def _allowed(module: str, prefixes: tuple[str, ...]) -> bool:
    return any(module == p or module.startswith(p + ".") for p in prefixes)


def test_no_import_cycle_inside_the_package() -> None:
    graph = _graph()
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    path: list[str] = []
    cycles: list[list[str]] = []

    def visit(node: str) -> None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                cycles.append([*path[path.index(nxt) :], nxt])
            elif nxt not in state:
                visit(nxt)
        path.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)
    assert cycles == [], "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_the_cycle_check_sees_package_relative_and_lazy_imports() -> None:
    graph = _graph()
    assert "edgephi.engine.types" in graph["edgephi.engine.protocol"]
    assert "edgephi.engine.vllm" in graph["edgephi.daemon"]  # imported lazily, inside a function


def test_only_the_grpc_door_and_its_clients_import_grpc() -> None:
    users = _external("grpc") | _external("grpc_health") | _external("grpc_reflection")
    assert {m for m in users if not _allowed(m, GRPC_ALLOWED)} == set()
    assert "edgephi.grpc_door.servicer" in users  # the check sees real imports


def test_only_the_engine_adapter_imports_vllm() -> None:
    users = _external("vllm")
    assert {m for m in users if not _allowed(m, VLLM_ALLOWED)} == set()
    assert "edgephi.engine.vllm" in users


def test_production_code_does_not_import_the_dev_stand_in() -> None:
    users = _external("edgephi.devmodel")
    assert {m for m in users if not _allowed(m, DEVMODEL_USERS)} == set()


def test_the_unit_tier_never_imports_vllm(request: pytest.FixtureRequest) -> None:
    items = request.session.items
    if any("tests/unit/" not in str(item.path).replace("\\", "/") for item in items):
        pytest.skip("other tiers in this session import vLLM; run `make test-unit` for this check")
    assert not [m for m in sys.modules if m == "vllm" or m.startswith("vllm.")]
