"""Router training through the backbone's upper layers: the paper's way past a frozen backbone's ceiling.

A router on frozen states plateaus (README, Training routers); training the upper layers with the same
routing loss lifts held-out and HotpotQA recall well beyond it. Here layers 0..F-1 stay frozen and run once:
their output (the residual stream entering layer F) is kept per token for every document and question.
Each step runs layers F.. with rank-r adapters (msa_core/lora.py) over the batch, pools the documents'
normed states over chunks exactly as encoding does, and applies the router trainer's loss; a small
next-token loss on a few of the batch's documents keeps the generator a language model. The adapters are
saved in the router file and merged into the backbone when a model loads it.

`TunedTrainer` is a RouterTrainer whose states are computed, not cached: batches, schedule, held-out
evaluation and checkpoints (adapters included) are the router trainer's own.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from itertools import accumulate
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from ..decoder.lora import adapter_tensors, attach, base_view, combine
from ..errors import InvalidInputError
from ..inference.encode import plan_batches, pool_chunks
from ..inference.generate import build_prompt, left_pad, query_positions
from .cache import MAX_QUERY_TOKENS, RaggedStates
from .data import TrainingSet
from .trainer import RouterTrainer, TrainConfig, read_training_data

TRAIN_DOC_TOKENS = 512  # documents are cut here in training steps (most are shorter); evaluation uses the model's cap
LM_DOCS = 16  # documents per step that carry the next-token loss
LORA_SCALE = 2.0  # alpha = 2r, the usual choice


class TokenStates:
    """The residual stream entering layer F, per token, for many sequences back to back."""

    def __init__(self, h: torch.Tensor, positions: torch.Tensor, routing: torch.Tensor, offsets: list[int],
                 ids: torch.Tensor | None = None) -> None:
        self.h, self.positions, self.routing, self.ids = h, positions, routing, ids
        self.lengths = [offsets[i + 1] - offsets[i] for i in range(len(offsets) - 1)]
        # Token numbers as ragged rows: their padded batch indexes every per-token tensor at once.
        self._tokens = RaggedStates(torch.arange(offsets[-1], device=h.device), torch.tensor(offsets))

    def __len__(self) -> int:
        return len(self.lengths)

    def batch(self, items: Sequence[int], max_tokens: int | None = None):
        """Right-padded h [B, T, hidden], positions [B, T], routing mask [B, T], lengths [B] and token ids
        [B, T] (None for questions) of `items`, each cut to max_tokens. Pads repeat token 0; the lengths
        and the routing mask leave them out."""
        index, real = self._tokens.padded(items)
        index, real = index[:, :max_tokens], real[:, :max_tokens]
        ids = None if self.ids is None else self.ids[index]
        return self.h[index], self.positions[index], self.routing[index] & real, real.sum(1), ids


@torch.no_grad()
def lower_documents(backbone: Any, tokenizer: Any, texts: Sequence[str], first: int, max_tokens: int,
                    dtype: torch.dtype) -> TokenStates:
    """Layers 0..first-1 over each document on its own (positions from 0), as encoding runs them."""
    token_ids = [ids[:max_tokens] for ids in tokenizer(list(texts), add_special_tokens=False)["input_ids"]]
    if any(not ids for ids in token_ids):
        raise InvalidInputError("a training document has no tokens")
    lens = [len(ids) for ids in token_ids]
    offsets, dev = list(accumulate(lens, initial=0)), backbone.device
    h_out = torch.empty(offsets[-1], backbone.args.hidden_size, dtype=dtype, device=dev)
    for batch in plan_batches(lens, 256, 65536):
        t = lens[batch[0]]
        ids = torch.zeros(len(batch), t, dtype=torch.long)
        for row, i in enumerate(batch):
            ids[row, :lens[i]] = torch.tensor(token_ids[i])
        ids = ids.to(dev)
        h = backbone(ids, torch.arange(t, device=dev).expand_as(ids), last_layer=first - 1)
        for row, i in enumerate(batch):
            h_out[offsets[i]:offsets[i + 1]] = h[row, :lens[i]].to(dtype)
    positions = torch.cat([torch.arange(n) for n in lens]).to(dev)
    flat_ids = torch.tensor([t for ids in token_ids for t in ids], dtype=torch.long, device=dev)
    return TokenStates(h_out, positions, torch.ones_like(positions, dtype=torch.bool), offsets, flat_ids)


@torch.no_grad()
def lower_queries(backbone: Any, tokenizer: Any, queries: Sequence[str], first: int, position_offset: int,
                  dtype: torch.dtype) -> TokenStates:
    """Layers 0..first-1 over each question's prompt, at the positions retrieval uses."""
    prompts = [build_prompt(tokenizer, q) for q in queries]
    lens = [len(p.ids) for p in prompts]
    offsets, dev = list(accumulate(lens, initial=0)), backbone.device
    h_out = torch.empty(offsets[-1], backbone.args.hidden_size, dtype=dtype, device=dev)
    pos_out = torch.empty(offsets[-1], dtype=torch.long, device=dev)
    rout_out = torch.empty(offsets[-1], dtype=torch.bool, device=dev)
    for batch in plan_batches(lens, 512, 65536):
        ids, valid, routing = left_pad([prompts[i] for i in batch], tokenizer.pad_token_id or 0, dev)
        pos = query_positions(valid, position_offset)
        h = backbone(ids, pos, valid=valid, last_layer=first - 1)
        for row, i in enumerate(batch):
            v = valid[row]
            h_out[offsets[i]:offsets[i + 1]] = h[row][v].to(dtype)
            pos_out[offsets[i]:offsets[i + 1]] = pos[row][v]
            rout_out[offsets[i]:offsets[i + 1]] = routing[row][v]
    return TokenStates(h_out, pos_out, rout_out, offsets)


def _layer(layer: Any, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One decoder layer: its normed input (what routing reads) and the residual stream after it."""
    x = layer.input_layernorm(h)
    h = h + layer.self_attn(x, cos, sin, None, None, None)
    return x, h + layer.mlp(layer.post_attention_layernorm(h))


def upper(backbone: Any, h: torch.Tensor, positions: torch.Tensor, first: int, layers: Sequence[int],
          last: int | None = None, recompute: bool = False) -> dict[Any, torch.Tensor]:
    """Layers first..last (default max(layers)) over right-padded sequences: pads come last and attention
    is causal, so no real token sees them. Returns each of `layers`' normed input (what Backbone.forward's
    capture hook sees) and, under "out", the residual stream after `last`. recompute: keep only each
    layer's input for the backward pass and run the layer again there (activation checkpointing)."""
    h = h.float()
    cos, sin = backbone.rotary(positions, h.dtype)
    out: dict[Any, torch.Tensor] = {}
    recompute = recompute and torch.is_grad_enabled()
    for i in range(first, (max(layers) if last is None else last) + 1):
        if recompute:
            x, h = checkpoint(_layer, backbone.layers[i], h, cos, sin, use_reentrant=False)
        else:
            x, h = _layer(backbone.layers[i], h, cos, sin)
        if i in layers:
            out[i] = x
    out["out"] = h
    return out


def document_states(backbone: Any, lower: TokenStates, items: Sequence[int], first: int, layers: Sequence[int],
                    chunk: int, max_tokens: int, token_budget: int = 65536,
                    recompute: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Pooled states [C, L, hidden] of the documents `items` and the position in `items` of each chunk's
    document. Runs in length-sorted sub-batches of at most token_budget padded tokens."""
    lens = [min(lower.lengths[i], max_tokens) for i in items]
    xs, owners = [], []
    for sub in plan_batches(lens, 512, token_budget):
        h, pos, _, n, _ = lower.batch([items[j] for j in sub], max_tokens)
        states = upper(backbone, h, pos, first, layers, recompute=recompute)
        pooled = torch.stack([pool_chunks(states[layer], n, chunk) for layer in layers], dim=2)  # [b, C, L, hidden]
        counts = (n + chunk - 1) // chunk
        xs.append(pooled[torch.arange(pooled.shape[1], device=h.device)[None, :] < counts[:, None]])
        owners.append(torch.repeat_interleave(torch.tensor(sub, device=h.device), counts))
    return torch.cat(xs), torch.cat(owners)


def question_states(backbone: Any, lower: TokenStates, items: Sequence[int], first: int,
                    layers: Sequence[int], recompute: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Routing-token states [B, T, L, hidden] (left-aligned, the first MAX_QUERY_TOKENS) and mask [B, T]."""
    h, pos, rout, _, _ = lower.batch(items)
    states = upper(backbone, h, pos, first, layers, recompute=recompute)
    x = torch.stack([states[layer] for layer in layers], dim=2)
    counts = rout.sum(1).clamp(max=MAX_QUERY_TOKENS)
    m = int(counts.max())
    first_routing = torch.sort((~rout).to(torch.uint8), dim=1, stable=True).indices[:, :m]  # routing tokens, in order
    mask = torch.arange(m, device=x.device)[None, :] < counts[:, None]
    q_x = x.gather(1, first_routing[:, :, None, None].expand(-1, -1, *x.shape[2:])) * mask[:, :, None, None]
    return q_x, mask


@torch.no_grad()
def ragged_states(backbone: Any, questions: TokenStates, documents: TokenStates, first: int, layers: Sequence[int],
                  chunk: int, max_doc_tokens: int) -> tuple[RaggedStates, RaggedStates]:
    """All questions' and documents' states in the layout train_cache gives (what `evaluate` reads)."""
    d_x, owner = document_states(backbone, documents, range(len(documents)), first, layers, chunk, max_doc_tokens,
                                 token_budget=131072)
    order = torch.argsort(owner, stable=True)
    d_off = torch.cat([torch.zeros(1, dtype=torch.long),
                       torch.bincount(owner.cpu(), minlength=len(documents)).cumsum(0)])
    rows, counts = [], []
    for s in range(0, len(questions), 512):
        q_x, mask = question_states(backbone, questions, range(s, min(s + 512, len(questions))), first, layers)
        rows.append(q_x[mask])  # row-major: each question's tokens in order, question after question
        counts.append(mask.sum(1).cpu())
    q_off = torch.cat([torch.zeros(1, dtype=torch.long), torch.cat(counts).cumsum(0)])
    return RaggedStates(torch.cat(rows), q_off), RaggedStates(d_x[order], d_off)


def lm_loss(backbone: Any, lower: TokenStates, items: Sequence[int], first: int, max_tokens: int,
            recompute: bool = False) -> torch.Tensor:
    """Mean next-token cross-entropy of the backbone over the documents `items` (cut to max_tokens)."""
    h, pos, _, n, ids = lower.batch(items, max_tokens)
    final = upper(backbone, h, pos, first, [first], last=backbone.args.num_layers - 1, recompute=recompute)["out"]
    logits = backbone.lm_head(backbone.norm(final[:, :-1])).float()
    target = ids[:, 1:]
    real = torch.arange(h.shape[1] - 1, device=h.device)[None, :] < (n[:, None] - 1)
    return F.cross_entropy(logits[real], target[real])


class TunedTrainer(RouterTrainer):
    """The router trainer, with states computed through adapted upper layers instead of read from a cache."""

    def __init__(self, model: Any, router: Any, layers: Sequence[int], train: TrainingSet, train_q: TokenStates,
                 train_d: TokenStates, heldout: TrainingSet | None, held_q: TokenStates | None,
                 held_d: TokenStates | None, adapters: dict[str, torch.nn.Parameter], config: TrainConfig, *,
                 checkpoint_dir: str | Path | None = None, log: Any = None) -> None:
        super().__init__(router, layers, train, None, None, heldout, None, None, config, model.config.routing,
                         checkpoint_dir=checkpoint_dir, log=log, extra_parameters=adapters,
                         extra_lr_scale=config.adapter_lr / config.lr)
        self.backbone, self.first = model.backbone, int(config.tune_from_layer)
        self.chunk, self.max_doc_tokens = model.config.encode.chunk_size, model.config.encode.max_doc_tokens
        self.train_q, self.train_d, self.held_q, self.held_d = train_q, train_d, held_q, held_d
        self.mine_steps = []  # mining with the router would need every training document through the upper layers

    def batch_states(self, rows: Sequence[int], docs: Sequence[int]):
        recompute = self.cfg.recompute
        d_x, owner = document_states(self.backbone, self.train_d, docs, self.first, self.layers, self.chunk,
                                     TRAIN_DOC_TOKENS, recompute=recompute)
        q_x, q_mask = question_states(self.backbone, self.train_q, rows, self.first, self.layers, recompute)
        return q_x, q_mask, d_x, owner

    def extra_loss(self, docs: Sequence[int]) -> tuple[torch.Tensor | None, dict[str, float]]:
        if not self.cfg.lm_weight:
            return None, {}
        lm = lm_loss(self.backbone, self.train_d, docs[:LM_DOCS], self.first, TRAIN_DOC_TOKENS, self.cfg.recompute)
        return self.cfg.lm_weight * lm, {"lm_loss": float(lm.detach())}

    def heldout_states(self) -> tuple[RaggedStates, RaggedStates]:
        assert self.held_q is not None and self.held_d is not None
        with self.autocast:
            return ragged_states(self.backbone, self.held_q, self.held_d, self.first, self.layers, self.chunk,
                                 self.max_doc_tokens)

    def backbone_delta(self) -> tuple[dict[str, torch.Tensor], float]:
        """The new adapters, stacked onto the starting router's delta (already merged into the weights they
        trained on), so the file holds the whole change from the base backbone."""
        start = self.router.backbone_delta
        new = adapter_tensors(self.backbone)
        return (combine(start, self.router.delta_scale, new, LORA_SCALE) if start else new), LORA_SCALE


def prepare_tuned_trainer(model: Any, data: Sequence[str | Path], config: TrainConfig, *,
                          checkpoint_dir: str | Path | None = None, log: Any = print,
                          show_progress_bar: bool | None = None) -> tuple[TunedTrainer, dict[str, Any]]:
    """Read the data, run the frozen lower layers once, attach adapters from config.tune_from_layer up and
    start from a float32 copy of the model's router. Leaves adapters on model.backbone (train_router
    removes them when it is done)."""
    c = config
    layers, bb = list(model.layers), model.backbone
    first = int(c.tune_from_layer)
    if not 0 < first <= min(layers):
        raise InvalidInputError(f"tune_from_layer must be between 1 and the lowest routing layer ({min(layers)}), "
                                f"got {first}")
    full, train, heldout, timings = read_training_data(data, c, log)
    t = time.perf_counter()
    dtype = torch.bfloat16 if bb.device.type == "cuda" else torch.float32
    offset = model.position_offset(model.config.routing.top_k)
    max_doc = model.config.encode.max_doc_tokens
    train_d = lower_documents(bb, model.tokenizer, train.documents, first, TRAIN_DOC_TOKENS, dtype)
    train_q = lower_queries(bb, model.tokenizer, train.queries, first, offset, dtype)
    held_d = lower_documents(bb, model.tokenizer, heldout.documents, first, max_doc, dtype) if len(heldout) else None
    held_q = lower_queries(bb, model.tokenizer, heldout.queries, first, offset, dtype) if len(heldout) else None
    timings["cache"] = round(time.perf_counter() - t, 2)
    log(f"layers 0-{first - 1} ran once over {train_d.h.shape[0]} document and {train_q.h.shape[0]} question "
        f"tokens in {timings['cache']} s")
    router = model.router.copy(layers, dtype=torch.float32, device=bb.device,
                               init_mode=f"tuned-from-{model.router.init_mode}")
    last = bb.args.num_layers - 1 if c.lm_weight else max(layers)
    for p in bb.parameters():
        p.requires_grad_(False)
    if model.generator is not bb:
        # Started from a tuned router: the generator (base weights) shares every layer its delta leaves alone.
        # Adapters attached to those would reach it, and the saved file would record a wrong base fingerprint.
        shared = [i for i in range(first, last + 1) if model.generator.layers[i] is bb.layers[i]]
        model.generator = base_view(model.generator, shared)
    new = {id(p) for p in attach(bb, range(first, last + 1), c.lora_rank, scale=LORA_SCALE)}
    adapters = {n: p for n, p in bb.named_parameters() if id(p) in new}
    log(f"adapters of rank {c.lora_rank} on layers {first}-{last}: {sum(p.numel() for p in adapters.values())} "
        "parameters")
    trainer = TunedTrainer(model, router, layers, train, train_q, train_d, heldout if len(heldout) else None,
                           held_q, held_d, adapters, c, checkpoint_dir=checkpoint_dir, log=log)
    return trainer, {"sources": full.source_counts(), "timings": timings, "preconditioner": None}
