"""Stage 1: encode documents into pooled memory (paper §3.1, spec §2.1–2.2).

Every document part goes through the decoder on its own, causally, with positions from 0
(document-wise RoPE). Many parts share one forward: they are sorted by length and right-padded, so
causal attention alone keeps pads out of every real token's view. In each routing layer we pool
chunks of P tokens: keys after k_norm and RoPE, values, and the normed hidden state, from which the
routing keys follow by linearity (mean(W x) = W mean(x)).
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from tqdm.auto import tqdm

from ..config import EncodeConfig
from ..decoder.backbone import Backbone
from ..decoder.cpu_precision import dtype_name
from ..errors import InvalidInputError
from ..memory.encoded import EncodedDocuments
from ..routing.projectors import RouterProjectors

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass
class DocumentPart:
    id: str
    parent_id: str
    part_index: int
    text: str
    token_ids: list[int]
    metadata: dict[str, Any]


def split_documents(tokenizer: Any, texts: Sequence[str], ids: Sequence[str],
                    metadatas: Sequence[dict[str, Any]], max_doc_tokens: int) -> list[DocumentPart]:
    """Tokenize documents; those longer than max_doc_tokens become parts '<id>#<n>' of one parent."""
    parts: list[DocumentPart] = []
    encs = _token_ids_and_offsets(tokenizer, list(texts)) if texts else []
    for (tokens, offsets), text, doc_id, meta in zip(encs, texts, ids, metadatas):
        if not tokens:
            raise InvalidInputError(f"document {doc_id!r} has no tokens; remove it or give it text")
        if len(tokens) <= max_doc_tokens:
            parts.append(DocumentPart(doc_id, doc_id, 0, text, list(tokens), meta))
            continue
        for n, start in enumerate(range(0, len(tokens), max_doc_tokens)):
            end = min(start + max_doc_tokens, len(tokens))
            # Part texts come from the token offsets, so joining the parts gives the document back.
            char_start = offsets[start][0] if n else 0
            char_end = offsets[end][0] if end < len(tokens) else len(text)
            parts.append(DocumentPart(f"{doc_id}#{n}", doc_id, n, text[char_start:char_end],
                                      list(tokens[start:end]), meta))
    return parts


def _token_ids_and_offsets(tokenizer: Any, texts: list[str]) -> list[tuple[list[int], list[tuple[int, int]]]]:
    """(ids, character offsets) of each text without special tokens, in one batch call. A fast tokenizer's
    Rust backend is called directly (what `tokenizer(...)` calls, without building Python dicts of every
    token's offsets: on 512-token documents most of the tokenizing time), so ids and offsets are the same."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if (getattr(tokenizer, "is_fast", False) and backend is not None and hasattr(backend, "encode_batch")
            and backend.truncation is None and backend.padding is None):  # else __call__ configures them
        return [(e.ids, e.offsets) for e in backend.encode_batch(texts, add_special_tokens=False)]
    encs = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True)
    return list(zip(encs["input_ids"], encs["offset_mapping"]))


CPU_BATCH_TOKENS = 2048  # EncodeConfig.max_tokens_per_batch=None on a CPU: measured, see batch_tokens
GPU_BATCH_TOKENS = 8192


def batch_tokens(config: EncodeConfig, device: torch.device) -> int:
    """The most padded tokens per encoding forward: the config's, or for None 2048 on a CPU and 8192 on a GPU.
    On the 2-core CPU, alternated over four rounds of 150 HotpotQA passages, 2048-token batches encoded 3-25%
    faster than 8192-token ones (the activations and MLP intermediates stay in cache); GPUs want larger."""
    if config.max_tokens_per_batch is not None:
        return config.max_tokens_per_batch
    return CPU_BATCH_TOKENS if device.type == "cpu" else GPU_BATCH_TOKENS


def plan_batches(lengths: Sequence[int], batch_size: int, max_tokens: int) -> list[list[int]]:
    """Group part indices, longest first, so each batch has <= batch_size parts and
    <= max_tokens padded tokens (a single part longer than max_tokens gets a batch of its own)."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batches: list[list[int]] = []
    current: list[int] = []
    for i in order:
        longest = lengths[current[0]] if current else lengths[i]
        if current and (len(current) == batch_size or longest * (len(current) + 1) > max_tokens):
            batches.append(current)
            current = []
        current.append(i)
    if current:
        batches.append(current)
    return batches


def pool_chunks(x: torch.Tensor, lengths: torch.Tensor, chunk_size: int) -> torch.Tensor:
    """Mean over chunks of chunk_size tokens, in fp32: x [B, T, ...] -> [B, ceil(T/P), ...].

    Padding (t >= length) is excluded, so a short tail chunk is averaged over its real tokens.
    Chunks past a document's end come out as zeros and are dropped by the caller.
    """
    b, t = x.shape[:2]
    n_chunks = -(-t // chunk_size)
    pad = n_chunks * chunk_size - t
    real = torch.arange(t, device=x.device)[None, :] < lengths[:, None]
    # Padding zeroed in x's own dtype (exact), then summed with float32 accumulation: x is never copied
    # to float32 whole (at MSA-4B shapes a float32 copy of every routing layer's hidden states).
    x = x * real.view(b, t, *([1] * (x.dim() - 2))).to(x.dtype)
    if pad:
        x = torch.cat([x, x.new_zeros(b, pad, *x.shape[2:])], dim=1)
        real = torch.cat([real, real.new_zeros(b, pad)], dim=1)
    sums = x.view(b, n_chunks, chunk_size, *x.shape[2:]).sum(2, dtype=torch.float32)
    counts = real.view(b, n_chunks, chunk_size).sum(2, dtype=torch.float32).clamp(min=1)
    return sums / counts.view(b, n_chunks, *([1] * (x.dim() - 2)))


class _Pooler:
    """Capture hook: pools K, V and the normed hidden state of routing layers for one batch."""

    def __init__(self, layers: list[int], lengths: torch.Tensor, chunk_size: int) -> None:
        self.layers, self.lengths, self.p = set(layers), lengths, chunk_size
        self.k: dict[int, torch.Tensor] = {}
        self.v: dict[int, torch.Tensor] = {}
        self.x: dict[int, torch.Tensor] = {}

    def __call__(self, layer: int, x: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        if layer not in self.layers:
            return
        self.x[layer] = pool_chunks(x, self.lengths, self.p)  # [B, C, hidden]
        self.k[layer] = pool_chunks(k.transpose(1, 2), self.lengths, self.p)  # [B, C, kv, D]
        self.v[layer] = pool_chunks(v.transpose(1, 2), self.lengths, self.p)


@torch.no_grad()
def encode_parts(backbone: Backbone, router: RouterProjectors, layers: list[int],
                 parts: Sequence[DocumentPart], config: EncodeConfig, *, pad_id: int = 0,
                 show_progress_bar: bool | None = None) -> EncodedDocuments:
    """Pooled memory of `parts`, in the order given."""
    if not parts:
        raise InvalidInputError("nothing to encode: the list of documents is empty")
    p, dev, started = config.chunk_size, backbone.device, time.perf_counter()
    forward = compiled_pooled_batch() if config.compile and dev.type == "cuda" else pooled_batch
    lengths = [len(part.token_ids) for part in parts]
    n_chunks = [-(-n // p) for n in lengths]
    batches = plan_batches(lengths, config.batch_size, batch_tokens(config, dev))
    dtype = _DTYPES[config.storage_dtype]
    pooled: tuple[list, list, list] = ([], [], [])  # per batch: K̄, V̄, K̄_R [L, chunks of the batch, kv, D]
    # smoothing=0: rate and time left are the average since the start, so the first batch already gives
    # an estimate and later short batches do not swing it.
    bar = tqdm(total=sum(lengths), unit="tok", unit_scale=True, desc="encoding", smoothing=0,
               disable=_no_bar(show_progress_bar, len(parts), sum(lengths)))
    for batch in batches:
        t = lengths[batch[0]]
        ids = torch.full((len(batch), t), pad_id, dtype=torch.long)
        for row, i in enumerate(batch):
            ids[row, : lengths[i]] = torch.tensor(parts[i].token_ids)
        lens = torch.tensor([lengths[i] for i in batch], device=dev)
        batch_pooled = forward(backbone, router, layers, ids.to(dev), lens, p)  # 3 x [L, B * width, kv, D]
        # each part's real chunks, rows in batch order, every layer at once (chunks past a part's end dropped)
        width = -(-t // p)
        real = torch.tensor([row * width + j for row, i in enumerate(batch) for j in range(n_chunks[i])], device=dev)
        for out, per_layer in zip(pooled, batch_pooled):
            out.append(per_layer.index_select(1, real).to(dtype))
        bar.update(sum(lengths[i] for i in batch))  # (host numbers: no wait on the device)
    bar.close()
    order = [i for batch in batches for i in batch]  # parts in the order their chunks were pooled
    first, at = {}, 0
    for i in order:
        first[i], at = at, at + n_chunks[i]
    back = [first[i] + j for i in range(len(parts)) for j in range(n_chunks[i])]  # chunk order by part
    back = None if back == list(range(at)) else torch.tensor(back, device=dev)

    def stack(per_batch: list[torch.Tensor]) -> torch.Tensor:  # [L, C, kv, D] in part order, in host memory
        t = torch.cat(per_batch, dim=1) if len(per_batch) > 1 else per_batch[0]
        t = t if back is None else t.index_select(1, back)
        if not t.is_cuda:
            return t.contiguous()
        host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
        return host.copy_(t, non_blocking=True)  # (the copies are waited for once, below)

    k_bar, v_bar, kr_bar = (stack(x) for x in pooled)
    if dev.type == "cuda":
        torch.cuda.current_stream(dev).synchronize()
    return EncodedDocuments(
        ids=[x.id for x in parts], parent_ids=[x.parent_id for x in parts], texts=[x.text for x in parts],
        metadatas=[x.metadata for x in parts], n_tokens=lengths, n_chunks=n_chunks, layers=list(layers),
        k_bar=k_bar, v_bar=v_bar, kr_bar=kr_bar, part_index=[x.part_index for x in parts],
        encode_seconds=time.perf_counter() - started, compute_dtype=dtype_name(backbone.dtype),
    )


def pooled_batch(backbone: Backbone, router: RouterProjectors, layers: list[int], ids: torch.Tensor,
                 lengths: torch.Tensor, chunk_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One forward over a right-padded batch ids [B, T] (positions from 0; lengths [B] real tokens): K̄, V̄ and
    K̄_R of every chunk slot of every row, [L, B * ceil(T / P), kv, D] fp32 (slots past a row's end are zeros)."""
    pooler = _Pooler(layers, lengths, chunk_size)
    backbone(ids, torch.arange(ids.shape[1], device=ids.device).expand_as(ids), capture=pooler,
             last_layer=max(layers), hooks_only_in_last=True)
    kr = {l: _routing_keys(router, l, pooler) for l in layers}  # W_KR·mean(x), whole batch
    return tuple(torch.stack([per_layer[l].flatten(0, 1) for l in layers]) for per_layer in (pooler.k, pooler.v, kr))


@functools.cache
def compiled_pooled_batch() -> Callable[..., tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """`pooled_batch` under torch.compile (EncodeConfig.compile, on a GPU): one graph (no breaks: tested), so the
    norms, RoPE, activations and pooling fuse into fewer kernels. The first batch compiles for its shape; later
    shapes take a graph with dynamic batch and length (torch.compile's automatic dynamic shapes; `dynamic=True`
    would also make the routing layer numbers symbolic), one for lengths that are multiples of P and one for
    the others (pooling pads those): three compiles at most."""
    return torch.compile(pooled_batch)


def _routing_keys(router: RouterProjectors, layer: int, pooler: _Pooler) -> torch.Tensor:
    """Pooled routing keys [B, C, kv, D]: W_KR applied to the pooled hidden state, or, for a router
    without projectors (an MSA checkpoint with decouple_router false, spec §2.2), K̄ itself."""
    if getattr(router, "keys_from_attention", False):
        return pooler.k[layer]
    return router.project_keys(layer, pooler.x[layer]).float()


def _no_bar(show: bool | None, n: int, tokens: int) -> bool:
    """tqdm's `disable`: show for long jobs (many documents or many tokens) unless told otherwise."""
    return not show if show is not None else n < 64 and tokens < 16384
