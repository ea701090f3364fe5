"""A trace of encode -> route -> greedy generate, for parity checks against the reference code.

    t = trace(model, ["doc 0 text", "doc 1 text"], "question?", max_new_tokens=8)
    t["layers.18.doc_scores"], t["prefill_logits"], t["greedy_tokens"], t["prompt"] ...

Keys (tensors on CPU, float32 unless noted):
- per routing layer i: `layers.{i}.k_bar`, `layers.{i}.v_bar`, `layers.{i}.kr_bar` [kv_heads, chunks,
  head_dim] (pooled; kr_bar as the reference stores it: L2-normalised when routing is cosine with
  router projectors, spec §2.2), `layers.{i}.chunk_doc` (int64 [chunks]: document number of each
  chunk), `layers.{i}.doc_scores` ([documents], before top-k, by document number),
  `layers.{i}.selected` (int64 [k]: the chosen documents, best first);
- reference profile, every layer i: `layers.{i}.template_k`, `layers.{i}.template_v` [kv_heads, T, D];
- `query_position_ids` (int64 [prompt tokens]), `prefill_logits` ([vocab], last position),
  `greedy_tokens` (list of ints; stops before an end-of-sequence token, as the reference does),
  `greedy_text`;
- `prompt` (the exact text: template head + query side), `prompt_token_ids` (template head ids + query
  ids), `query_token_ids`, `routing_mask` (bool per query token), `template_token_ids`;
- `documents_rendered`, `document_token_ids`, `profile`, `top_k`, `normalization`, `routing_layers`,
  `position_offset`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

from ..errors import InvalidInputError
from .engine import Session
from .generate import build_prompt, engine_for, routed_prefill
from .memory_router import MemoryRouter
from .protocols import ModelLike
from .reference import question_segments, render_document


@torch.no_grad()
def trace(model: ModelLike, documents: Sequence[str], question: str, max_new_tokens: int = 8) -> dict[str, Any]:
    """Encode `documents` into a fresh bank (document i = file index i), route `question`, prefill and
    decode greedily; return every intermediate a parity check needs (see the module docstring)."""
    if isinstance(documents, str) or not documents:
        raise InvalidInputError("documents must be a non-empty list of texts")
    if max_new_tokens < 0:
        raise InvalidInputError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    bank = model.index(list(documents), ids=[str(i) for i in range(len(documents))], show_progress_bar=False)
    if bank.num_parts != len(documents):
        raise InvalidInputError("a document was split into parts (longer than encode.max_doc_tokens); the trace "
                                "compares whole documents: raise max_doc_tokens or shorten it")
    k = model.config.routing.top_k
    out: dict[str, Any] = {"profile": model.profile, "top_k": k, "normalization": model.config.routing.normalization,
                           "routing_layers": list(model.layers)}
    if model.reference is not None:
        state, offset = _reference_prefill(model, bank, question, k, max_new_tokens, out)
    else:
        state, offset = _default_prefill(model, bank, question, k, max_new_tokens, out)
    logits, session, hook, positions = state
    out["position_offset"] = offset
    out["query_position_ids"] = positions[0].cpu()
    out["prefill_logits"] = logits[0].float().cpu()
    _pooled(model, bank, hook, out)
    tokens = _greedy(model, logits, session, max_new_tokens)
    out["greedy_tokens"] = tokens
    out["greedy_text"] = model.tokenizer.decode(tokens, skip_special_tokens=False)
    return out


def _reference_prefill(model: ModelLike, bank: Any, question: str, k: int, extra: int, out: dict[str, Any]):
    prof = model.reference
    assert prof is not None
    segments = question_segments(question)
    prompt = prof.encode_segments(segments)
    state = prof.prefill(prompt, bank, k, None, extra_capacity=extra + 8)
    template = prof.template()
    for layer in range(model.backbone.args.num_layers):
        out[f"layers.{layer}.template_k"] = template.k[layer].float().cpu()
        out[f"layers.{layer}.template_v"] = template.v[layer].float().cpu()
    rendered = [render_document(int(rec.metadata["msa_doc_index"]), rec.text) for rec in bank.docstore]
    out.update({
        "prompt": prof.prompt_text(segments),
        "prompt_token_ids": list(prof.head_ids) + list(prompt.ids),
        "query_token_ids": list(prompt.ids),
        "routing_mask": list(prompt.routing),
        "template_token_ids": list(prof.head_ids),
        "documents_rendered": rendered,
        "document_token_ids": [model.tokenizer(r, add_special_tokens=False)["input_ids"] for r in rendered],
    })
    return (state.logits, state.session, state.hook, state.positions), prof.position_offset(k)


def _default_prefill(model: ModelLike, bank: Any, question: str, k: int, extra: int, out: dict[str, Any]):
    prompt = build_prompt(model.tokenizer, question)
    offset = model.position_offset(k)
    state = routed_prefill(model.backbone, [prompt], offset=offset, pad_id=model.tokenizer.pad_token_id or 0,
                           extra_capacity=extra + 8,
                           hook=lambda routing, pos: MemoryRouter(bank, model.router, model.config.routing, routing,
                                                                  top_k=k, positions=pos))
    tok = model.tokenizer
    out.update({
        "prompt": tok.decode(prompt.ids, skip_special_tokens=False),
        "prompt_token_ids": list(prompt.ids),
        "query_token_ids": list(prompt.ids),
        "routing_mask": list(prompt.routing),
        "template_token_ids": [],
        "documents_rendered": [rec.text for rec in bank.docstore],
        "document_token_ids": [tok(rec.text, add_special_tokens=False)["input_ids"] for rec in bank.docstore],
    })
    return (state.logits, state.session, state.hook, state.positions), offset


def _pooled(model: ModelLike, bank: Any, hook: MemoryRouter, out: dict[str, Any]) -> None:
    order = torch.tensor([int(rec.metadata.get("msa_doc_index", row)) for row, rec in enumerate(bank.docstore)])
    chunk_doc = order[bank.chunk_doc.cpu()]
    normalize = (model.config.routing.normalization == "cosine"
                 and not getattr(model.router, "keys_from_attention", False))
    by_number = torch.argsort(order)  # rows in document-number order
    for li, layer in enumerate(bank.layers):
        kr = bank.kr_bar[li].float()
        if normalize:
            kr = F.normalize(kr, dim=-1)
        out[f"layers.{layer}.k_bar"] = bank.k_bar[li].float().transpose(0, 1).contiguous()
        out[f"layers.{layer}.v_bar"] = bank.v_bar[li].float().transpose(0, 1).contiguous()
        out[f"layers.{layer}.kr_bar"] = kr.transpose(0, 1).contiguous()
        out[f"layers.{layer}.chunk_doc"] = chunk_doc.clone()
        routing = hook.routings.get(layer)
        if routing is None:
            continue
        scores = routing.doc_scores[0].float().cpu()
        out[f"layers.{layer}.doc_scores"] = scores[by_number]
        out[f"layers.{layer}.selected"] = order[routing.selected[0].cpu()]


def _greedy(model: ModelLike, logits: torch.Tensor, session: Session, steps: int) -> list[int]:
    engine = engine_for(model.backbone)
    eos = set(model.eos_ids)
    tokens: list[int] = []
    for step in range(steps):
        token = logits.argmax(-1)
        tid = int(token[0])
        if tid in eos:
            break
        tokens.append(tid)
        if step == steps - 1:
            break
        logits = engine.decode_one_token(session, token)
    return tokens
