"""CUDA tile kernels (csrc/) for the graph executor: the build and the bindings.

`build.load()` compiles csrc/*.cu on first use into one shared library cached by
a hash of sources, flags and compiler; `kernels` checks every tensor and turns a
call into a `Launch` that can run eagerly or inside a CUDA graph capture.
"""
