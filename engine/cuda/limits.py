"""Shapes the csrc/ kernels are built for, readable without importing torch
(the server checks a model against them before it starts a worker)."""

MLA_LATENT = 512  # kv_lora_rank: csrc/mla.cuh kMlaLatent
MLA_ROPE = 64  # qk_rope_head_dim: csrc/mla.cuh kMlaRope
FP8_BLOCK = 128  # rows and columns per FP8 scale: csrc/fp8_gemv.cuh kFp8Block
