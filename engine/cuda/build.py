"""Builds csrc/*.cu into one shared library, on first use, cached on disk.

The cache key is a hash of every source under csrc/, the flags and the output
of `nvcc --version`, so an edit or a compiler change rebuilds and nothing stale
is ever loaded. Objects compile in parallel; the library is installed by atomic
rename, so concurrent processes never load a half-written file.

Environment:
  TILERT_CACHE       cache folder (default ~/.cache/tilert)
  TILERT_NVCC        the nvcc to use (default: nvcc on PATH, else $CUDA_HOME/bin/nvcc)
  TILERT_DUMP_SASS=1 also writes the library's SASS next to it (<lib>.sass)
  TILERT_KERNELS_LIB a library built ahead of time (`build.py --out PATH`), loaded
                     as is: images without a compiler (the container) use this

The library is loaded with ctypes: extern "C" launch functions take raw device
pointers and a cudaStream_t, so no PyTorch C++ headers are compiled (fast builds)
and the launches can be captured into CUDA graphs. It links the CUDA runtime
statically and never links libcuda (the driver is found at run time).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ARCH_FLAGS = ("-gencode", "arch=compute_90a,code=sm_90a")
NVCC_FLAGS = (
    "-O3",
    "-std=c++17",
    *ARCH_FLAGS,
    "-lineinfo",
    "-Xptxas",
    "-v,--warn-on-spills",
    "-Xcompiler",
    "-fPIC",
)

_lock = threading.Lock()
_lib: ctypes.CDLL | None = None


class BuildError(RuntimeError):
    pass


def source_dir() -> Path:
    # engine/cuda/build.py -> repository root -> csrc/
    d = Path(__file__).resolve().parents[2] / "csrc"
    if not d.is_dir():
        raise BuildError(f"{d}: CUDA sources not found (install the repository editable)")
    return d


def sources() -> list[Path]:
    d = source_dir()
    return sorted(p for p in d.iterdir() if p.suffix in (".cu", ".cuh", ".h"))


def nvcc() -> str:
    explicit = os.environ.get("TILERT_NVCC")
    if explicit:
        return explicit
    found = shutil.which("nvcc")
    if found:
        return found
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH") or "/usr/local/cuda"
    candidate = os.path.join(home, "bin", "nvcc")
    if os.path.exists(candidate):
        return candidate
    raise BuildError("nvcc not found: put it on PATH or set TILERT_NVCC")


def cache_dir() -> Path:
    d = Path(os.environ.get("TILERT_CACHE") or Path.home() / ".cache" / "tilert")
    d.mkdir(parents=True, exist_ok=True)
    return d


def cache_key(compiler: str) -> str:
    h = hashlib.sha256()
    for p in sources():
        h.update(p.name.encode())
        h.update(p.read_bytes())
    h.update(" ".join(NVCC_FLAGS).encode())
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True).stdout
    h.update(version.encode())
    return h.hexdigest()[:20]


def compile_object(compiler: str, src: Path, obj: Path) -> str:
    """nvcc -c one file; returns its log (ptxas register/spill report)."""
    cmd = [compiler, *NVCC_FLAGS, "-c", str(src), "-o", str(obj)]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise BuildError(f"nvcc failed on {src.name}:\n{' '.join(cmd)}\n{r.stdout}{r.stderr}")
    return r.stdout + r.stderr


def library_path() -> Path:
    """Path of the built library, building it if the cache lacks it."""
    prebuilt = os.environ.get("TILERT_KERNELS_LIB")
    if prebuilt:
        if not os.path.isfile(prebuilt):
            raise BuildError(f"TILERT_KERNELS_LIB={prebuilt} does not exist")
        return Path(prebuilt)
    compiler = nvcc()
    out = cache_dir() / f"libtilert_{cache_key(compiler)}.so"
    if out.exists():
        if os.environ.get("TILERT_DUMP_SASS") == "1":
            _dump_sass(compiler, out)
        return out
    units = [p for p in sources() if p.suffix == ".cu"]
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=".build-") as tmp:
        objs = [Path(tmp) / (p.stem + ".o") for p in units]
        with ThreadPoolExecutor(max_workers=max(1, min(len(units), os.cpu_count() or 1))) as pool:
            pairs = zip(units, objs, strict=True)
            logs = list(pool.map(lambda a: compile_object(compiler, *a), pairs))
        lib_tmp = Path(tmp) / out.name
        cmd = [compiler, "-shared", *ARCH_FLAGS, "-o", str(lib_tmp), *map(str, objs)]
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode != 0:
            raise BuildError(f"link failed:\n{' '.join(cmd)}\n{r.stdout}{r.stderr}")
        log_tmp = Path(tmp) / "build.log"
        log_tmp.write_text("\n".join(logs))
        os.replace(log_tmp, out.parent / (out.name + ".log"))
        os.replace(lib_tmp, out)  # atomic: readers see no file or the whole file
    if os.environ.get("TILERT_DUMP_SASS") == "1":
        _dump_sass(compiler, out)
    return out


def _dump_sass(compiler: str, lib_path: Path) -> None:
    sass_path = lib_path.parent / (lib_path.name + ".sass")
    if sass_path.exists():
        return
    cuobjdump = Path(compiler).with_name("cuobjdump")
    r = subprocess.run([str(cuobjdump), "-sass", str(lib_path)], capture_output=True, text=True)
    tmp = sass_path.with_suffix(f".sass.{os.getpid()}")
    tmp.write_text(r.stdout + r.stderr)
    os.replace(tmp, sass_path)


def load() -> ctypes.CDLL:
    """The loaded library (built on first call in this process)."""
    global _lib
    with _lock:
        if _lib is None:
            _lib = ctypes.CDLL(str(library_path()))
        return _lib


def main(argv: list[str] | None = None) -> None:
    """`python build.py [--out PATH]`: builds (or finds) the library and prints
    its path; with --out, also copies it there (atomically)."""
    import argparse

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--out", help="copy the built library to this path")
    args = parser.parse_args(argv)
    path = library_path()
    if args.out:
        tmp = f"{args.out}.tmp"
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        shutil.copyfile(path, tmp)
        os.replace(tmp, args.out)
        path = Path(args.out)
    print(path)


if __name__ == "__main__":
    main()
