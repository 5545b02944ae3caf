"""DeepSeek-V3 / V3.2 decode lowered to CUDA tile kernels for the graph executor.

One layer (MoE, V3.2) becomes 11 launches (12 kernels):

  fp8_gemv_multi  attn_norm as prologue (h written once),  attn_norm, q_a, kv_a,
                  then h -> q_a | kv | index key           indexer.wk
  fp8_gemv_multi  q_a_norm as prologue, then               q_a_norm, q_b,
                  q_lat -> q | index queries               indexer.wq_b
  attention_prep  one grid, three independent parts:       rope (+ indexer keys)
                  latent/rope/index caches at pos, q_rope;
                  q_nope -> q_absorbed through kv_b's key half;
                  h -> index head weights (fp32 weights_proj)
  indexer_topk    scores and top-k positions -> sel        indexer
  mla_decode      softmax over the selected positions, in latent space
                  (tensor cores, then a wide combine of the splits)
  fp8_gemv        per-head value half of kv_b -> attn      attn
  fp8_gemv        x += o_proj attn                         o_proj
  rmsnorm         x -> h                                   mlp_norm
  moe_router      ids, weights on the device
  moe_gate_up     silu(G h) * U h per chosen and shared expert
  moe_down        x += sum of gated down projections       moe

Dense layers run their SwiGLU through the same two expert kernels as a single
expert of weight 1 (no router). V3 without the indexer attends every cached
position; a plain q_proj replaces q_a/q_a_norm/q_b.

The kernels read FP8 e4m3 weights with 128x128 block scales, the released
checkpoints' format; bf16 or fp32 DeepSeek checkpoints run on the reference
executor. MLA attention is built for the released latent geometry
(kv_lora_rank 512, qk_rope_head_dim 64).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from tilert.engine.cuda import deepseek as dk
from tilert.engine.cuda import kernels
from tilert.engine.models.base import Op
from tilert.engine.ops.fp8 import QWeight

if TYPE_CHECKING:
    from tilert.engine.executors.graph import GraphExecutor


def _fp8(w: QWeight, what: str) -> tuple[torch.Tensor, torch.Tensor]:
    if w.scale is None:
        raise NotImplementedError(
            f"{what}: the graph executor runs DeepSeek FP8 checkpoints (e4m3 with block "
            "scales); serve bf16/fp32 DeepSeek checkpoints with --executor reference"
        )
    if tuple(w.block) != (kernels.FP8_BLOCK, kernels.FP8_BLOCK):
        raise NotImplementedError(f"{what}: FP8 blocks {w.block}, the kernels need 128x128")
    return w.weight, w.scale


class DeepSeekLowering:
    """Builds the launches of one decode step; buffers live in the executor."""

    def __init__(self, ex: GraphExecutor) -> None:
        self.ex = ex
        self.cfg = ex.model.config
        c = self.cfg
        self.heads = int(c["num_attention_heads"])
        self.nope = int(c["qk_nope_head_dim"])
        self.rope = int(c["qk_rope_head_dim"])
        self.v = int(c["v_head_dim"])
        self.lora = int(c["kv_lora_rank"])  # GraphExecutor checked it: graph_unsupported
        dev = ex.device
        self.sms = kernels.sm_count(dev)
        self.positions = ex.model.context_length
        self.mla_ws: kernels.MlaWorkspace | None = None
        self.router_ws: kernels.RouterWorkspace | None = None
        self.index_ws: kernels.IndexerWorkspace | None = None
        self.one_id = torch.zeros(1, dtype=torch.int32, device=dev)
        self.one_weight = torch.ones(1, dtype=torch.float32, device=dev)

    # ------------------------------------------------------------ helpers
    def buf(self, name: str, shape: tuple[int, ...], dtype=torch.bfloat16) -> torch.Tensor:
        return self.ex._buf(name, shape, dtype)

    def params(self, op: Op) -> dict:
        return self.ex._ref.params[op.name]

    def cache(self, name: str) -> torch.Tensor:
        return self.ex._ref.caches[name]

    @staticmethod
    def tag(la: kernels.Launch, *ops: Op | None) -> kernels.Launch:
        la.ops = tuple(o for o in ops if o is not None)
        return la

    # ------------------------------------------------------------ lowering
    def lower(self, ops: Sequence[Op]) -> list[kernels.Launch]:
        launches: list[kernels.Launch] = []
        by_name = {op.name: op for op in ops}
        layers = sorted(
            {op.name.split(".")[1] for op in ops if op.name.startswith("layers.")}, key=int
        )
        embed = by_name["embed"]
        x = self.buf("x", (self.ex.model.hidden_size,))
        launches.append(
            self.tag(kernels.embed(self.params(embed)["table"], self.ex._ids, x), embed)
        )
        for i in layers:
            pre = f"layers.{i}"
            layer = {op.name[len(pre) + 1 :]: op for op in ops if op.name.startswith(pre + ".")}
            launches += self.attention(pre, layer)
            launches += self.feed_forward(layer)
        launches += self.ex._lower_lm_head(by_name["norm"], by_name["lm_head"])
        return launches

    def norm(self, op: Op, out: torch.Tensor) -> kernels.Launch:
        x = self.ex.bufs[op.inputs[0]]
        la = dk.rmsnorm(x, self.params(op)["weight"], out, float(op.attrs["eps"]))
        return self.tag(la, op)

    def attention(self, pre: str, layer: dict[str, Op]) -> list[kernels.Launch]:
        hidden = self.ex.model.hidden_size
        heads, nope, rope, v, lora = self.heads, self.nope, self.rope, self.v, self.lora
        out: list[kernels.Launch] = []
        h = self.buf("h", (hidden,))
        x = self.ex.bufs["x"]
        attn_norm = layer["attn_norm"]
        # attn_norm runs as the first GEMV's prologue, which also writes h once
        # for the indexer's head weights two launches later.
        fused_norm = {
            "norm": self.params(attn_norm)["weight"],
            "eps": float(attn_norm.attrs["eps"]),
            "norm_out": h,
        }

        q = self.buf("q", (heads, nope + rope))
        kv = self.buf("kv", (lora + rope,))
        index = layer.get("indexer")
        ip = self.params(index) if index is not None else None
        if ip is not None:
            ia = index.attrs
            iheads, idim = int(ia["heads"]), int(ia["head_dim"])
            ik = self.buf("index.k", (idim,))
            iq = self.buf("index.q", (iheads, idim))
        kv_a = self.params(layer["kv_a"])["w"][0]
        first = [(*_fp8(kv_a, f"{pre}.kv_a"), kv)]
        if ip is not None:
            first.append((*_fp8(ip["wk"], f"{pre}.indexer.wk"), ik))
        if "q_a" in layer:
            q_a_w = self.params(layer["q_a"])["w"][0]
            q_lora = q_a_w.shape[0]
            q_a = self.buf("q_a", (q_lora,))
            gemv = dk.fp8_gemv_multi([(*_fp8(q_a_w, f"{pre}.q_a"), q_a), *first], x, **fused_norm)
            out.append(self.tag(gemv, attn_norm, layer["q_a"], layer["kv_a"]))
            # q_a_norm likewise runs as the prologue of q_b (q_lat is read by no one else).
            q_a_norm = layer["q_a_norm"]
            second = [(*_fp8(self.params(layer["q_b"])["w"][0], f"{pre}.q_b"), q.view(-1))]
            if ip is not None:
                second.append((*_fp8(ip["wq_b"], f"{pre}.indexer.wq_b"), iq.view(-1)))
            gemv = dk.fp8_gemv_multi(
                second,
                q_a,
                norm=self.params(q_a_norm)["weight"],
                eps=float(q_a_norm.attrs["eps"]),
            )
            out.append(self.tag(gemv, q_a_norm, layer["q_b"]))
        else:
            q_w = self.params(layer["q"])["w"][0]
            gemv = dk.fp8_gemv_multi(
                [(*_fp8(q_w, f"{pre}.q"), q.view(-1)), *first], x, **fused_norm
            )
            out.append(self.tag(gemv, attn_norm, layer["q"], layer["kv_a"]))

        rope_op = layer["rope"]
        ra, rp = rope_op.attrs, self.params(rope_op)
        cos, sin = self.ex._tables(rp, rope)
        q_rope = self.buf("q_rope", (heads, rope))
        index_args = head_weights = None
        if ip is not None:
            iw = self.buf("index.w", (iheads,), torch.float32)
            iq_roped = self.buf("index.q_roped", (iheads, idim))
            head_weights = (ip["proj"].dense(torch.float32), h, iw)
            index_args = {
                "q": iq,
                "k": ik,
                "norm_w": ip["norm_w"],
                "norm_b": ip["norm_b"],
                "cache": self.cache(ia["cache"]),
                "q_out": iq_roped,
            }
        attn_op = layer["attn"]
        aa = attn_op.attrs
        kv_b, kv_b_s = _fp8(self.params(attn_op)["kv_b"], f"{pre}.kv_b")
        q_abs = self.buf("q_absorbed", (heads, lora))
        prep = dk.attention_prep(
            q=q,
            kv=kv,
            kv_norm=rp["kv_norm"],
            cos=cos,
            sin=sin,
            pos=self.ex._pos,
            latent_cache=self.cache(ra["latent_cache"]),
            rope_cache=self.cache(ra["rope_cache"]),
            q_rope=q_rope,
            nope=nope,
            interleave=bool(ra["interleave"]),
            eps=float(ra["eps"]),
            index=index_args,
            kv_b=kv_b,
            kv_b_scale=kv_b_s,
            q_absorbed=q_abs,
            v=v,
            head_weights=head_weights,
        )
        out.append(self.tag(prep, rope_op))
        sel = None
        attended = self.positions
        if ip is not None:
            topk = int(ia["topk"])
            sel = self.buf(f"{pre}.sel", (topk,), torch.int32)  # per layer: readable after a step
            attended = min(attended, topk)
            if self.index_ws is None:
                self.index_ws = kernels.IndexerWorkspace.make(self.positions, self.ex.device)
            scale = idim**-0.5 * iheads**-0.5
            topk_la = kernels.indexer_topk(
                iq_roped, self.cache(ia["cache"]), iw, self.ex._len, sel, self.index_ws, scale
            )
            out.append(self.tag(topk_la, index))
        if self.mla_ws is None:
            splits = kernels.mla_splits(attended, heads, self.sms)
            self.mla_ws = kernels.MlaWorkspace.make(heads, splits, self.ex.device)
        o_lat = self.buf("o_latent", (heads, lora))
        out.append(
            kernels.mla_decode(
                q_abs,
                q_rope,
                self.cache(aa["latent_cache"]),
                self.cache(aa["rope_cache"]),
                o_lat,
                self.ex._len,
                self.mla_ws,
                float(aa["scale"]),
                sel,
            )
        )
        attn = self.buf("attn", (heads * v,))
        up = kernels.fp8_gemv(kv_b, kv_b_s, o_lat, attn, groups=(v, nope + v, nope))
        out.append(self.tag(up, attn_op))
        o_proj = layer["o_proj"]
        o_w, o_s = _fp8(self.params(o_proj)["w"][0], f"{pre}.o_proj")
        out.append(self.tag(kernels.fp8_gemv(o_w, o_s, attn, x, residual=x), o_proj))
        return out

    def feed_forward(self, layer: dict[str, Op]) -> list[kernels.Launch]:
        h, x = self.ex.bufs["h"], self.ex.bufs["x"]
        out = [self.norm(layer["mlp_norm"], h)]
        op = layer.get("moe") or layer["mlp"]
        p = self.params(op)

        def mats(ws: Sequence[QWeight], what: str) -> tuple:
            names = ("gate", "up", "down")
            return tuple(t for w, n in zip(ws, names, strict=True) for t in _fp8(w, f"{what}.{n}"))

        if op.kind == "moe":
            a = op.attrs
            top_k = int(a["top_k"])
            experts = kernels.MoeExperts.make(
                [mats(e, f"{op.name}.expert{j}") for j, e in enumerate(p["experts"])],
                mats(p["shared"], f"{op.name}.shared") if p["shared"] is not None else None,
            )
            ids = self.buf(f"{op.name}.ids", (top_k,), torch.int32)
            weights = self.buf(f"{op.name}.weights", (top_k,), torch.float32)
            if self.router_ws is None:
                self.router_ws = kernels.RouterWorkspace.make(int(a["n_experts"]), self.ex.device)
            out.append(
                kernels.moe_router(
                    h,
                    p["gate"],
                    p["bias"].float(),
                    ids,
                    weights,
                    self.router_ws,
                    top_k=top_k,
                    n_group=int(a["n_group"]),
                    topk_group=int(a["topk_group"]),
                    norm_topk_prob=bool(a["norm_topk_prob"]),
                    scaling=float(a["scaling"]),
                )
            )
        else:
            experts = kernels.MoeExperts.make([mats((p["gate"], p["up"], p["down"]), op.name)])
            top_k, ids, weights = 1, self.one_id, self.one_weight
        act = self.buf(f"{op.name}.act", (experts.act_len(top_k),))
        out.append(kernels.moe_gate_up(experts, h, ids, weights, act))
        out.append(self.tag(kernels.moe_down(experts, act, ids, weights, x, residual=x), op))
        return out


def lower(ex: GraphExecutor, ops: Sequence[Op]) -> list[kernels.Launch]:
    return DeepSeekLowering(ex).lower(ops)
