"""Executors run a model description: `reference` (PyTorch ops, any device) and
`graph` (CUDA tile kernels in one CUDA graph); `persistent` comes later.

Importing this package stays light (no torch) so the command line can list
the executors without loading PyTorch."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

from tilert.engine.cuda.limits import (
    ATTENTION_HEAD_DIMS,
    ATTENTION_MAX_GROUP,
    FP8_BLOCK,
    MLA_LATENT,
    MLA_ROPE,
    attention_supported,
)

EXECUTORS = ("reference", "graph")


def graph_unsupported(model: Any, device: str, dtype: str = "bfloat16") -> str | None:
    """Why the graph executor cannot run `model` on `device` in `dtype`, or None if it can.

    Config-level checks only (no weights read), so the server can refuse
    before it starts a worker; the kernels' bindings check every tensor again
    when the step is built."""
    if not str(device).startswith("cuda"):
        return "the graph executor runs on CUDA only (--device cuda)"
    if dtype not in ("bfloat16", "torch.bfloat16"):
        return f"the graph executor runs bfloat16 only, not {dtype}"
    if model.family == "llama":
        _, heads, head_dim = model.buffers["q"]
        kv_heads = next(iter(model.caches.values()))[0]
        if heads % kv_heads or not attention_supported(head_dim, heads // kv_heads):
            dims = " or ".join(map(str, ATTENTION_HEAD_DIMS))
            return (
                f"the decode attention kernel takes head_dim {dims} with 1.."
                f"{ATTENTION_MAX_GROUP} query heads per kv head, not head_dim {head_dim} "
                f"with {heads} heads over {kv_heads}"
            )
        return None
    if model.family != "deepseek_v3":
        return f"the graph executor has no kernels for the {model.family!r} family"
    c = model.config
    q = c.get("quantization_config") or {}
    if q.get("quant_method") != "fp8" or list(q.get("weight_block_size") or []) != [FP8_BLOCK] * 2:
        return (
            "the graph executor runs DeepSeek FP8 checkpoints (e4m3, 128x128 block "
            "scales, the released format); this one is not"
        )
    lora, rope = c.get("kv_lora_rank"), c.get("qk_rope_head_dim")
    if (lora, rope) != (MLA_LATENT, MLA_ROPE):
        return (
            f"the MLA decode kernel is built for kv_lora_rank {MLA_LATENT} and "
            f"qk_rope_head_dim {MLA_ROPE}, not {lora} and {rope}"
        )
    return None


def make_executor(name: str, model: Any, tensors: Any, device: str, dtype: torch.dtype) -> Any:
    if name == "reference":
        from tilert.engine.executors.reference import ReferenceExecutor

        return ReferenceExecutor(model, tensors, device=device, dtype=dtype)
    if name == "graph":
        from tilert.engine.executors.graph import GraphExecutor

        return GraphExecutor(model, tensors, device=device, dtype=dtype)
    raise ValueError(f"unknown executor {name!r}; choose from {', '.join(EXECUTORS)}")
