"""Hatch build hook: generate the gRPC/protobuf stubs from ``protos/`` at build time.

The stubs are not committed (as in TGI's ``server/``); every wheel or editable install regenerates them
with grpcio-tools, so they always match the ``.proto`` files.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

try:
    from hatchling.builders.hooks.plugin.interface import BuildHookInterface
except ImportError:  # `python hatch_build.py` (make proto) in a venv without hatchling
    BuildHookInterface = object  # type: ignore[assignment,misc]


def generate(root: Path) -> list[Path]:
    """Compile every ``protos/edgephi/v1/*.proto`` into ``edgephi/v1/`` (``_pb2``, ``_pb2_grpc``, ``.pyi``)."""
    import grpc_tools
    from grpc_tools import protoc

    protos = root / "protos"
    files = sorted(str(p.relative_to(protos)) for p in (protos / "edgephi" / "v1").glob("*.proto"))
    include = str(Path(grpc_tools.__file__).parent / "_proto")
    args = [
        "protoc",
        f"-I{protos}",
        f"-I{include}",
        f"--python_out={root}",
        f"--pyi_out={root}",
        f"--grpc_python_out={root}",
        *files,
    ]
    if protoc.main(args) != 0:
        raise RuntimeError(f"protoc failed: {' '.join(args)}")
    return sorted((root / "edgephi" / "v1").glob("*_pb2*.py*"))


class ProtoBuildHook(BuildHookInterface):  # type: ignore[type-arg]
    PLUGIN_NAME = "custom"

    def initialize(self, version: str, build_data: dict[str, Any]) -> None:
        generate(Path(self.root))


if __name__ == "__main__":
    for path in generate(Path(__file__).resolve().parent):
        print(path)
