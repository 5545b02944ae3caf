"""The DeepSeek-V3 family: DeepSeek-V3 (model_type deepseek_v3) and V3.2 (deepseek_v32).

Per layer: RMSNorm, multi-head latent attention (low-rank q through
q_a/q_b with q_a_layernorm, or a plain q_proj; a compressed kv latent with a
shared rope key), then a dense SwiGLU MLP for the first first_k_dense_replace
layers and a routed MoE with shared experts after. V3.2 adds the lightning
indexer, which restricts each query to its top index_topk positions.

Prefill attends in the expanded form, decode in the absorbed one (see
ops/mla.py). FP8 checkpoints keep their e4m3 matrices and 128x128 block scales
as they are; the ops dequantize. The optional multi-token-prediction layer
(weights model.layers.{num_hidden_layers}.*) is described as the separate op
list `mtp`, a draft head for speculative decoding.
"""

from __future__ import annotations

import math
from typing import Any

from tilert.engine.errors import CheckpointError
from tilert.engine.models.base import ModelDescription, Op, config_get
from tilert.engine.ops.fp8 import SCALE_SUFFIX, scale_shape
from tilert.engine.rope import rope_parameters

MODEL_TYPES = ("deepseek_v3", "deepseek_v32")


def softmax_scale(config: dict[str, Any], qk_head_dim: int) -> float:
    """1/sqrt(d), times YaRN's mscale squared when the rope is scaled.

    Same rule as transformers' yarn_apply_mscale (and DeepSeek's release):
    any non-default rope type with a truthy mscale_all_dim multiplies by
    (0.1 * mscale_all_dim * ln(factor) + 1)^2, 1 when factor <= 1.
    """
    scale = qk_head_dim**-0.5
    params = rope_parameters(config)
    mscale_all = params.get("mscale_all_dim") or 0
    if params["rope_type"] != "default" and mscale_all:
        factor = float(params["factor"])
        m = 1.0 if factor <= 1 else 0.1 * float(mscale_all) * math.log(factor) + 1.0
        scale *= m * m
    return scale


def _int(config: dict[str, Any], key: str, default: int | None = None) -> int:
    value = config.get(key, default)
    if value is None:
        raise CheckpointError(f"config: field {key!r} is missing")
    try:
        return int(value)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"config: field {key!r} is not an integer ({value!r})") from e


class _Builder:
    """Collects ops and expected tensor shapes for one model."""

    def __init__(self, config: dict[str, Any], positions: int) -> None:
        c = config
        self.config = c
        self.v32 = c["model_type"] == "deepseek_v32"
        self.positions = positions
        self.hidden = _int(c, "hidden_size")
        self.layers = _int(c, "num_hidden_layers")
        self.heads = _int(c, "num_attention_heads")
        self.vocab = _int(c, "vocab_size")
        self.inter = _int(c, "intermediate_size")
        self.moe_inter = _int(c, "moe_intermediate_size")
        self.n_experts = _int(c, "n_routed_experts")
        self.n_shared = _int(c, "n_shared_experts", 0)
        self.top_k = _int(c, "num_experts_per_tok")
        self.n_group = _int(c, "n_group", 1)
        self.topk_group = _int(c, "topk_group", 1)
        q_lora = c.get("q_lora_rank")
        self.q_lora = None if q_lora is None else _int(c, "q_lora_rank")
        self.kv_lora = _int(c, "kv_lora_rank")
        self.nope = _int(c, "qk_nope_head_dim")
        self.rope = _int(c, "qk_rope_head_dim")
        self.v = _int(c, "v_head_dim")
        self.eps = float(config_get(c, "rms_norm_eps", default=1e-6))
        self.first_dense = _int(c, "first_k_dense_replace", 0)
        self.mlp_types = c.get("mlp_layer_types")
        self.tied = bool(c.get("tie_word_embeddings", False))
        # V3.2 in transformers always interleaves; V3 follows rope_interleave.
        self.interleave = True if self.v32 else bool(c.get("rope_interleave", True))
        self.scale = softmax_scale(c, self.nope + self.rope)
        self.mtp_layers = _int(c, "num_nextn_predict_layers", 0)
        self._check()
        self.block = self._fp8_block()
        self.shapes: dict[str, tuple[int, ...]] = {}
        if self.v32:
            self.index_heads = _int(c, "index_n_heads")
            self.index_dim = _int(c, "index_head_dim")
            self.index_topk = _int(c, "index_topk")
            if self.index_dim < self.rope:
                raise CheckpointError(
                    f"config: index_head_dim {self.index_dim} is smaller than "
                    f"qk_rope_head_dim {self.rope}"
                )

    def _check(self) -> None:
        c = self.config
        if c.get("attention_bias"):
            raise CheckpointError("config: attention_bias=true is not supported")
        if c.get("hidden_act", "silu") != "silu":
            raise CheckpointError(f"config: hidden_act {c.get('hidden_act')!r} is not supported")
        if self.v32 and self.q_lora is None:
            raise CheckpointError("config: q_lora_rank is required for deepseek_v32 (the indexer)")
        if self.n_experts % self.n_group:
            raise CheckpointError(
                f"config: n_routed_experts {self.n_experts} is not a multiple of "
                f"n_group {self.n_group}"
            )
        if self.n_group > 1 and self.n_experts // self.n_group < 2:
            raise CheckpointError("config: group routing needs at least 2 experts per group")
        if not 1 <= self.topk_group <= self.n_group:
            raise CheckpointError(f"config: topk_group {self.topk_group} not in [1, n_group]")
        if self.top_k > self.n_experts // self.n_group * self.topk_group:
            raise CheckpointError(
                f"config: num_experts_per_tok {self.top_k} exceeds the experts of topk_group groups"
            )
        if self.rope % 2:
            raise CheckpointError(f"config: qk_rope_head_dim {self.rope} is odd")

    def _fp8_block(self) -> tuple[int, int] | None:
        q = self.config.get("quantization_config")
        if not q:
            return None
        method = q.get("quant_method")
        if method != "fp8":
            raise CheckpointError(
                f"config: quantization_config.quant_method {method!r} is not supported"
            )
        if q.get("fmt", "e4m3") != "e4m3":
            raise CheckpointError(
                f"config: quantization_config.fmt {q.get('fmt')!r} is not supported"
            )
        block = q.get("weight_block_size")
        if not (isinstance(block, list) and len(block) == 2):
            raise CheckpointError(
                "config: quantization_config.weight_block_size must be [rows, cols]"
            )
        return int(block[0]), int(block[1])

    # ------------------------------------------------------------ tensors
    def tensor(self, name: str, *shape: int) -> str:
        self.shapes[name] = tuple(shape)
        return name

    def matrix(self, name: str, out: int, inp: int, quantized: bool = True) -> tuple[str, ...]:
        """A [out, in] projection and, in an FP8 checkpoint, its block scales."""
        names = (self.tensor(f"{name}.weight", out, inp),)
        if self.block and quantized:
            names += (
                self.tensor(f"{name}.weight{SCALE_SUFFIX}", *scale_shape((out, inp), self.block)),
            )
        return names

    def is_dense(self, i: int) -> bool:
        if self.mlp_types is not None and i < len(self.mlp_types):
            return self.mlp_types[i] == "dense"
        return i < self.first_dense

    # ----------------------------------------------------------------- ops
    def layer(self, i: int, cache: str, mode: str) -> list[Op]:
        """One decoder layer over the residual stream x; `cache` prefixes its caches."""
        pre, at = f"model.layers.{i}", f"model.layers.{i}.self_attn"
        h, heads, qk = self.hidden, self.heads, self.nope + self.rope
        fp8 = {"block": self.block} if self.block else {}
        ops = [
            Op(
                f"{cache}.attn_norm",
                "rmsnorm",
                ("x",),
                ("h",),
                (self.tensor(f"{pre}.input_layernorm.weight", h),),
                {"eps": self.eps},
            )
        ]
        if self.q_lora is None:
            ops.append(
                Op(
                    f"{cache}.q",
                    "qlinear",
                    ("h",),
                    ("q",),
                    self.matrix(f"{at}.q_proj", heads * qk, h),
                    fp8,
                )
            )
        else:
            ops += [
                Op(
                    f"{cache}.q_a",
                    "qlinear",
                    ("h",),
                    ("q_a",),
                    self.matrix(f"{at}.q_a_proj", self.q_lora, h),
                    fp8,
                ),
                Op(
                    f"{cache}.q_a_norm",
                    "rmsnorm",
                    ("q_a",),
                    ("q_lat",),
                    (self.tensor(f"{at}.q_a_layernorm.weight", self.q_lora),),
                    {"eps": self.eps},
                ),
                Op(
                    f"{cache}.q_b",
                    "qlinear",
                    ("q_lat",),
                    ("q",),
                    self.matrix(f"{at}.q_b_proj", heads * qk, self.q_lora),
                    fp8,
                ),
            ]
        latent_cache, rope_cache = f"{cache}.kv_latent", f"{cache}.k_rope"
        caches = {"latent_cache": latent_cache, "rope_cache": rope_cache}
        dims = {"heads": heads, "nope": self.nope, "rope": self.rope, "kv_lora": self.kv_lora}
        ops += [
            Op(
                f"{cache}.kv_a",
                "qlinear",
                ("h",),
                ("kv",),
                self.matrix(f"{at}.kv_a_proj_with_mqa", self.kv_lora + self.rope, h),
                fp8,
            ),
            Op(
                f"{cache}.rope",
                "mla_rope_cache",
                ("q", "kv"),
                ("qh",),
                (self.tensor(f"{at}.kv_a_layernorm.weight", self.kv_lora),),
                {
                    **dims,
                    **caches,
                    "eps": self.eps,
                    "interleave": self.interleave,
                    "config": self.config,
                    "max_positions": self.positions,
                },
            ),
        ]
        attn_inputs: tuple[str, ...] = ("qh",)
        if self.v32:
            ix = f"{at}.indexer"
            names = (
                *self.matrix(f"{ix}.wq_b", self.index_heads * self.index_dim, self.q_lora),
                *self.matrix(f"{ix}.wk", self.index_dim, h),
                self.tensor(f"{ix}.k_norm.weight", self.index_dim),
                self.tensor(f"{ix}.k_norm.bias", self.index_dim),
                *self.matrix(f"{ix}.weights_proj", self.index_heads, h, quantized=False),
            )
            ops.append(
                Op(
                    f"{cache}.indexer",
                    "lightning_indexer",
                    ("h", "q_lat"),
                    ("sel",),
                    names,
                    {
                        **fp8,
                        "prefix": ix,
                        "heads": self.index_heads,
                        "head_dim": self.index_dim,
                        "rope": self.rope,
                        "topk": self.index_topk,
                        "cache": f"{cache}.index_k",
                        "config": self.config,
                        "max_positions": self.positions,
                    },
                )
            )
            attn_inputs = ("qh", "sel")
        ops += [
            Op(
                f"{cache}.attn",
                "mla_attention",
                attn_inputs,
                ("attn",),
                self.matrix(f"{at}.kv_b_proj", heads * (self.nope + self.v), self.kv_lora),
                {**fp8, **dims, **caches, "v": self.v, "scale": self.scale, "mode": mode},
            ),
            Op(
                f"{cache}.o_proj",
                "qlinear",
                ("attn", "x"),
                ("x",),
                self.matrix(f"{at}.o_proj", h, heads * self.v),
                fp8,
            ),
            Op(
                f"{cache}.mlp_norm",
                "rmsnorm",
                ("x",),
                ("h",),
                (self.tensor(f"{pre}.post_attention_layernorm.weight", h),),
                {"eps": self.eps},
            ),
        ]
        mlp = f"{pre}.mlp"
        if self.is_dense(i):
            names = tuple(
                n for p, o, k in self._swiglu(f"{mlp}", self.inter) for n in self.matrix(p, o, k)
            )
            ops.append(
                Op(f"{cache}.mlp", "swiglu_mlp", ("h", "x"), ("x",), names, {**fp8, "prefix": mlp})
            )
        else:
            names = [
                self.tensor(f"{mlp}.gate.weight", self.n_experts, h),
                self.tensor(f"{mlp}.gate.e_score_correction_bias", self.n_experts),
            ]
            for e in range(self.n_experts):
                for p, o, k in self._swiglu(f"{mlp}.experts.{e}", self.moe_inter):
                    names += self.matrix(p, o, k)
            if self.n_shared:
                for p, o, k in self._swiglu(
                    f"{mlp}.shared_experts", self.moe_inter * self.n_shared
                ):
                    names += self.matrix(p, o, k)
            ops.append(
                Op(
                    f"{cache}.moe",
                    "moe",
                    ("h", "x"),
                    ("x",),
                    tuple(names),
                    {
                        **fp8,
                        "prefix": mlp,
                        "n_experts": self.n_experts,
                        "n_shared": self.n_shared,
                        "top_k": self.top_k,
                        "n_group": self.n_group,
                        "topk_group": self.topk_group,
                        "norm_topk_prob": bool(self.config.get("norm_topk_prob", True)),
                        "scaling": float(self.config.get("routed_scaling_factor", 1.0)),
                    },
                )
            )
        return ops

    def _swiglu(self, pre: str, inter: int) -> list[tuple[str, int, int]]:
        h = self.hidden
        return [
            (f"{pre}.gate_proj", inter, h),
            (f"{pre}.up_proj", inter, h),
            (f"{pre}.down_proj", h, inter),
        ]

    def caches(self, cache: str) -> dict[str, tuple[int, ...]]:
        out = {f"{cache}.kv_latent": (self.kv_lora,), f"{cache}.k_rope": (self.rope,)}
        if self.v32:
            out[f"{cache}.index_k"] = (self.index_dim,)
        return out

    def step(self, mode: str) -> list[Op]:
        ops = [
            Op(
                "embed",
                "embedding",
                ("ids",),
                ("x",),
                (self.tensor("model.embed_tokens.weight", self.vocab, self.hidden),),
            )
        ]
        for i in range(self.layers):
            ops += self.layer(i, f"layers.{i}", mode)
        head = "model.embed_tokens.weight" if self.tied else "lm_head.weight"
        ops += [
            Op(
                "norm",
                "rmsnorm",
                ("x",),
                ("h",),
                (self.tensor("model.norm.weight", self.hidden),),
                {"eps": self.eps},
            ),
            Op(
                "lm_head",
                "lm_head",
                ("h",),
                ("logits",),
                (self.tensor(head, self.vocab, self.hidden),),
            ),
        ]
        return ops

    def mtp(self) -> list[Op]:
        """The first multi-token-prediction layer as a draft head.

        Inputs: ids (the token one position ahead of each main position) and
        h_main (the main model's last hidden state, before the final norm, at
        each position). x = eh_proj([enorm(embed(ids)) | hnorm(h_main)]) runs
        through a full decoder layer with its own caches, then
        shared_head.norm and shared_head.head give the draft logits. The
        released checkpoints store the layer's own copies of the embedding and
        head, and keep enorm/hnorm/eh_proj/shared_head unquantized.
        """
        n = self.layers
        pre = f"model.layers.{n}"
        h = self.hidden
        ops = [
            Op(
                "mtp.embed",
                "embedding",
                ("ids",),
                ("e",),
                (self.tensor(f"{pre}.embed_tokens.weight", self.vocab, h),),
            ),
            Op(
                "mtp.enorm",
                "rmsnorm",
                ("e",),
                ("e",),
                (self.tensor(f"{pre}.enorm.weight", h),),
                {"eps": self.eps},
            ),
            Op(
                "mtp.hnorm",
                "rmsnorm",
                ("h_main",),
                ("h",),
                (self.tensor(f"{pre}.hnorm.weight", h),),
                {"eps": self.eps},
            ),
            Op(
                "mtp.eh_proj",
                "qlinear",
                ("e", "h"),
                ("x",),
                self.matrix(f"{pre}.eh_proj", h, 2 * h, quantized=False),
                {"cat_inputs": 2},
            ),
        ]
        ops += self.layer(n, "mtp.0", "absorbed")
        ops += [
            Op(
                "mtp.norm",
                "rmsnorm",
                ("x",),
                ("h",),
                (self.tensor(f"{pre}.shared_head.norm.weight", h),),
                {"eps": self.eps},
            ),
            Op(
                "mtp.lm_head",
                "lm_head",
                ("h",),
                ("logits",),
                (self.tensor(f"{pre}.shared_head.head.weight", self.vocab, h),),
            ),
        ]
        return ops


def describe(config: dict[str, Any], max_positions: int | None = None) -> ModelDescription:
    mt = config.get("model_type")
    if mt not in MODEL_TYPES:
        raise CheckpointError(f"config: model_type {mt!r} is not in the DeepSeek-V3 family")
    context = _int(config, "max_position_embeddings", 4096)
    positions = min(context, max_positions or context)
    b = _Builder(config, positions)
    prefill, decode = b.step("expanded"), b.step("absorbed")
    caches: dict[str, tuple[int, ...]] = {}
    for i in range(b.layers):
        caches.update(b.caches(f"layers.{i}"))
    mtp: list[Op] = []
    if b.mtp_layers > 0:
        mtp = b.mtp()
        caches.update(b.caches("mtp.0"))
    qk = b.nope + b.rope
    buffers: dict[str, tuple[int | str, ...]] = {
        "ids": ("T",),
        "x": ("T", b.hidden),
        "h": ("T", b.hidden),
        "q": ("T", b.heads * qk),
        "qh": ("T", b.heads, qk),
        "kv": ("T", b.kv_lora + b.rope),
        "attn": ("T", b.heads * b.v),
        "logits": (b.vocab,),
    }
    if b.q_lora is not None:
        buffers["q_a"] = buffers["q_lat"] = ("T", b.q_lora)
    if b.v32:
        buffers["sel"] = ("T", "K")  # K = min(index_topk, positions so far)
    if mtp:
        buffers["e"] = buffers["h_main"] = ("T", b.hidden)
    return ModelDescription(
        family="deepseek_v3",
        config=config,
        prefill=prefill,
        decode=decode,
        buffers=buffers,
        caches=caches,
        vocab_size=b.vocab,
        context_length=positions,
        hidden_size=b.hidden,
        weight_shapes=b.shapes,
        mtp=mtp,
        float32_weights=(
            SCALE_SUFFIX,
            ".gate.weight",
            ".e_score_correction_bias",
            ".indexer.weights_proj.weight",
        ),
    )
