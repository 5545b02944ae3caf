"""Every csrc/*.cu compiles for sm_90a (no GPU needed; skipped without nvcc).

Files compile in parallel with the same flags as the runtime build, so a
compile error is caught in CI before any GPU run."""

from __future__ import annotations

import os
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor

import pytest

from tilert.engine.cuda import build

pytestmark = pytest.mark.skipif(
    shutil.which("nvcc") is None and not os.environ.get("TILERT_NVCC"), reason="nvcc not on PATH"
)


def test_every_cu_compiles_for_sm90a(tmp_path, monkeypatch):
    units = [p for p in build.sources() if p.suffix == ".cu"]
    assert units, "no .cu files under csrc/"
    compiler = build.nvcc()

    def one(src):
        return build.compile_object(compiler, src, tmp_path / (src.stem + ".o"))

    with ThreadPoolExecutor(max_workers=max(2, os.cpu_count() or 2)) as pool:
        logs = list(pool.map(one, units))
    spills = [
        line
        for log in logs
        for line in log.splitlines()
        if "spill" in line and not line.strip().startswith("0 bytes")
    ]
    spills = [s for s in spills if " 0 bytes spill stores, 0 bytes spill loads" not in s]
    assert not spills, "register spills:\n" + "\n".join(spills)
    r = subprocess.run(
        [
            compiler,
            "-shared",
            *build.ARCH_FLAGS,
            "-o",
            str(tmp_path / "lib.so"),
            *[str(tmp_path / (u.stem + ".o")) for u in units],
        ],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr
    # The linked library loads without a GPU; the host's view of the structs it
    # shares with C++ (SampleConfig's size and field offsets) must match.
    monkeypatch.setenv("TILERT_KERNELS_LIB", str(tmp_path / "lib.so"))
    from tilert.engine.cuda import kernels

    monkeypatch.setattr(kernels, "_lib", None)
    monkeypatch.setattr(build, "_lib", None)
    lib = kernels.lib()
    # The server's up-front check of the attention shapes follows the kernel's rule.
    from tilert.engine.cuda.limits import attention_supported

    for head_dim in range(8, 264, 8):
        for group in range(0, 17):
            c_rule = bool(lib.tilert_attention_supported(head_dim, group))
            assert attention_supported(head_dim, group) == c_rule, (head_dim, group)
    check_gemv_tiling_choices()  # on the library loaded above


H100_SHARED_PER_SM = 233472  # bytes with the largest carve-out (H200 the same)
TILING_SHAPES = [
    *[(2048, 1536), (2048, 8192), (8192, 1024), (2048, 64128)],  # Llama-3.2-1B
    *[(576, 288), (576, 24576), (2056, 515)],  # SmolLM2-135M, an odd K
]


def check_gemv_tiling_choices() -> None:
    """The host's tiling choice (kernels.gemv_tiling) weighed by the library's own
    launch rule (tilert_gemv_plan_for, the one the launcher uses) for an H100 SM."""
    from tilert.engine.cuda import kernels
    from tilert.engine.cuda.kernels import gemv_plan_for, gemv_tiling

    def h100_plan(k: int, pairs: int):
        return lambda ppt, ksplit, blocks: gemv_plan_for(
            k, pairs, ppt, ksplit, blocks, H100_SHARED_PER_SM
        )

    for k, pairs in TILING_SHAPES:
        plan = h100_plan(k, pairs)
        what = f"K={k} pairs={pairs}"
        ppt, ksplit = gemv_tiling(k, "store", pairs, 132, plan=plan)
        assert ksplit in (1, 2, 4, 8) and ppt * ksplit <= 256 and (ppt * ksplit) % 8 == 0, what
        # When the GEMV lets the next kernel launch is the one-item tiling's.
        one_late = plan(8, 1, min(-(-pairs // 8), 132))[1]
        tiles = -(-pairs // ppt)
        assert plan(ppt, ksplit, min(tiles, 132))[1] == one_late, what
        if ppt * ksplit > 8 and ksplit > 1:  # several K parts a warp: one tile a block, early
            assert tiles <= 132 and not one_late, what
        elif ppt * ksplit > 8:  # several whole rows a warp: rows shorter than a tile's end
            assert -(-k // 8 // 32) < 8, what
        if k <= 1024 and pairs >= 8 * 132 * 2:  # short rows, many tiles: merged
            assert ppt * ksplit > 8, what
    # Llama-3.2-1B's qkv: 128 tiles of 12 pairs in K halves, not 192 of 8 whole pairs.
    assert gemv_tiling(2048, "store", 1536, 132, plan=h100_plan(2048, 1536)) == (12, 2)

    # Which GEMVs read weights past their rings (64 KB a block) after their
    # wait: the graph executor holds o_proj's fill only behind a qkv that does not.
    after_wait = kernels.lib().tilert_gemv_loads_after_wait
    assert after_wait(2048, 1536, 12, 128)  # Llama-3.2-1B qkv: 96 KB a block
    assert not after_wait(2048, 1024, 8, 128)  # its o_proj: exactly one ring
    assert after_wait(8192, 1024, 8, 128)  # its down: 256 KB a block
    k, pairs = 576, (9 + 2 * 3) * 64 // 2  # SmolLM2's qkv: every GEMV fits its rings
    ppt, ksplit = gemv_tiling(k, "rope_kv", pairs, 132, head_dim=64, plan=h100_plan(k, pairs))
    blocks, _ = h100_plan(k, pairs)(ppt, ksplit, min(-(-pairs // ppt), 132))
    assert not after_wait(k, pairs, ppt, blocks)
    assert not after_wait(2048, 1536, 12, 0) and not after_wait(2048, 1536, 0, 128)

    # The attention's splits of a kv head: about one block an SM, one a 64
    # positions (head dim 64) while there are splits to spare.
    splits = kernels.attention_splits(131072, 8, 132)  # Llama-3.2-1B on an H100
    assert splits == 17 and kernels.attention_splits(131072, 3, 132) == 44
    assert kernels.attention_splits(100, 8, 132) == 7  # none shorter than 16 positions
    active = kernels.attention_active_splits
    assert [active(n, 64, splits) for n in (1, 64, 65, 1025, 1088, 1089, 9999)] == [
        1,
        1,
        2,
        17,
        17,
        17,
        17,
    ]
    assert [active(n, 128, 5) for n in (32, 33, 128, 129, 4000)] == [1, 2, 4, 5, 5]
    with pytest.raises(ValueError):
        active(0, 64, splits)
    with pytest.raises(ValueError):
        active(100, 96, splits)


def test_prebuilt_library_needs_no_compiler(tmp_path, monkeypatch):
    """Images without nvcc load the library named by TILERT_KERNELS_LIB."""
    from tilert.engine.cuda import build

    def no_nvcc() -> str:
        raise AssertionError("nvcc must not be needed")

    monkeypatch.setattr(build, "nvcc", no_nvcc)
    lib = tmp_path / "libtilert.so"
    monkeypatch.setenv("TILERT_KERNELS_LIB", str(lib))
    with pytest.raises(build.BuildError):
        build.library_path()
    lib.write_bytes(b"\x7fELF")
    assert build.library_path() == lib
