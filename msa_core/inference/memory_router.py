"""The memory hook of a routed prefill: in each routing layer the question's routing queries are scored
against the bank's pooled routing keys (paper Eq. 2), each row keeps its top-k documents for this layer,
and their pooled K/V go in front of the question's own keys. `MemoryRouter` is the eager hook (every path
and the oracle of the captured one, captured.py); the helpers below cache what a bank state derives.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Any

import torch

from .. import kernels
from ..config import RoutingConfig
from ..decoder.backbone import Memory
from ..errors import InvalidInputError
from ..memory.bank import MemoryBank
from ..routing.projectors import RouterProjectors
from ..routing.scores import (
    check_doc_map,
    dequantized_keys,
    document_scores,
    prepared_keys,
    quantized_keys,
    select_top_k,
)

# Tensors derived from a bank state (inverse key norms; prepared or int8 keys; K̄_R and the chunk index copied to a
# GPU for a bank held in CPU memory), keyed by (id of the state's kr_bar, what) and dropped when that kr_bar dies: every
# mutation makes a new one. Not a WeakKeyDictionary: it would compare tensors with ==.
PER_STATE: dict[tuple[int, str], Any] = {}
PREPARED_KEYS_BYTES = 1 << 30  # float32 routing keys kept per bank state up to this size (scoring_keys)


def per_state(kr_bar: torch.Tensor, what: str, make: Callable[[], Any]) -> Any:
    key = (id(kr_bar), what)
    hit = PER_STATE.get(key)
    if hit is None:
        hit = PER_STATE[key] = make()
        weakref.finalize(kr_bar, PER_STATE.pop, key, None)
    return hit


def key_inv_norms(kr_bar: torch.Tensor) -> torch.Tensor:
    return per_state(kr_bar, "inv_norms", lambda: kernels.inverse_key_norms(kr_bar))


def checked_chunk_index(bank: MemoryBank) -> bool:
    """Every chunk's document index in range, checked once per bank state (one host sync)."""
    def check() -> bool:
        check_doc_map(bank.chunk_doc, bank.num_chunks, bank.num_parts)
        return True
    return per_state(bank.kr_bar, "chunk_index_checked", check)


def scoring_keys(bank: MemoryBank, normalization: str, dtype: torch.dtype = torch.float32,
                 int8: bool = False) -> torch.Tensor | None:
    """The bank's routing keys as the PyTorch scorer reads them (unit length for cosine; in float32 the same
    numbers it would make per call), made once per bank state while they take at most PREPARED_KEYS_BYTES,
    else None (prepared per call). On the CPU this took ~3.5 ms off each HotpotQA-100 question.
    int8: the float32 dequantised int8 keys (routing.score_keys='int8': the numbers the GPU kernel scores)."""
    kr = bank.kr_bar
    if int8:
        dtype = torch.float32
    if kr.numel() * dtype.itemsize > PREPARED_KEYS_BYTES:
        return None
    if int8:
        return per_state(kr, f"int8_keys_{normalization}",
                         lambda: dequantized_keys(*quantized_keys(kr, normalization)))
    return per_state(kr, f"prepared_keys_{normalization}_{dtype}", lambda: prepared_keys(kr, normalization, dtype))


def int8_keys_on(bank: MemoryBank, normalization: str, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 keys [L, C, Hkv, D], scales [L, C, Hkv]) of the bank's routing keys on `device`, made once per bank
    state (routing.score_keys='int8'); a bank in host memory is quantised block by block on that device."""
    kr = bank.kr_bar
    return per_state(kr, f"int8_{normalization}_{device}", lambda: quantized_keys(kr, normalization, device))


def key_dtype(states_dtype: torch.dtype, exact_scores: bool) -> torch.dtype:
    """What the PyTorch scorer holds the bank's routing keys in for queries projected from hidden states of
    `states_dtype`: bfloat16 for a bfloat16 model (whose queries already carry bfloat16 rounding; half the
    bytes to read: ~3 ms of a CPU question on HotpotQA-100) unless the config asks for exact scores, else
    float32 (the reference's numbers; the exact fp32 path)."""
    return torch.bfloat16 if states_dtype == torch.bfloat16 and not exact_scores else torch.float32


def routing_on(bank: MemoryBank, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(kr_bar, chunk_doc) of the bank on `device`: its own tensors when they live there, else copies made
    once per bank state (a GPU model routing a bank in CPU memory gets the layout bank.to(device, kv="host")
    would give), not once per question and layer."""
    kr = bank.kr_bar
    keys = kr if kr.device == device else per_state(kr, str(device), lambda: kr.to(device))
    return keys, chunk_index_on(bank, device)


def chunk_index_on(bank: MemoryBank, device: torch.device) -> torch.Tensor:
    """The bank's chunk -> part index on `device` (copied once per bank state)."""
    if bank.chunk_doc.device == device:
        return bank.chunk_doc
    return per_state(bank.kr_bar, f"chunk_doc_{device}", lambda: bank.chunk_doc.to(device))



class LayerRouting:
    """What one routing layer decided for a batch: doc_scores [B, N], every part row's score (-inf where
    filtered out); selected [B, k], the part rows attended to, best first, and selected_scores [B, k].
    Given `choose` instead of the choice, the choice is made on first use: a scoring-only pass (retrieve)
    reads only the scores, and choosing costs host syncs (select_top_k's checks)."""

    def __init__(self, doc_scores: torch.Tensor, selected: torch.Tensor | None = None,
                 selected_scores: torch.Tensor | None = None,
                 choose: Callable[[], tuple[torch.Tensor, torch.Tensor]] | None = None) -> None:
        self.doc_scores = doc_scores
        self._choice = None if selected is None else (selected_scores, selected)
        self._choose = choose

    def _chosen(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._choice is None:
            self._choice, self._choose = self._choose(), None
        return self._choice

    @property
    def selected(self) -> torch.Tensor:
        return self._chosen()[1]

    @property
    def selected_scores(self) -> torch.Tensor:
        return self._chosen()[0]


class MemoryRouter:
    """Memory hook for `Backbone.forward`: routes in routing layers, returns the chosen K/V."""

    def __init__(self, bank: MemoryBank, router: RouterProjectors, cfg: RoutingConfig,
                 routing_mask: torch.Tensor, *, allowed: torch.Tensor | None = None,
                 top_k: int | None = None, attend: bool = True,
                 positions: torch.Tensor | None = None) -> None:
        self.bank, self.router, self.cfg = bank, router, cfg
        self.routing_mask = routing_mask
        # RoPE positions of the prompt: only routers whose queries are the attention's own rotated q
        # (MSA checkpoints without decouple_router) need them.
        self.positions = positions
        self.allowed = allowed
        self.top_k = top_k or cfg.top_k
        self.attend = attend  # False: score only (retrieval of documents without generation)
        self.layer_pos = {layer: i for i, layer in enumerate(bank.layers)}
        self.routings: dict[int, LayerRouting] = {}
        self.pending: dict[int, torch.Tensor] = {}  # layer -> routing queries awaiting `finish`
        self._validated = False  # the kernels check the mask and chunk index once (a host sync), not per layer

    def __call__(self, layer: int, x: torch.Tensor) -> Memory | None:
        li = self.layer_pos.get(layer)
        if li is None or len(self.bank) == 0:
            return None
        q = self._routing_queries(layer, x)
        if not self.attend and self._route_device(q) is not None:
            # scoring only: nothing this layer returns depends on the scores, so keep the queries and
            # score every layer in one kernel launch in `finish` (one long read of K̄_R, not L short ones)
            self.pending[layer] = q
            return None
        _, rows = self._record(layer, self._doc_scores(li, q, x.dtype))
        if not self.attend or rows.shape[1] == 0:
            return None
        return self._gather(li, rows, x.device, x.dtype)

    def score_queries(self, queries: dict[int, torch.Tensor], states_dtype: torch.dtype = torch.float32) -> None:
        """Score routing queries computed elsewhere (the engine's query forward) from hidden states of
        `states_dtype`: every layer in one launch where routing runs on a GPU, else layer by layer with the
        reference (`key_dtype`)."""
        if len(self.bank) == 0:
            return
        first = next(iter(queries.values()))
        if self._route_device(first) is not None:
            self.pending.update(queries)
            self.finish()
            return
        layers = list(queries)
        self._record_layers(layers, torch.stack([
            self._doc_scores(self.layer_pos[layer], queries[layer], states_dtype) for layer in layers]))

    def finish(self) -> None:
        """Score the layers a scoring-only pass deferred (see __call__); a no-op when none were."""
        if not self.pending:
            return
        layers = sorted(self.pending)
        lis = [self.layer_pos[layer] for layer in layers]
        cfg, bank = self.cfg, self.bank
        q = torch.stack([self.pending.pop(layer) for layer in layers])
        kr_all, chunk_doc, columns = self._kernel_inputs(self._route_device(q))
        whole = lis == list(range(kr_all.shape[0]))  # the usual case: no copy of the bank's keys
        kr = kr_all if whole else kr_all[lis]
        columns = {name: t if t is None or whole else t[lis] for name, t in columns.items()}
        scores = kernels.layer_routing_scores(
            q.to(kr.device), self.routing_mask.to(kr.device), kr, chunk_doc, bank.num_parts,
            normalization=cfg.normalization, query_reduce=cfg.query_reduce, chunk_reduce=cfg.chunk_reduce,
            backend=cfg.kernel, validate=self._validate_once(), exact=cfg.exact_scores, **columns)
        self._record_layers(layers, scores)

    def _record(self, layer: int, doc_scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mask filtered documents, keep this layer's top-k, remember the decision."""
        self._record_layers([layer], doc_scores[None])
        return self.routings[layer].selected_scores, self.routings[layer].selected

    def _record_layers(self, layers: list[int], scores: torch.Tensor) -> None:
        """`_record` for several layers' scores [L, B, N] at once: one top-k over every (layer, row)."""
        n_layers, b, n = scores.shape
        allowed = None
        if self.allowed is not None:
            allowed = self.allowed.to(scores.device).expand(b, n)
            scores = scores.masked_fill(~allowed, float("-inf"))
        if not self.attend:  # nothing attends to the choice: made only if someone reads it
            for i, layer in enumerate(layers):
                self.routings[layer] = LayerRouting(scores[i], choose=lambda s=scores[i]: self._top_k(s, allowed))
            return
        values, rows = self._top_k(scores.flatten(0, 1), None if allowed is None else allowed.repeat(n_layers, 1))
        values, rows = values.view(n_layers, b, -1), rows.view(n_layers, b, -1)
        for i, layer in enumerate(layers):
            self.routings[layer] = LayerRouting(scores[i], rows[i], values[i])

    def _top_k(self, scores: torch.Tensor, allowed: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """(values, rows) of each row's best documents: scores [R, N], allowed [R, N] or None."""
        return select_top_k(scores, self.top_k, allowed)

    def _route_device(self, q: torch.Tensor) -> torch.device | None:
        """Where the Triton kernels score, or None for the PyTorch reference: the bank's GPU; the model's
        GPU for a bank in CPU memory (K̄_R copied there once, `_routing_on`); the CPU only for kernel='triton'
        (Triton's interpreter)."""
        cfg, kr = self.cfg, self.bank.kr_bar
        if cfg.kernel == "reference" or cfg.head_reduce != "mean" or cfg.query_reduce == "colbert":
            return None  # the Triton kernels compute Eq. 2 only
        if kr.is_cuda:
            return kr.device
        if q.is_cuda:
            return q.device
        return kr.device if cfg.kernel == "triton" else None

    def _kernel_inputs(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor | None]]:
        """(keys [L, C, Hkv, D], chunk index, per-key columns [L, C, Hkv] by keyword) the kernels score on
        `device`, cached per bank state: the bank's keys with their inverse norms (cosine-type scoring; None for
        scaled_dot), or int8 keys with their scales (score_keys='int8'; the bank's keys are not copied)."""
        cfg, bank = self.cfg, self.bank
        if cfg.score_keys == "int8":
            values, scales = int8_keys_on(bank, cfg.normalization, device)
            return values, chunk_index_on(bank, device), {"key_scales": scales}
        kr_all, chunk_doc = routing_on(bank, device)
        inv = key_inv_norms(kr_all) if cfg.normalization != "scaled_dot" else None
        return kr_all, chunk_doc, {"key_inv_norms": inv}

    def trust_prompts(self, prompts: Any) -> None:
        """The routing mask is these prompts' (`Prompt.routing`): check on the host that every row routes with
        at least one token, and the bank's chunk index once per bank state, so that no scoring call syncs
        with the device to check them (the kernels' `validate`)."""
        if self.bank is None or not len(self.bank):
            return  # nothing is scored
        empty = [row for row, p in enumerate(prompts) if not any(p.routing)]
        if empty:
            raise InvalidInputError(f"rows {empty} have no valid routing token (token_mask is all False)")
        checked_chunk_index(self.bank)
        self._validated = True

    def _validate_once(self) -> bool:
        """True the first time: the routing mask and the bank's chunk index are the same in every layer."""
        first, self._validated = not self._validated, True
        return first

    def _doc_scores(self, li: int, q: torch.Tensor, states_dtype: torch.dtype) -> torch.Tensor:
        """[B, N] document scores of routing-layer position li for queries q projected from hidden states of
        `states_dtype`: the Triton kernel where routing runs on a GPU (kernels.routing_scores, parity-tested
        against the reference), else routing.scores with keys in `key_dtype`."""
        cfg, bank = self.cfg, self.bank
        device = self._route_device(q)
        if device is not None:
            kr_all, chunk_doc, columns = self._kernel_inputs(device)
            return kernels.routing_scores(
                q.to(device), self.routing_mask.to(device), kr_all[li], chunk_doc, bank.num_parts,
                normalization=cfg.normalization, query_reduce=cfg.query_reduce, chunk_reduce=cfg.chunk_reduce,
                backend=cfg.kernel, validate=self._validate_once(), exact=cfg.exact_scores,
                **{name: None if t is None else t[li] for name, t in columns.items()})
        int8 = cfg.score_keys == "int8"
        keys = scoring_keys(bank, cfg.normalization, key_dtype(states_dtype, cfg.exact_scores), int8)
        layer_keys = bank.kr_bar[li] if keys is None else keys[li]
        if keys is None and int8:  # too large to keep dequantised: this layer's, per call
            layer_keys = dequantized_keys(*quantized_keys(layer_keys, cfg.normalization))
        return document_scores(q, self.routing_mask, layer_keys, bank.chunk_doc,
                               bank.num_parts, head_reduce=cfg.head_reduce, query_reduce=cfg.query_reduce,
                               chunk_reduce=cfg.chunk_reduce, normalization=cfg.normalization,
                               keys_prepared=keys is not None or int8)

    def _routing_queries(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        if getattr(self.router, "needs_positions", False):
            if self.positions is None:
                raise InvalidInputError("this router routes with the attention's rotated queries; "
                                        "pass the prompt positions to MemoryRouter")
            return self.router.project_queries(layer, x, self.positions)
        return self.router.project_queries(layer, x)

    def _gather(self, li: int, rows: torch.Tensor, device: torch.device, dtype: torch.dtype) -> Memory:
        """Pooled K/V of each row's chosen documents, right-padded to the longest row. Only those chunks
        move (bank.gather_kv: one copy per tier, through pinned memory from a host tier to a GPU)."""
        chunk_lists = [self.bank.chunks_of(r) for r in rows]
        counts = [len(c) for c in chunk_lists]
        k_all, v_all = self.bank.gather_kv(li, torch.cat(chunk_lists), device, dtype)  # [sum(counts), kv, D]
        b, m = rows.shape[0], max(counts)
        k = torch.zeros(b, self.bank.kv_heads, m, self.bank.head_dim, dtype=dtype, device=device)
        v = torch.zeros_like(k)
        valid = torch.zeros(b, m, dtype=torch.bool, device=device)
        start = 0
        for row, n in enumerate(counts):
            k[row, :, :n] = k_all[start:start + n].transpose(0, 1)
            v[row, :, :n] = v_all[start:start + n].transpose(0, 1)
            valid[row, :n] = True
            start += n
        return Memory(k, v, valid)
