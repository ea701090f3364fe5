"""The routed prefill as one CUDA graph (issue 23): routing, top-k and the memory gather on the device.

The eager prefill (`MemoryRouter` as the memory hook) asks the host, in every routing layer, how many
documents a filter allows, which chunks the chosen documents own and how wide their memory is; each
answer is a host sync and a shape that changes from question to question, so a 4B model's first token
waited on ~250 host round trips while its kernels took ~11 ms. Here every shape is fixed before the
prefill starts, from facts about the bank (not the question):
- each layer keeps `k` documents (the caller's top-k, at most the fewest any row's filter allows), in
  `select_top_k`'s order (routing.scores.ranked_top_k, the same two stable sorts);
- each layer's memory is `width` slots: the chosen documents' chunks in top-k order, then padding that
  attention masks out; `width` covers the k longest documents of the bank, so any choice fits.
`StaticMemoryRouter` is that hook; it is also correct eagerly (tests/inference/test_captured.py checks it
against `MemoryRouter` on the CPU). `PrefillGraph` captures `Engine.prefill` with it once per (batch,
prompt bucket, token slots, k, width, bank state) and replays it for the next question of that shape.
A bank change makes new bank tensors, so its graphs are captured again on next use.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

import torch
import torch.nn.functional as F

from ..decoder.backbone import Memory
from ..routing.scores import ranked_top_k
from .engine import Engine, Session, local_bucket, memory_bucket, prompt_bucket
from .memory_router import LayerRouting, MemoryRouter, per_state

MAX_GRAPHS = 8  # captured prefills kept per engine (least recently used dropped)


def memory_width(bank: Any, k: int) -> int:
    """Memory slots that hold any k documents of the bank: the k longest documents' chunks, bucketed."""
    counts = bank.chunk_counts
    longest = per_state(bank.kr_bar, f"longest{k}", lambda: int(counts.topk(min(k, counts.numel())).values.sum()))
    return memory_bucket(longest)


class StaticMemoryRouter(MemoryRouter):
    """A MemoryRouter whose decisions take fixed shapes and no host sync: `k` documents per row and layer,
    memory `width` slots wide. `allowed` is a full [B, N] mask (a buffer a graph reads)."""

    def __init__(self, hook: MemoryRouter, k: int, width: int, allowed: torch.Tensor) -> None:
        super().__init__(hook.bank, hook.router, hook.cfg, hook.routing_mask, allowed=allowed, top_k=k,
                         attend=True, positions=hook.positions)
        self.width = width
        self._validated = True  # the kernels' one-time input check syncs; the caller's prompts are well formed
        bank = hook.bank
        self._offsets, self._counts = bank.chunk_offsets, bank.chunk_counts

    def _top_k(self, scores: torch.Tensor, allowed: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        return ranked_top_k(scores, allowed, self.top_k)  # k fixed beforehand: no checks, no host sync

    def _gather(self, li: int, rows: torch.Tensor, device: torch.device, dtype: torch.dtype) -> Memory:
        """The chosen documents' chunks in top-k order, slot j of row b holding chunk `chunk[b, j]`; slots past
        the row's last chunk are padding (valid False, chunk 0)."""
        b, k = rows.shape
        counts, starts = self._counts[rows], self._offsets[rows]  # [B, k]
        ends = counts.cumsum(1)
        slot = torch.arange(self.width, device=rows.device).expand(b, -1).contiguous()
        which = torch.searchsorted(ends, slot, right=True)  # the document slot j falls in
        valid = which < k
        which = which.clamp(max=k - 1)
        chunk = starts.gather(1, which) + slot - (ends - counts).gather(1, which)
        chunk = torch.where(valid, chunk, 0).flatten()
        bank = self.bank
        shape = (b, self.width, bank.kv_heads, bank.head_dim)
        k_mem = bank.k_bar[li].index_select(0, chunk).view(shape).transpose(1, 2).to(device, dtype)
        v_mem = bank.v_bar[li].index_select(0, chunk).view(shape).transpose(1, 2).to(device, dtype)
        return Memory(k_mem, v_mem, valid.to(device))


def static_router(hook: MemoryRouter, batch: int) -> StaticMemoryRouter | None:
    """The fixed-shape version of an eager hook, or None where the eager path must run: a subclass (the
    reference profile, Memory Parallel), scoring only, an empty bank, scoring on the reference (CPU)
    path, or a filter that leaves a row no document."""
    bank = hook.bank
    if type(hook) is not MemoryRouter or not hook.attend or len(bank) == 0:
        return None
    n = bank.num_parts
    allowed = (torch.ones(batch, n, dtype=torch.bool, device=bank.chunk_counts.device) if hook.allowed is None
               else hook.allowed.to(bank.chunk_counts.device).expand(batch, n).contiguous())
    k = min(hook.top_k, n if hook.allowed is None else int(allowed.sum(1).min()))  # (a filter: one sync)
    if k <= 0:
        return None
    return StaticMemoryRouter(hook, k, memory_width(bank, k), allowed)


def capturable(engine: Engine, hook: MemoryRouter) -> bool:
    """Whether a prefill with this hook can be captured: graphs on, routing by the GPU kernels, and the
    bank's tensors on the model's GPU (a bank in host memory keeps the eager path and its staged copies)."""
    bank, dev = hook.bank, engine.backbone.device
    if not (engine.use_graphs and engine.capture_prefill) or type(hook) is not MemoryRouter or not hook.attend:
        return False
    if hook.cfg.kernel == "reference" or hook.cfg.head_reduce != "mean" or hook.cfg.query_reduce == "colbert":
        return False
    return all(t.device == dev for t in (bank.k_bar, bank.v_bar, bank.kr_bar, bank.chunk_counts))


class PrefillGraph:
    """`Engine.prefill` with a StaticMemoryRouter, captured once; replays read the prompt, its routing mask
    and the filter from static buffers and leave logits and every layer's decision in static outputs."""

    def __init__(self, engine: Engine, router: StaticMemoryRouter, ids: torch.Tensor, positions: torch.Tensor,
                 valid: torch.Tensor, extra_tokens: int) -> None:
        self.engine, self.router, self.extra = engine, router, extra_tokens
        bank = router.bank  # the graph reads these tensors' memory: they must live as long as it does
        self.held = (bank.k_bar, bank.v_bar, bank.kr_bar, bank.chunk_doc, bank.chunk_counts, bank.chunk_offsets)
        self.ids, self.positions, self.valid = ids.clone(), positions.clone(), valid.clone()
        router.routing_mask = router.routing_mask.clone()
        router.positions = self.positions
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):  # warm-up: Triton compiles, caches and key norms made outside capture
            engine.prefill(self.ids, self.positions, self.valid, memory_hook=router, extra_tokens=extra_tokens)
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.logits, session = engine.prefill(self.ids, self.positions, self.valid, memory_hook=router,
                                                  extra_tokens=extra_tokens)
        self.caches, self.signature = session.caches, session.signature

    def replay(self, ids: torch.Tensor, positions: torch.Tensor, valid: torch.Tensor, routing: torch.Tensor,
               allowed: torch.Tensor) -> tuple[torch.Tensor, Session, dict[int, LayerRouting]]:
        for buf, value in ((self.ids, ids), (self.positions, positions), (self.valid, valid),
                           (self.router.routing_mask, routing), (self.router.allowed, allowed)):
            buf.copy_(value)
        self.graph.replay()
        t = self.ids.shape[1]
        session = Session(self.caches, self.positions[:, -1] + 1, torch.full((1,), t, device=ids.device), t,
                          self.signature)
        routings = {layer: LayerRouting(r.doc_scores.clone(), r.selected.clone(), r.selected_scores.clone())
                    for layer, r in self.router.routings.items()}
        return self.logits.clone(), session, routings


def captured_prefill(engine: Engine, hook: MemoryRouter, ids: torch.Tensor, positions: torch.Tensor,
                     valid: torch.Tensor, routing: torch.Tensor, extra_tokens: int):
    """(logits [B, V], session) of a routed prefill replayed from a captured graph, with `hook.routings` filled
    as the eager prefill fills them; None when this hook cannot take the static shapes (run eagerly)."""
    b, t = ids.shape
    static = static_router(hook, b)
    if static is None:
        return None
    pad = prompt_bucket(t) - t
    if pad:  # more left padding: masked keys, positions of real tokens unchanged
        ids, positions, valid, routing = (F.pad(x, (pad, 0)) for x in (ids, positions, valid, routing))
    cfg, bank = hook.cfg, hook.bank
    graphs: OrderedDict = engine.prefill_graphs
    for old in [key for key, g in graphs.items() if g.router.bank is bank and g.held[2] is not bank.kr_bar]:
        del graphs[old]  # the bank changed since: free the graph and the old tensors it holds
    # (the graph holds the bank's kr_bar and the router, so their ids are not reused while it lives)
    key = (b, t + pad, local_bucket(t + pad + extra_tokens), static.top_k, static.width, id(bank.kr_bar),
           id(hook.router), cfg.normalization, cfg.query_reduce, cfg.chunk_reduce, cfg.kernel, cfg.exact_scores,
           cfg.score_keys)  # (the int8 keys a graph reads live as long as the bank's kr_bar it holds)
    graph = graphs.get(key)
    if graph is None:
        static.routing_mask = routing
        graph = graphs[key] = PrefillGraph(engine, static, ids, positions, valid, extra_tokens)
        while len(graphs) > MAX_GRAPHS:
            graphs.popitem(last=False)
    graphs.move_to_end(key)
    logits, session, hook.routings = graph.replay(ids, positions, valid, routing, static.allowed)
    return logits, session
