"""Regenerate the committed gRPC stubs from the repository's proto files.

    python -m tilert_client._codegen            # rewrites client/tilert_client/_proto
    python -m tilert_client._codegen --out DIR  # writes DIR/tilert_client/_proto/...

The protos are mapped under the import prefix ``tilert_client/_proto`` so that the
generated modules import each other as ``tilert_client._proto.tilert.v1...``: the
stubs live inside this distribution and never claim a top-level ``tilert`` package,
which belongs to the server distribution.

Needs the pinned ``codegen`` extra (grpcio-tools, mypy-protobuf); the installed
client itself never imports this module.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

IMPORT_PREFIX = "tilert_client/_proto"
_PACKAGE_ROOT = Path(__file__).resolve().parent
# client/tilert_client/_codegen.py -> the repository root holds proto/.
DEFAULT_PROTO_ROOT = _PACKAGE_ROOT.parents[1] / "proto"
DEFAULT_OUT = _PACKAGE_ROOT.parent
GENERATED_SUFFIXES = ("_pb2.py", "_pb2_grpc.py", "_pb2.pyi")
REGENERATE_HINT = "cd client && python -m tilert_client._codegen"


def _mypy_plugin() -> str:
    # protoc looks plugins up on PATH; a venv used without activation has its
    # scripts only next to the interpreter, so look there too.
    found = shutil.which("protoc-gen-mypy")
    if found:
        return found
    beside = Path(sys.executable).parent / "protoc-gen-mypy"
    if beside.exists():
        return str(beside)
    raise RuntimeError("protoc-gen-mypy not found: pip install 'tilert-client[codegen]'")


def generated_files(out: Path) -> list[Path]:
    """Every file this script owns under ``out`` (generated modules and __init__.py)."""
    root = out / IMPORT_PREFIX
    if not root.exists():
        return []
    return sorted(
        p
        for p in root.rglob("*")
        if p.is_file() and (p.name == "__init__.py" or p.name.endswith(GENERATED_SUFFIXES))
    )


def generate(out: Path = DEFAULT_OUT, proto_root: Path = DEFAULT_PROTO_ROOT) -> list[Path]:
    """Write the stubs for every ``*.proto`` under ``proto_root``; returns the files."""
    from grpc_tools import protoc  # deferred: only a dev dependency

    protos = sorted(proto_root.rglob("*.proto"))
    if not protos:
        raise RuntimeError(f"no .proto files under {proto_root}")
    # Remove what a previous run wrote so a deleted or renamed proto cannot leave
    # a stale module behind.
    for old in generated_files(out):
        old.unlink()
    out.mkdir(parents=True, exist_ok=True)
    well_known = Path(protoc.__file__).resolve().parent / "_proto"
    args = [
        "grpc_tools.protoc",
        f"-I{IMPORT_PREFIX}={proto_root}",
        f"-I{well_known}",
        f"--plugin=protoc-gen-mypy={_mypy_plugin()}",
        f"--python_out={out}",
        f"--grpc_python_out={out}",
        f"--mypy_out={out}",
        *(str(p) for p in protos),
    ]
    if protoc.main(args) != 0:
        raise RuntimeError("protoc failed: " + " ".join(args))
    # Namespace packages would work for imports but not for setuptools' package
    # discovery, so every generated folder gets an explicit (empty) __init__.py.
    root = out / IMPORT_PREFIX
    for folder in [root, *(p for p in root.rglob("*") if p.is_dir())]:
        if folder.name != "__pycache__":
            (folder / "__init__.py").touch()
    return generated_files(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output root")
    parser.add_argument("--proto-root", type=Path, default=DEFAULT_PROTO_ROOT)
    ns = parser.parse_args(argv)
    for path in generate(ns.out, ns.proto_root):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
