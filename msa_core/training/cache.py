"""The frozen backbone's states that a router reads, computed once so training touches only W_QR/W_KR.

Documents: each routing layer's normed hidden state, mean-pooled over chunks of P tokens, exactly as
stage-1 encoding pools it. W_KR is linear, so W_KR·mean(x) = mean(W_KR·x): pooled states give the
exact routing keys of any router, and an epoch costs a few matrix products instead of a forward pass.
Questions: the normed hidden state of each routing token, from the prompt and RoPE positions that
retrieval uses, with no memory attended (retrieval routes the same way; see MemoryRouter attend=False).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from tqdm.auto import tqdm

from ..decoder.backbone import Backbone
from ..errors import InvalidInputError
from ..inference.encode import plan_batches, pool_chunks
from ..inference.generate import build_prompt, left_pad, query_positions

MAX_QUERY_TOKENS = 128  # routing tokens kept per question: a bound on a training batch's size


@dataclass
class RaggedStates:
    """Rows of many items back to back: item i owns x[offsets[i]:offsets[i+1]] ([rows, L, hidden])."""

    x: torch.Tensor
    offsets: torch.Tensor  # [n + 1], long, on the CPU

    def __len__(self) -> int:
        return self.offsets.numel() - 1

    def lengths(self) -> torch.Tensor:
        return self.offsets[1:] - self.offsets[:-1]

    def flat(self, items: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows of `items` concatenated ([R, L, hidden]) and the position in `items` of each row."""
        starts, lens = self.offsets[:-1][list(items)], self.lengths()[list(items)]
        owner = torch.repeat_interleave(torch.arange(len(items)), lens)
        rows = starts[owner] + torch.arange(int(lens.sum())) - torch.repeat_interleave(lens.cumsum(0) - lens, lens)
        return self.x[rows.to(self.x.device)], owner.to(self.x.device)

    def padded(self, items: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows of `items` right-padded: x [B, M, L, hidden] and mask [B, M]."""
        lens = self.lengths()[list(items)]
        m = int(lens.max())
        x = self.x.new_zeros(len(items), m, *self.x.shape[1:])
        mask = torch.arange(m)[None, :] < lens[:, None]
        flat, _ = self.flat(items)
        x[mask.to(x.device)] = flat
        return x, mask.to(x.device)


@torch.no_grad()
def cache_documents(backbone: Backbone, tokenizer: Any, texts: Sequence[str], layers: Sequence[int], *,
                    chunk_size: int = 64, max_doc_tokens: int = 2048, batch_size: int = 16,
                    max_tokens_per_batch: int = 8192, dtype: torch.dtype = torch.float16,
                    show_progress_bar: bool | None = None) -> RaggedStates:
    """Pooled normed hidden states of every document's chunks, [chunks, len(layers), hidden].

    Documents longer than max_doc_tokens are cut there (the bank would split them into parts; for
    training, the first part stands for the document)."""
    if not texts:
        raise InvalidInputError("no documents to cache")
    token_ids = tokenizer(list(texts), add_special_tokens=False)["input_ids"]
    for i, ids in enumerate(token_ids):
        if not ids:
            raise InvalidInputError(f"training document {i} has no tokens")
    token_ids = [ids[:max_doc_tokens] for ids in token_ids]
    lengths = [len(ids) for ids in token_ids]
    dev, order = backbone.device, list(layers)
    counts = torch.tensor([-(-n // chunk_size) for n in lengths])
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), counts.cumsum(0)])
    out = torch.empty(int(offsets[-1]), len(order), backbone.args.hidden_size, dtype=dtype, device=dev)
    bar = tqdm(total=sum(lengths), unit="tok", desc="caching documents", disable=not show_progress_bar)
    for batch in plan_batches(lengths, batch_size, max_tokens_per_batch):
        t = lengths[batch[0]]
        ids = torch.zeros(len(batch), t, dtype=torch.long)
        for row, i in enumerate(batch):
            ids[row, : lengths[i]] = torch.tensor(token_ids[i])
        lens = torch.tensor([lengths[i] for i in batch], device=dev)
        pooled: dict[int, torch.Tensor] = {}

        def capture(layer: int, x: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
            if layer in order:
                pooled[layer] = pool_chunks(x, lens, chunk_size)  # [B, C, hidden] fp32

        ids = ids.to(dev)
        backbone(ids, torch.arange(t, device=dev).expand_as(ids), capture=capture, last_layer=max(order))
        stacked = torch.stack([pooled[layer] for layer in order], dim=2).to(dtype)  # [B, C, L, hidden]
        for row, i in enumerate(batch):
            out[offsets[i] : offsets[i + 1]] = stacked[row, : int(counts[i])]
        bar.update(int(lens.sum()))
    bar.close()
    return RaggedStates(out, offsets)


@torch.no_grad()
def cache_queries(backbone: Backbone, tokenizer: Any, queries: Sequence[str], layers: Sequence[int], *,
                  position_offset: int = 16, batch_size: int = 64, max_tokens_per_batch: int = 16384,
                  max_query_tokens: int = MAX_QUERY_TOKENS, dtype: torch.dtype = torch.float16,
                  show_progress_bar: bool | None = None) -> RaggedStates:
    """Normed hidden states at each question's routing tokens, [tokens, len(layers), hidden].

    A question keeps its first max_query_tokens routing tokens (a bound on a training batch's size;
    the states of those tokens do not depend on later ones)."""
    if not queries:
        raise InvalidInputError("no queries to cache")
    prompts = [build_prompt(tokenizer, q) for q in queries]
    counts = torch.tensor([min(sum(p.routing), max_query_tokens) for p in prompts])
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), counts.cumsum(0)])
    dev, wanted = backbone.device, list(layers)
    out = torch.empty(int(offsets[-1]), len(wanted), backbone.args.hidden_size, dtype=dtype, device=dev)
    bar = tqdm(total=len(queries), unit="q", desc="caching questions", disable=not show_progress_bar)
    for batch in plan_batches([len(p.ids) for p in prompts], batch_size, max_tokens_per_batch):
        ids, valid, routing = left_pad([prompts[i] for i in batch], tokenizer.pad_token_id or 0, dev)
        states: dict[int, torch.Tensor] = {}

        def capture(layer: int, x: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
            if layer in wanted:
                states[layer] = x

        backbone(ids, query_positions(valid, position_offset), valid=valid, capture=capture, last_layer=max(wanted))
        stacked = torch.stack([states[layer] for layer in wanted], dim=2).to(dtype)  # [B, T, L, hidden]
        for row, i in enumerate(batch):
            out[offsets[i] : offsets[i + 1]] = stacked[row][routing[row]][: int(counts[i])]
        bar.update(len(batch))
    bar.close()
    return RaggedStates(out, offsets)
