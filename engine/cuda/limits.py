"""Shapes the csrc/ kernels are built for, readable without importing torch
(the server checks a model against them before it starts a worker)."""

MLA_LATENT = 512  # kv_lora_rank: csrc/mla.cuh kMlaLatent
MLA_ROPE = 64  # qk_rope_head_dim: csrc/mla.cuh kMlaRope
FP8_BLOCK = 128  # rows and columns per FP8 scale: csrc/fp8_gemv.cuh kFp8Block
ATTENTION_HEAD_DIMS = (
    64,
    128,
)  # GQA decode attention: csrc/attention.cu tilert_attention_supported
ATTENTION_MAX_GROUP = 8  # query heads per kv head, likewise


def attention_supported(head_dim: int, group: int) -> bool:
    """The rule of csrc/attention.cu tilert_attention_supported (CI compares the two)."""
    return head_dim in ATTENTION_HEAD_DIMS and 1 <= group <= ATTENTION_MAX_GROUP
