"""The inference engine, in the style of gpt-fast: a static KV cache per layer, `prefill` and
`decode_one_token`, positions always explicit, sampling on the device, decode steps replayed from CUDA
graphs on a GPU.

A layer's cache holds `memory_slots` slots of routed memory (the chosen documents' pooled K/V, written
once per routing round, right-padded) followed by `local_slots` token slots. Slot numbers are not RoPE
positions: keys are stored rotated, routing layers have a memory prefix the others lack, and the caller
passes positions. Every shape is fixed once a prefill has sized the caches (memory widths and local
capacity rounded up to buckets), so a decode step has no host sync and no shape change and can be
captured once per (batch, widths) signature and replayed; caches and graphs are pooled and reused by the
next question of the same signature.

The eager path of `Backbone.forward` (growing `LayerCache`s) stays as the oracle the engine is
parity-tested against (tests/inference/test_engine.py).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from ..decoder.backbone import Attention, Backbone, Memory, MemoryHook
from .question_head import HeadCache, HeadKV

LOCAL_BUCKET = 128  # token slots are allocated in multiples of this
PROMPT_BUCKET = 64  # captured question forwards and prefills: prompts left-padded to a multiple of this
MIN_MEMORY_BUCKET = 16  # memory widths are rounded up to a power of two, at least this


def memory_bucket(width: int) -> int:
    """Memory slots allocated for `width` memory keys: 0, or a power of two >= MIN_MEMORY_BUCKET."""
    if width <= 0:
        return 0
    return max(MIN_MEMORY_BUCKET, 1 << (width - 1).bit_length())


def local_bucket(tokens: int) -> int:
    return -(-tokens // LOCAL_BUCKET) * LOCAL_BUCKET


def prompt_bucket(tokens: int) -> int:
    return -(-tokens // PROMPT_BUCKET) * PROMPT_BUCKET


class StaticCache:
    """One layer's keys and values: memory slots [0, memory_slots), then token slots."""

    def __init__(self, batch: int, kv_heads: int, head_dim: int, memory_slots: int, local_slots: int,
                 dtype: torch.dtype, device: torch.device) -> None:
        total = memory_slots + local_slots
        self.k = torch.zeros(batch, kv_heads, total, head_dim, dtype=dtype, device=device)
        self.v = torch.zeros_like(self.k)
        self.valid = torch.zeros(batch, total, dtype=torch.bool, device=device)
        self.memory_slots, self.local_slots = memory_slots, local_slots
        # each slot's token index (memory slots: negative), for masks built on the device
        self.local_index = torch.arange(total, device=device) - memory_slots

    def reset(self, memory: Memory | None) -> None:
        """Forget all tokens; hold `memory` (post-RoPE K/V [B, kv, m, D], m <= memory_slots) in front."""
        self.valid.zero_()
        if memory is not None and memory.k.shape[2]:
            m = memory.k.shape[2]
            self.k[:, :, :m] = memory.k
            self.v[:, :, :m] = memory.v
            self.valid[:, :m] = memory.valid

    def update(self, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor, valid: torch.Tensor) -> None:
        """Store k, v [B, kv, T, D] at token slots `slots` [T] (a device tensor: no host sync)."""
        at = slots + self.memory_slots
        self.k.index_copy_(2, at, k)
        self.v.index_copy_(2, at, v)
        self.mark(slots, valid)

    def mark(self, slots: torch.Tensor, valid: torch.Tensor) -> None:
        """Store which token slots `slots` [T] hold real tokens (valid [B, T])."""
        self.valid[:, slots + self.memory_slots] = valid

    def mask(self, slots: torch.Tensor, causal: bool = True) -> torch.Tensor:
        """[B, 1, T, S] bool for a block at token slots `slots` [T] whose valid flags are stored: query i sees
        the valid memory slots and the valid token slots up to its own (causal) or up to the block's last
        (causal=False: the reference's bidirectional injection); always its own slot, so a padding query
        never has a fully masked row."""
        index = self.local_index
        upto = slots if causal else slots.max().expand(slots.shape[0])
        sees = (index[None, :] < 0) | (index[None, :] <= upto[:, None])  # [T, S]
        own = index[None, :] == slots[:, None]
        return ((sees[None] & self.valid[:, None, :]) | own[None])[:, None]


def grouped_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """q [B, H, T, D] over k, v [B, kv, S, D] with a boolean mask [B, 1, T, S]; returns [B, H, T, D].

    One query token (decode): a grouped matmul, query head h reading kv head h // G, the kv heads never
    copied (never a mask together with enable_gqa, which sends SDPA to its math backend on CUDA). Several:
    SDPA, on CUDA with the kv heads repeated, which takes a fused kernel with a mask; on a CPU with
    enable_gqa (the CPU's flash kernel takes both; a question's forward there was 0.5 ms faster).
    (A grouped matmul for question-sized blocks too was measured on the H200: time to first token 66 -> 74
    ms; not kept.)
    """
    b, h, t, d = q.shape
    kv = k.shape[1]
    groups = h // kv
    if t == 1:
        qg = q.reshape(b, kv, groups, d)
        scores = torch.matmul(qg, k.transpose(-1, -2)).float() * (d ** -0.5)  # [B, kv, G, S]
        scores = scores.masked_fill(~mask[:, :, 0, None, :].expand_as(scores), float("-inf"))
        probs = torch.softmax(scores, dim=-1).to(v.dtype)
        return torch.matmul(probs, v).view(b, h, 1, d)
    if groups > 1 and q.is_cuda:
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=groups > 1 and not q.is_cuda)


def cached_attention(attn: Attention, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: StaticCache,
                     slots: torch.Tensor, valid: torch.Tensor, causal: bool = True,
                     mask: torch.Tensor | None = None) -> torch.Tensor:
    """Self-attention of a block of tokens at token slots `slots` [T], through the layer's static cache
    (`StaticCache.mask` says what each query sees). `mask`: that mask when the caller has it already (the
    query forward's layers share one scratch cache, so one mask serves them all)."""
    q, k, v = attn.project(x, cos, sin)
    cache.update(slots, k, v, valid)
    if mask is None:
        mask = cache.mask(slots, causal)
    return attn.output(grouped_attention(q, cache.k, cache.v, mask))


@dataclass
class Session:
    """One batch's state between engine calls: its caches and where the next token goes.

    positions [B] and slot [1] live on the device and advance there; `length` is the host's count of
    token slots in use (known without a sync: prompt length plus tokens fed)."""

    caches: list[StaticCache]
    positions: torch.Tensor  # [B] RoPE position of the next token of each row
    slot: torch.Tensor  # [1] token slot of the next token
    length: int
    signature: tuple

    @property
    def capacity(self) -> int:
        return self.caches[0].local_slots


class Engine:
    """Prefill and decode for one backbone. Caches (and decode graphs, on a GPU) are pooled by signature:
    (batch, each layer's memory slots, token slots)."""

    def __init__(self, backbone: Backbone, *, graphs: bool | None = None) -> None:
        self.backbone = backbone
        capturable = backbone.args.rope.rope_type != "dynamic"  # dynamic RoPE reads max(position) on the host
        self.use_graphs = (backbone.device.type == "cuda" and capturable) if graphs is None else graphs
        self.compile_decode = False  # torch.compile the captured decode step and question forward (set_compile)
        self.compile_mode: str | None = None
        self._caches: dict[tuple, list[StaticCache]] = {}
        self._graphs: dict[tuple, DecodeGraph] = {}
        self._compiled_step = None
        self._query_forwards: dict[tuple, QueryForward] = {}
        self.capture_prefill = True  # routed prefills replayed from CUDA graphs where they can be (captured.py)
        self.prefill_graphs: OrderedDict = OrderedDict()  # captured.PrefillGraph by shape and bank state
        self.question_heads = HeadCache()  # K/V of the prompt head the query forward's questions share

    def query_forward(self, router: Any, layers: list[int]) -> QueryForward:
        """The routing-query forward of a router, made once per (router, layers). Keyed by the router's id:
        the entry holds the router, so the id cannot be reused while the captured graph lives."""
        key = (id(router), tuple(sorted(layers)))
        qf = self._query_forwards.get(key)
        if qf is None:
            qf = self._query_forwards[key] = QueryForward(self, router, layers)
        return qf

    def set_compile(self, on: bool, mode: str | None = None) -> None:
        """torch.compile the captured decode step and question forward (fuses their small kernels; the first
        call of each shape then takes a while to compile). `mode`: torch.compile's, e.g.
        "max-autotune-no-cudagraphs" (matmuls autotuned: a much slower first call); never one that makes CUDA
        graphs itself, since the engine captures the compiled code in its own. Graphs made before are dropped."""
        if mode in ("reduce-overhead", "max-autotune"):
            raise ValueError(f"mode {mode!r} makes CUDA graphs itself; the engine captures its own "
                             "(use 'max-autotune-no-cudagraphs')")
        if on != self.compile_decode or mode != self.compile_mode:
            if mode != self.compile_mode:
                self._compiled_step = None
                for qf in self._query_forwards.values():
                    qf._compiled = None
            self.compile_decode, self.compile_mode = on, mode
            self.drop_graphs()

    def drop_graphs(self) -> None:
        """Forget every captured graph (decode, routed prefill, question forward); the next call captures
        again. Needed after anything that changes which tensors a step reads, e.g. `backbone.packs.gpu`."""
        self._graphs.clear()
        self.prefill_graphs.clear()
        for qf in self._query_forwards.values():
            qf.drop_graphs()

    def decode_fn(self):
        """The decode forward a graph captures: `step`, or its torch.compile'd version."""
        if not self.compile_decode:
            return self.step
        if self._compiled_step is None:
            self._compiled_step = torch.compile(self.step, dynamic=False, mode=self.compile_mode)
        return self._compiled_step

    # ---- prefill -------------------------------------------------------------------------------
    @torch.no_grad()
    def prefill(self, ids: torch.Tensor, positions: torch.Tensor, valid: torch.Tensor, *,
                memory_hook: MemoryHook | None = None, extra_tokens: int = 0) -> tuple[torch.Tensor, Session]:
        """Run a left-padded block [B, T] at `positions` into fresh caches with room for `extra_tokens` more;
        `memory_hook(layer, normed x)` routes and returns each layer's memory. Returns the last position's
        logits [B, V] (float32) and the session to decode from."""
        bb = self.backbone
        b, t = ids.shape
        local = local_bucket(t + extra_tokens)
        h = bb.embed_tokens(ids)
        cos, sin = bb.rotary(positions, h.dtype)
        slots = torch.arange(t, device=ids.device)
        caches: list[StaticCache] = []
        widths: list[int] = []
        for i, layer in enumerate(bb.layers):
            x = layer.input_layernorm(h)
            memory = memory_hook(i, x) if memory_hook is not None else None
            width = memory_bucket(memory.k.shape[2] if memory is not None else 0)
            cache = self._cache(i, b, width, local)
            cache.reset(None if memory is None else Memory(memory.k.to(h.dtype), memory.v.to(h.dtype), memory.valid))
            caches.append(cache)
            widths.append(width)
            h = h + cached_attention(layer.self_attn, x, cos, sin, cache, slots, valid)
            h = h + layer.mlp(layer.post_attention_layernorm(h))
        session = Session(caches, positions[:, -1] + 1, torch.full((1,), t, device=ids.device), t,
                          (b, tuple(widths), local))
        return bb.logits(h[:, -1]), session

    def _cache(self, layer: int, batch: int, memory_slots: int, local_slots: int) -> StaticCache:
        key = (layer, batch, memory_slots, local_slots)
        pool = self._caches.get(key)
        if pool is None:
            a, bb = self.backbone.args, self.backbone
            pool = self._caches[key] = [StaticCache(batch, a.kv_heads, a.head_dim, memory_slots, local_slots,
                                                    bb.dtype, bb.device)]
        return pool[0]

    # ---- decode --------------------------------------------------------------------------------
    @torch.no_grad()
    def decode_one_token(self, session: Session, tokens: torch.Tensor) -> torch.Tensor:
        """Feed one token per row ([B] on the device) and return the next logits [B, V]; a CUDA graph replay
        on a GPU. Raises when the session's token slots are used up."""
        if session.length >= session.capacity:
            raise RuntimeError(f"the session's {session.capacity} token slots are used up")
        if self.use_graphs:
            graph = self._graphs.get(session.signature)
            if graph is None:
                graph = self._graphs[session.signature] = DecodeGraph(self, session)
            logits = graph.replay(session, tokens).clone()  # the graph's output buffer is reused
        else:
            logits = self.step(session.caches, tokens, session.positions, session.slot)
        session.positions += 1
        session.slot += 1
        session.length += 1
        return logits

    def step(self, caches: list[StaticCache], tokens: torch.Tensor, positions: torch.Tensor,
             slot: torch.Tensor) -> torch.Tensor:
        """The decode forward itself (what a graph captures): tokens [B] at positions [B], token slot [1]."""
        bb = self.backbone
        h = bb.embed_tokens(tokens[:, None])
        cos, sin = bb.rotary(positions[:, None], h.dtype)
        valid = torch.ones(tokens.shape[0], 1, dtype=torch.bool, device=tokens.device)
        for layer, cache in zip(bb.layers, caches):
            x = layer.input_layernorm(h)
            h = h + cached_attention(layer.self_attn, x, cos, sin, cache, slot, valid)
            h = h + layer.mlp(layer.post_attention_layernorm(h))
        return bb.logits(h[:, -1])

    @torch.no_grad()
    def extend(self, session: Session, ids: torch.Tensor, causal: bool = True) -> torch.Tensor:
        """Feed a block of tokens [B, T] after the session's last one (an interleave injection; causal=False
        lets the block's tokens see each other both ways). Returns the last position's logits [B, V]."""
        b, t = ids.shape
        if session.length + t > session.capacity:
            raise RuntimeError(f"{t} more tokens do not fit the session's {session.capacity} token slots")
        bb = self.backbone
        positions = session.positions[:, None] + torch.arange(t, device=ids.device)
        slots = session.slot + torch.arange(t, device=ids.device)
        h = bb.embed_tokens(ids)
        cos, sin = bb.rotary(positions, h.dtype)
        valid = torch.ones(b, t, dtype=torch.bool, device=ids.device)
        for layer, cache in zip(bb.layers, session.caches):
            x = layer.input_layernorm(h)
            h = h + cached_attention(layer.self_attn, x, cos, sin, cache, slots, valid, causal)
            h = h + layer.mlp(layer.post_attention_layernorm(h))
        session.positions += t
        session.slot += t
        session.length += t
        return bb.logits(h[:, -1])


class QueryForward:
    """The question's forward to the last routing layer, keeping each routing layer's routing queries: what
    `retrieve` scores (routing on the question's own states: no memory is attended to). Prompts are
    left-padded to a length bucket; on a GPU each (batch, bucket) is captured once as a CUDA graph. Without
    graphs the rows may continue a prompt head whose K/V are given (question_head.py)."""

    def __init__(self, engine: Engine, router: Any, layers: list[int]) -> None:
        self.engine, self.router, self.layers = engine, router, sorted(layers)  # (holds the router: see query_forward)
        self.with_positions = getattr(router, "needs_positions", False)
        self._graphs: dict[tuple[int, int], tuple] = {}
        self._compiled = None

    def drop_graphs(self) -> None:
        self._graphs.clear()

    def forward_fn(self):
        """What a graph captures: `forward`, or its torch.compile'd version (`Engine.set_compile`)."""
        if not self.engine.compile_decode:
            return self.forward
        if self._compiled is None:
            self._compiled = torch.compile(self.forward, dynamic=False, mode=self.engine.compile_mode)
        return self._compiled

    def __call__(self, ids: torch.Tensor, positions: torch.Tensor, valid: torch.Tensor,
                 head: HeadKV | None = None) -> dict[int, torch.Tensor]:
        """Routing queries {layer: [B, T, H, D]} (T: the bucket; rows left-padded, `valid` marks tokens);
        `head`: K/V every row sees in front of its tokens (eager only: a head is never captured)."""
        b, t = ids.shape
        if head is not None or not self.engine.use_graphs:
            return self.forward(ids, positions, valid, self._scratch(b, t, head), head)
        bucket = prompt_bucket(t)
        if bucket > t:  # more left padding: padded slots are masked, so real tokens see the same keys
            pad = bucket - t
            ids = F.pad(ids, (pad, 0))
            positions = F.pad(positions, (pad, 0))
            valid = F.pad(valid, (pad, 0))
        key = (b, bucket)
        if key not in self._graphs:
            self._graphs[key] = self._capture(ids, positions, valid)
        inputs, graph, outputs, _scratch = self._graphs[key]
        for buf, value in zip(inputs, (ids, positions, valid)):
            buf.copy_(value)
        graph.replay()
        return {layer: q.clone() for layer, q in outputs.items()}

    def _scratch(self, batch: int, slots: int, head: HeadKV | None = None) -> StaticCache:
        a, bb = self.engine.backbone.args, self.engine.backbone
        width = head.k[0].shape[2] if head is not None and head.k else 0
        scratch = StaticCache(batch, a.kv_heads, a.head_dim, width, slots, bb.dtype, bb.device)
        scratch.valid[:, :width] = True  # the head's slots, refilled per layer by `forward`
        return scratch

    def _capture(self, ids: torch.Tensor, positions: torch.Tensor, valid: torch.Tensor) -> tuple:
        inputs = (ids.clone(), positions.clone(), valid.clone())
        scratch = self._scratch(*ids.shape)
        forward = self.forward_fn()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):  # warm-up (and compilation) outside the capture
            for _ in range(2 if forward is not self.forward else 1):
                forward(*inputs, scratch)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            outputs = forward(*inputs, scratch)
        # The graph reads and writes the scratch cache's memory: it must live as long as the graph, or the
        # allocator hands that memory to other tensors and each replay corrupts them (and reads garbage).
        return inputs, graph, outputs, scratch

    def forward(self, ids: torch.Tensor, positions: torch.Tensor, valid: torch.Tensor,
                scratch: StaticCache, head: HeadKV | None = None) -> dict[int, torch.Tensor]:
        """Every layer attends through one scratch cache (its keys are not kept), behind the head's K/V."""
        bb = self.engine.backbone
        h = bb.embed_tokens(ids)
        cos, sin = bb.rotary(positions, h.dtype)
        slots = torch.arange(ids.shape[1], device=ids.device)
        wanted, last = set(self.layers), self.layers[-1]
        scratch.mark(slots, valid)  # as every layer's update leaves it, so one mask serves every layer
        mask = scratch.mask(slots)
        queries = {}
        for i, layer in enumerate(bb.layers[: last + 1]):
            x = layer.input_layernorm(h)
            if i in wanted:
                queries[i] = (self.router.project_queries(i, x, positions) if self.with_positions
                              else self.router.project_queries(i, x))
            if i == last:
                break
            if head is not None and scratch.memory_slots:
                scratch.k[:, :, :scratch.memory_slots] = head.k[i]
                scratch.v[:, :, :scratch.memory_slots] = head.v[i]
            h = h + cached_attention(layer.self_attn, x, cos, sin, scratch, slots, valid, mask=mask)
            h = h + layer.mlp(layer.post_attention_layernorm(h))
        return queries


class DecodeGraph:
    """`Engine.step` captured once for a signature; replays read tokens, positions and slot from static
    buffers. The caches it writes are the pool's, shared by every session of that signature."""

    def __init__(self, engine: Engine, session: Session) -> None:
        b = session.positions.shape[0]
        dev = session.positions.device
        self.tokens = torch.zeros(b, dtype=torch.long, device=dev)
        self.positions = session.positions.clone()
        self.slot = session.slot.clone()
        caches, step = session.caches, engine.decode_fn()
        # Warm-up on a side stream (lazy initialisation, compilation) outside the capture. It writes the
        # current slot, which the real step writes again.
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(3):
                step(caches, self.tokens, self.positions, self.slot)
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.logits = step(caches, self.tokens, self.positions, self.slot)

    def replay(self, session: Session, tokens: torch.Tensor) -> torch.Tensor:
        self.tokens.copy_(tokens)
        self.positions.copy_(session.positions)
        self.slot.copy_(session.slot)
        self.graph.replay()
        return self.logits
