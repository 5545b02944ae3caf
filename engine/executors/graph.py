"""The graph executor: the decode step lowered to CUDA tile kernels (csrc/), one
launch per fused op, captured once into a CUDA graph and replayed per token.

Lowering folds the model description's ops into launches:
  embedding                          -> embed
  rmsnorm + linear [+ rope_kv_append] -> GEMV, norm prologue, RoPE + KV append epilogue
  rmsnorm + linear + silu_mul        -> GEMV, norm prologue, SiLU-and-multiply epilogue
  linear (second input)              -> GEMV, residual-add epilogue
  gqa_attention                      -> split-K decode attention
  rmsnorm + lm_head                  -> GEMV to fp32 logits + per-tile argmax, then sample
Every launch uses programmatic dependent launch, so a kernel starts reading its
weights while the previous one drains. The token, position and sampling settings
live in device memory, so the graph never changes; the sampler writes the next
token id to pinned host memory, and reading it is the step's only host
synchronization. The sampler also moves the position and the sampling step on
by one: a step that continues a stream with the same settings needs nothing
from the host, any other gets one small host-to-device copy first.
decode_tokens keeps one step in flight ahead of that read (the next step takes
its input id from the sampler on the GPU), so the host's work per token
overlaps the GPU's; the step is captured twice, the two samplers writing
alternate pinned slots.

Prefill runs the reference ops on the GPU, batched over the prompt (it writes
the same caches). Weights, caches and the RoPE tables are those the reference
executor prepares, so nothing is held twice.

`trace` is called after every op only in eager mode (`eager=True` or when
`stop_after` is given, for bisecting against the reference); a replayed step
calls it once, with the last op. Buffers exposed to trace: x, q, attn, act,
logits (norm outputs, qkv and gate|up never reach memory).
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Generator, Sequence

import numpy
import torch

from tilert.engine.checkpoint import TensorSource
from tilert.engine.cuda import kernels
from tilert.engine.executors import graph_unsupported
from tilert.engine.executors.reference import ReferenceExecutor
from tilert.engine.models.base import ModelDescription, Op
from tilert.engine.sampling import SamplingParams

Trace = Callable[[Op, dict[str, torch.Tensor]], None]

_STAGING_SLOTS = 8  # pinned step-input buffers in flight (prefill enqueues many steps)
_STEP_HEADER = struct.Struct("<iiii")  # token, position, length, padding
# How long a layer's o_proj holds its ring fill back (csrc/gemv.cuh,
# gemv_hold_fill) when the qkv before it keeps all its weights in its rings
# (SmolLM2-135M); none where qkv reads weights after its wait (Llama-3.2-1B).
# Measured on H100s, each setting in a fresh process (benchmarks/NOTES.md
# v10): SmolLM2 at 1024 positions 0.4948 ms unheld, 0.4873 / 0.4806 / 0.4804
# held 1 / 1.5 / 2 us, 2 us the flattest up to 1280 (0.4893); Llama-3.2-1B
# 0.9959-0.9971 unheld against 1.0046-1.0047 held 3 us, the hold of v9 (since
# the attention launches one block an SM, o_proj launches early enough that
# its unheld fill is served before qkv's loads after its wait).
_OPROJ_FILL_DELAY_NS = 2000


class GraphExecutor:
    def __init__(
        self,
        model: ModelDescription,
        tensors: TensorSource,
        *,
        device: str | torch.device = "cuda",
        dtype: torch.dtype = torch.bfloat16,
        eager: bool = False,
        pdl: bool = True,
    ) -> None:
        self.device = torch.device(device)
        # The same check the server makes before starting a worker, here before
        # any weight is loaded onto the GPU.
        reason = graph_unsupported(model, str(self.device), str(dtype))
        if reason is not None:
            raise NotImplementedError(f"{reason}; use --executor reference")
        if self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.model = model
        self.dtype = dtype
        self.eager = eager
        self.pdl = pdl
        with torch.cuda.device(self.device):
            self._ref = ReferenceExecutor(model, tensors, device=self.device, dtype=dtype)
            self._setup()
        self.length = 0
        self._graphs: list[torch.cuda.CUDAGraph] | None = None
        self._done = [torch.cuda.Event(), torch.cuda.Event()]  # per pinned token slot

    # ------------------------------------------------------------ set-up
    def _setup(self) -> None:
        dev, m = self.device, self.model
        kernels.lib()  # build (or load) before anything is captured
        # Step inputs, one copy per step: int32 token, position, length (position
        # + 1), padding, then the SampleConfig.
        self._step_in = torch.zeros(
            _STEP_HEADER.size + kernels.SAMPLE_CONFIG_BYTES, dtype=torch.uint8, device=dev
        )
        self._ids = self._step_in[0:4].view(torch.int32)
        self._pos = self._step_in[4:8].view(torch.int32)
        self._len = self._step_in[8:12].view(torch.int32)
        self._pos_len = self._step_in[4:12].view(torch.int32)  # the sampler moves both on
        self._cfg = self._step_in[_STEP_HEADER.size :]
        self._staging = [
            torch.zeros_like(self._step_in, device="cpu").pin_memory()
            for _ in range(_STAGING_SLOTS)
        ]
        self._staged = [torch.cuda.Event() for _ in range(_STAGING_SLOTS)]
        self._used = [False] * _STAGING_SLOTS
        # (position, settings) the last sampler moved the staged input on to.
        self._ahead: tuple[int, bytes] | None = None
        self._slot = 0
        # One pinned slot per captured graph: with a step in flight behind the
        # one being read, the two must not write the same word.
        self._token_host = torch.zeros(2, dtype=torch.int32).pin_memory()
        self._token_dev = torch.zeros(1, dtype=torch.int32, device=dev)
        self.bufs: dict[str, torch.Tensor] = {}
        self._rope_tables: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self._attn_ws: kernels.AttentionWorkspace | None = None
        if m.family == "deepseek_v3":
            from tilert.engine.executors import graph_deepseek

            self.launches = graph_deepseek.lower(self, m.decode)
        else:
            self.launches = self._lower(m.decode)
        # The same step with its sampler writing the other pinned slot. The
        # sampler of both moves the staged position on, which the next step's
        # kernels read before their wait: steps follow each other across a
        # graph launch (or launches without PDL), never a programmatic edge.
        # Launching them from outside the executor leaves _ahead stale: stage
        # (_stage) before the executor steps again.
        self._variants = [self.launches, [*self.launches[:-1], self._pick_other]]
        # The step whose sampler does not move the position on: replayed (or
        # launched) again and again, it decodes at the staged position each time,
        # as the benchmarks that time or trace one position need.
        self.fixed_launches = [*self.launches[:-1], self._pick_fixed]

    def _buf(self, name: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        t = self.bufs.get(name)
        if t is None or tuple(t.shape) != shape or t.dtype != dtype:
            t = torch.zeros(shape, dtype=dtype, device=self.device)
            self.bufs[name] = t
        return t

    def _params(self, op: Op) -> dict:
        return self._ref.params[op.name]

    def _lower(self, ops: Sequence[Op]) -> list[kernels.Launch]:
        launches: list[kernels.Launch] = []
        bf = torch.bfloat16
        hidden = self.model.hidden_size
        i = 0
        hold = 0  # the next o_proj's fill delay: set by a qkv that fits its rings

        def consumes(j: int, name: str) -> bool:
            return j < len(ops) and len(ops[j].inputs) > 0 and ops[j].inputs[0] == name

        while i < len(ops):
            op = ops[i]
            if op.kind == "embedding":
                x = self._buf(op.outputs[0], (hidden,), bf)
                la = kernels.embed(self._params(op)["table"], self._ids, x)
                la.ops = (op,)
                launches.append(la)
                i += 1
                continue
            if op.kind == "gqa_attention":
                launches.append(self._lower_attention(op))
                i += 1
                continue
            norm: Op | None = None
            if op.kind == "rmsnorm":
                if not consumes(i + 1, op.outputs[0]) or ops[i + 1].kind not in (
                    "linear",
                    "lm_head",
                ):
                    raise NotImplementedError(f"{op.name}: a norm not followed by its GEMV")
                norm, op = op, ops[i + 1]
                i += 1
            if op.kind == "linear":
                nxt = ops[i + 1] if i + 1 < len(ops) else None
                if (
                    nxt is not None
                    and consumes(i + 1, op.outputs[0])
                    and nxt.kind in ("rope_kv_append", "silu_mul")
                ):
                    la = self._lower_linear(norm, op, nxt)
                    if nxt.kind == "rope_kv_append":
                        hold = 0 if la.loads_after_wait else _OPROJ_FILL_DELAY_NS
                    i += 2
                else:
                    o_proj = norm is None and len(op.inputs) > 1
                    la = self._lower_linear(norm, op, None, fill_delay_ns=hold if o_proj else 0)
                    hold = 0 if o_proj else hold
                    i += 1
                launches.append(la)
                continue
            if op.kind == "lm_head":
                launches.extend(self._lower_lm_head(norm, op))
                i += 1
                continue
            raise NotImplementedError(f"{op.name}: op kind {op.kind!r} has no kernel yet")
        return self._cut_launch_chain(launches)

    def _cut_launch_chain(self, launches: list[kernels.Launch]) -> list[kernels.Launch]:
        """Where every GEMV of the layers lets the next kernel launch at once,
        nothing stops launched blocks from piling up kernels ahead of the one
        running; then the attention lets its dependents launch only after its
        wait, once a layer. Measured on an H100 (benchmarks/NOTES.md): SmolLM2
        0.618 -> 0.570 ms a step; Llama-3.2-1B, whose gate_up already lets go
        late, 1.092 -> 1.117 with it, so there it stays early."""
        layer_gemvs = [
            la
            for la in launches
            if la.name.startswith("gemv") and not any(op.kind == "lm_head" for op in la.ops)
        ]
        if any(la.late_trigger for la in layer_gemvs):
            return launches
        return [
            self._lower_attention(la.ops[0], late_trigger=True) if la.name == "attention" else la
            for la in launches
        ]

    def _lower_linear(
        self, norm: Op | None, op: Op, epi: Op | None, fill_delay_ns: int = 0
    ) -> kernels.Launch:
        p = self._params(op)
        w = p["weight"]
        n = w.shape[0]
        x = self.bufs[op.inputs[0]] if norm is None else self.bufs[norm.inputs[0]]
        common = dict(
            norm_weight=self._params(norm)["weight"] if norm is not None else None,
            eps=float(norm.attrs["eps"]) if norm is not None else 1e-6,
            fill_delay_ns=fill_delay_ns,
        )
        covered = tuple(o for o in (norm, op, epi) if o is not None)
        if epi is not None and epi.kind == "rope_kv_append":
            a, rp = epi.attrs, self._params(epi)
            q = self._buf(epi.outputs[0], (a["heads"], a["head_dim"]), torch.bfloat16)
            cos, sin = self._tables(rp, a["head_dim"])
            rope = kernels.Rope(
                heads=a["heads"],
                kv_heads=a["kv_heads"],
                head_dim=a["head_dim"],
                cos=cos,
                sin=sin,
                pos=self._pos,
                k_cache=self._ref.caches[a["k_cache"]],
                v_cache=self._ref.caches[a["v_cache"]],
                q_norm=rp.get("q_norm"),
                k_norm=rp.get("k_norm"),
                eps=float(a["eps"]),
            )
            la = kernels.gemv(w, x, q, epilogue="rope_kv", bias=p.get("bias"), rope=rope, **common)
        elif epi is not None and epi.kind == "silu_mul":
            act = self._buf(epi.outputs[0], (n // 2,), torch.bfloat16)
            la = kernels.gemv(w, x, act, epilogue="silu_mul", bias=p.get("bias"), **common)
        else:
            residual = self.bufs[op.inputs[1]] if len(op.inputs) > 1 else None
            out = self._buf(op.outputs[0], (n,), torch.bfloat16)
            la = kernels.gemv(
                w, x, out, epilogue="store", bias=p.get("bias"), residual=residual, **common
            )
        la.ops = covered
        return la

    def _tables(self, rp: dict, head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
        key = id(rp["cos"])
        if key not in self._rope_tables:
            self._rope_tables[key] = (
                rp["cos"].to(self.device, torch.float32).contiguous(),
                rp["sin"].to(self.device, torch.float32).contiguous(),
            )
        return self._rope_tables[key]

    def _lower_attention(self, op: Op, late_trigger: bool = False) -> kernels.Launch:
        a = op.attrs
        q = self.bufs[op.inputs[0]]
        heads, d = q.shape
        k_cache, v_cache = self._ref.caches[a["k_cache"]], self._ref.caches[a["v_cache"]]
        if self._attn_ws is None:  # layers run one after another: one workspace serves all
            sms = kernels.sm_count(self.device)
            splits = kernels.attention_splits(self.model.context_length, a["kv_heads"], sms)
            self._attn_ws = kernels.AttentionWorkspace.make(
                heads, a["kv_heads"], d, splits, self.device
            )
        out = self._buf(op.outputs[0], (heads * d,), torch.bfloat16)
        la = kernels.attention(
            q, k_cache, v_cache, out, self._pos, self._attn_ws, late_trigger=late_trigger
        )
        la.ops = (op,)
        return la

    def _lower_lm_head(self, norm: Op | None, op: Op) -> list[kernels.Launch]:
        w = self._params(op)["weight"]
        n, k = w.shape
        x = self.bufs[op.inputs[0]] if norm is None else self.bufs[norm.inputs[0]]
        logits = self._buf(op.outputs[0], (n,), torch.float32)
        tiles = kernels.logits_tiles(n, k, self.device)
        part_max = self._buf("lm_head.part_max", (tiles,), torch.float32)
        part_idx = self._buf("lm_head.part_idx", (tiles,), torch.int32)
        head = kernels.gemv(
            w,
            x,
            logits,
            epilogue="logits",
            part_max=part_max,
            part_idx=part_idx,
            norm_weight=self._params(norm)["weight"] if norm is not None else None,
            eps=float(norm.attrs["eps"]) if norm is not None else 1e-6,
        )
        head.ops = tuple(o for o in (norm, op) if o is not None)
        # One sampler per pinned token slot; the step's launches end with the
        # first, and the second makes the variant that decode_tokens alternates.
        # A third, which leaves the position where it is, ends fixed_launches.
        picks = [
            kernels.sample(
                logits,
                part_max,
                part_idx,
                self._cfg,
                self._ids,
                self._token_host[i : i + 1],
                advance=self._pos_len if advance else None,
            )
            for i, advance in ((0, True), (1, True), (0, False))
        ]
        self._pick_other, self._pick_fixed = picks[1], picks[2]
        return [head, picks[0]]

    # ------------------------------------------------------------ running
    def _stage(self, token: int | None, config: bytes) -> None:
        """Enqueues the copy of (token, position, sampling settings) for the next
        step; with token None the id stays the one the previous step's sampler
        wrote on the GPU."""
        self._ahead = None  # the GPU's input is now the one staged here
        s = self._slot
        self._slot = (s + 1) % _STAGING_SLOTS
        if self._used[s]:
            self._staged[s].synchronize()  # its previous copy must have left the buffer
        buf = self._staging[s]
        packed = _STEP_HEADER.pack(token or 0, self.length, self.length + 1, 0) + config
        buf.numpy()[:] = numpy.frombuffer(packed, dtype=numpy.uint8)
        skip = 0 if token is not None else 4  # the id is the header's first word
        self._step_in[skip:].copy_(buf[skip:], non_blocking=True)
        self._staged[s].record()
        self._used[s] = True

    def _run_eager(self, trace: Trace | None, stop_after: str | None, slot: int = 0) -> None:
        for la in self._variants[slot]:
            la(pdl=False)
            for op in la.ops:
                if trace is not None:
                    trace(op, self._trace_bufs())
                if op.name == stop_after:
                    return

    def _trace_bufs(self) -> dict[str, torch.Tensor]:
        views = {}
        for name, t in self.bufs.items():
            if name in ("logits",) or "." in name:
                views[name] = t
            else:
                views[name] = t.view(1, *t.shape)
        return views

    def _capture(self) -> None:
        # Warm up outside capture: the first launch of each kernel loads its module
        # and sets its attributes, neither of which may happen while capturing.
        # Each pass runs the staged step (so it writes only the rows this step
        # writes); its sampler overwrites the input id and moves the position
        # on: the staged input is put back before each pass and after.
        staged = self._step_in.clone()
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for _ in range(2):
                self._step_in.copy_(staged)
                for la in self.launches:
                    la(side.cuda_stream, pdl=self.pdl)
            self._step_in.copy_(staged)
        torch.cuda.current_stream(self.device).wait_stream(side)
        graphs = []
        for launches in self._variants:
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                stream = torch.cuda.current_stream().cuda_stream
                for la in launches:
                    la(stream, pdl=self.pdl)
            graphs.append(graph)
        self._graphs = graphs

    def _step(
        self,
        token: int | None,
        config: bytes,
        trace: Trace | None,
        stop_after: str | None,
        slot: int = 0,
    ) -> None:
        """Enqueues one step at position `length`: `token` from the host, or None
        for the id the previous step sampled on the GPU. Its sampler writes the
        id to pinned slot `slot`."""
        if self.length >= self.model.context_length:
            raise ValueError(
                f"sequence of {self.length + 1} positions exceeds the context of "
                f"{self.model.context_length}"
            )
        self._check_token(token)
        with torch.cuda.device(self.device):
            # The previous step's sampler moved the input on to this position
            # with the same settings: nothing to copy. Otherwise stage it.
            settings = config[: kernels.SAMPLE_SETTINGS_BYTES]  # all but the step
            if token is not None or self._ahead != (self.length, settings):
                self._stage(token, config)
            self._ahead = None
            if self.eager or stop_after is not None:
                self._run_eager(trace, stop_after, slot)
            else:
                if self._graphs is None:
                    self._capture()
                self._graphs[slot].replay()
                if trace is not None:
                    trace(self.model.decode[-1], self._trace_bufs())
            if stop_after is None:  # the sampler ran
                self._ahead = (self.length + 1, settings)
            self._done[slot].record()
        self.length += 1

    def reset(self) -> None:
        self.length = 0
        self._ahead = None

    def _check_token(self, token: int | None) -> None:
        """A host token must be an id of the vocabulary (None: the sampler's)."""
        if token is not None and not 0 <= token < self.model.vocab_size:
            raise ValueError(f"token {token} is outside the vocabulary of {self.model.vocab_size}")

    @torch.inference_mode()
    def stage(
        self, position: int, token: int | None = None, sampling: SamplingParams | None = None
    ) -> None:
        """Sets the next step's input: position (the length so far), the input
        id (None: the one the last sampler wrote on the GPU) and the sampling
        settings. For callers that replay the captured graphs (`_graphs`,
        `fixed_launches`) themselves, as the benchmarks do: the executor's
        own steps stage what they need."""
        if not 0 <= position < self.model.context_length:
            raise ValueError(
                f"position {position} is outside the context of {self.model.context_length}"
            )
        self._check_token(token)
        config = self._sample_config(sampling, step=position)  # refuses what the GPU lacks
        self.length = position
        with torch.cuda.device(self.device):
            self._stage(token, config)

    @torch.inference_mode()
    def prefill(
        self, ids: Sequence[int], *, trace: Trace | None = None, stop_after: str | None = None
    ) -> torch.Tensor:
        """Starts a new sequence; returns the last position's logits [vocab] float32.

        The prompt runs through the reference ops on the GPU in one batched
        pass (cuBLAS matrix products); it writes the same KV caches that the
        decode kernels read, so decode continues from there."""
        if not ids:
            raise ValueError("prefill needs at least one token")
        if self._attn_ws is not None:  # a new sequence: merge stamps start over
            self._attn_ws.reset()
        logits = self._ref.prefill(ids, trace=trace, stop_after=stop_after)
        self.length = self._ref.length
        self._ahead = None
        return logits

    @torch.inference_mode()
    def decode(
        self, token: int, *, trace: Trace | None = None, stop_after: str | None = None
    ) -> torch.Tensor:
        """Appends one token; returns its logits [vocab] float32 (a buffer the next
        step overwrites)."""
        self._step(int(token), kernels.sample_config(), trace, stop_after)
        return self.bufs["logits"]

    def _sample_config(self, sampling: SamplingParams | None, step: int | None = None) -> bytes:
        """The SampleConfig bytes of `sampling` (greedy when None) for a step at
        `step` (default: the current length)."""
        sp = sampling or SamplingParams(temperature=0.0)
        if sp.repetition_penalty != 1.0 or sp.presence_penalty or sp.frequency_penalty:
            raise NotImplementedError("penalties are applied by the host sampler, not on the GPU")
        return kernels.sample_config(
            temperature=sp.temperature,
            top_k=sp.top_k,
            top_p=sp.top_p,
            min_p=sp.min_p,
            seed=sp.seed,
            step=self.length if step is None else step,
        )

    @torch.inference_mode()
    def decode_token(self, token: int, sampling: SamplingParams | None = None) -> int:
        """Appends one token and returns the next one, chosen on the GPU: greedy,
        or temperature / top-k / top-p / min-p with a Philox stream keyed by the
        seed and the position. Reading the id is the only host synchronization.
        Repetition, presence and frequency penalties are not applied on the GPU
        (sample from decode()'s logits on the host for those)."""
        self._step(int(token), self._sample_config(sampling), None, None)
        self._done[0].synchronize()
        return int(self._token_host[0])

    @torch.inference_mode()
    def decode_tokens(
        self, token: int, sampling: SamplingParams | None = None, count: int | None = None
    ) -> Generator[int, None, None]:
        """Yields the tokens that follow `token` (at most `count`), as decode_token
        would one call at a time, but one step ahead: step k + 1 (its input id
        read on the GPU from step k's sampler) is enqueued before step k's id is
        read, so the host's work between tokens overlaps the GPU's instead of
        adding to it. `length` counts the tokens yielded so far. Stop by closing
        the generator: the step then in flight wrote the cache row at `length`,
        which the next step there overwrites. No step runs past `count`."""
        if count is not None and count < 1:
            return
        pending, made = 0, 1
        self._step(int(token), self._sample_config(sampling), None, None, slot=pending)
        while True:
            ahead = None
            if self.length < self.model.context_length and (count is None or made < count):
                ahead = 1 - pending
                self._step(None, self._sample_config(sampling), None, None, slot=ahead)
                self.length -= 1  # not the caller's until it asks for the token
                made += 1
            self._done[pending].synchronize()
            yield int(self._token_host[pending])
            if ahead is None:
                if count is not None and made >= count:
                    return
                # The context is full: raise as decode_token would.
                self._step(None, self._sample_config(sampling), None, None)
            self.length += 1
            pending = ahead
