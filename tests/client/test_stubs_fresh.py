"""The committed stubs must be exactly what the proto generates today, and the
client's dependency floors must satisfy the versions those stubs demand."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tilert_client import _codegen

CLIENT_DIR = Path(_codegen.__file__).resolve().parents[1]
COMMITTED_ROOT = CLIENT_DIR
STALE_HINT = (
    f"generated stubs are stale; regenerate them with `{_codegen.REGENERATE_HINT}` "
    "(with the pinned tools: pip install -e 'client[codegen]') and commit the result"
)


@pytest.fixture(scope="module")
def fresh(tmp_path_factory) -> Path:
    pytest.importorskip("grpc_tools", reason="needs grpcio-tools to regenerate")
    out = tmp_path_factory.mktemp("stubs")
    _codegen.generate(out)
    return out


def _relative(files: list[Path], root: Path) -> dict[str, Path]:
    return {str(p.relative_to(root)): p for p in files}


def test_committed_stubs_match_the_proto(fresh: Path) -> None:
    committed = _relative(_codegen.generated_files(COMMITTED_ROOT), COMMITTED_ROOT)
    expected = _relative(_codegen.generated_files(fresh), fresh)
    assert expected, "codegen produced nothing"
    assert sorted(committed) == sorted(expected), STALE_HINT
    for name, path in expected.items():
        assert committed[name].read_bytes() == path.read_bytes(), f"{name}: {STALE_HINT}"


def _floor(requirement: str, dependencies: list[str]) -> tuple[int, ...]:
    for dep in dependencies:
        m = re.fullmatch(rf"{re.escape(requirement)}\s*>=\s*([0-9.]+)", dep.strip())
        if m:
            return tuple(int(x) for x in m.group(1).split("."))
    raise AssertionError(f"client/pyproject.toml declares no `{requirement}>=` floor")


def test_dependency_floors_cover_the_generated_code() -> None:
    tomllib = pytest.importorskip("tomllib")
    deps = tomllib.loads((CLIENT_DIR / "pyproject.toml").read_text())["project"]["dependencies"]
    v1 = COMMITTED_ROOT / _codegen.IMPORT_PREFIX / "tilert" / "v1"
    grpc_file = (v1 / "text_generation_pb2_grpc.py").read_text()
    pb_file = (v1 / "text_generation_pb2.py").read_text()
    grpc_needed = re.search(r"GRPC_GENERATED_VERSION = '([0-9.]+)'", grpc_file)
    pb_needed = re.search(r"Protobuf Python Version: ([0-9.]+)", pb_file)
    assert grpc_needed and pb_needed, "generated header format changed; update this test"
    # The stubs raise at import time on older runtimes, so an install that
    # satisfies pyproject but not the stubs would be broken.
    assert _floor("grpcio", deps) >= tuple(int(x) for x in grpc_needed.group(1).split("."))
    assert _floor("protobuf", deps) >= tuple(int(x) for x in pb_needed.group(1).split("."))
