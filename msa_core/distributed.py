"""Memory Parallel: one memory bank sharded across the ranks of a torch.distributed process group.

Every rank holds the whole model and a shard of the bank (a subset of its documents: their K̄_R, K̄,
V̄ rows and docstore records), and every rank runs the same question. In each routing layer:

    local scores (score_chunks + reduce_to_docs on the shard, filter applied)
      -> local top-k as (score, global row), padded to k          [B, k]
      -> all_gather                                                [B, world*k]
      -> merge_top_k: score descending, then lower global row (select_top_k's order)
      -> owners write the chosen documents' K̄/V̄ chunks at their places in a zero buffer
      -> all_reduce(SUM) of the buffer: each slot has exactly one writer, so x + 0 = x bit for bit
      -> the memory a single process would attend to (documents in selection order, chunks in order)

Shards are aligned to *parents*: all parts of a document live on one rank, so a parent's text and its
best part (what `MSAModel.retrieve` ranks by) are local, and retrieval merges per-rank hit lists.

    dist.init_process_group("gloo")            # "nccl" on GPUs, with torch.cuda.set_device(local_rank)
    shard = load_sharded("bank/")              # or ShardedBank.from_bank(bank, rank, world_size)
    hits = distributed_retrieve(model, "question", shard, k=5)         # same on every rank
    ans = distributed_answer(model, "question", shard, max_new_tokens=32)

Every rank must make the same calls with the same arguments (they are checked: a mismatch raises
InvalidInputError on every rank instead of hanging). The reference profile is not supported yet.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import torch.distributed as dist

from .config import RoutingConfig
from .decoder.backbone import Memory
from .errors import InvalidInputError, check_text
from .inference.generate import (
    Generation,
    Message,
    SamplingParams,
    build_prompt,
    routed_prefill,
)
from .inference.memory_router import LayerRouting, MemoryRouter
from .memory.bank import MemoryBank
from .memory.filters import Filter
from .memory.persist import MANIFEST, TENSORS, read_version
from .memory.records import TENSOR_NAMES
from .model import Answer, MSAModel, RetrievedDocument
from .routing.projectors import RouterProjectors
from .routing.scores import aggregate_layers, select_top_k

Strategy = Literal["contiguous", "round_robin"]


# ---- sharding --------------------------------------------------------------------------------
def shard_rows(parents: Sequence[Sequence[int]], rank: int, world_size: int,
               strategy: Strategy = "contiguous") -> list[int]:
    """Global part rows of `rank`: whole parents (each given as its rows), split by parent count.

    contiguous: rank r gets parents [r*P//W, (r+1)*P//W) (one contiguous chunk range: cheap to load);
    round_robin: parent i goes to rank i % W.
    """
    if world_size < 1 or not 0 <= rank < world_size:
        raise InvalidInputError(f"rank {rank} is not in [0, world_size={world_size})")
    p = len(parents)
    if strategy == "contiguous":
        mine = range(rank * p // world_size, (rank + 1) * p // world_size)
    elif strategy == "round_robin":
        mine = range(rank, p, world_size)
    else:
        raise InvalidInputError(f"strategy must be 'contiguous' or 'round_robin', got {strategy!r}")
    return sorted(r for i in mine for r in parents[i])


@dataclass
class ShardedBank:
    """This rank's shard of a bank: a MemoryBank of its rows plus the global row ids they had.

    local: the rows this rank owns, in global row order (a real MemoryBank: filters, chunks_of, info).
    global_rows: LongTensor [n_local], global row of each local row (results map back through it).
    chunk_counts: LongTensor [N], chunks of every global row (tiny; lets every rank lay out the
        gathered memory without asking the owners).
    """

    local: MemoryBank
    global_rows: torch.Tensor
    chunk_counts: torch.Tensor
    num_documents: int  # parents of the whole bank
    rank: int
    world_size: int
    group: Any = None  # torch.distributed process group (None: the default group)

    def __post_init__(self) -> None:
        self.global_rows = self.global_rows.cpu().long()
        self.chunk_counts = self.chunk_counts.cpu().long()
        self.local_of = torch.full((self.num_parts,), -1, dtype=torch.long)  # global row -> local row or -1
        self.local_of[self.global_rows] = torch.arange(len(self.global_rows))

    @property
    def num_parts(self) -> int:
        """Part rows of the whole bank."""
        return int(self.chunk_counts.shape[0])

    def info(self) -> dict[str, Any]:
        """The local bank's info (bytes, counts) plus the shard's place in the whole."""
        return {**self.local.info(), "rank": self.rank, "world_size": self.world_size,
                "global_documents": self.num_documents, "global_parts": self.num_parts,
                "global_chunks": int(self.chunk_counts.sum())}

    @classmethod
    def from_bank(cls, bank: MemoryBank, rank: int, world_size: int, *, group: Any = None,
                  strategy: Strategy = "contiguous") -> ShardedBank:
        """Cut `bank` (held whole in this process) down to the shard of `rank`."""
        rows = shard_rows(bank.parent_rows(), rank, world_size, strategy)
        rows_t = torch.tensor(rows, dtype=torch.long)
        chunks = bank.chunks_of(rows_t)
        # Any K/V tier in, a plain bank on bank.device out (a shard is meant to be resident).
        tensors = {}
        for name in TENSOR_NAMES:
            t = getattr(bank, name)
            tensors[name] = t.index_select(1, chunks.to(t.device)).to(bank.device)
        local = bank.with_contents(tuple(bank.docstore[r] for r in rows), tensors, bank.device)
        return cls(local, rows_t, bank.chunk_counts.cpu(), len(bank), rank, world_size, group)


def load_sharded(path: str | Path, group: Any = None, *, strategy: Strategy = "contiguous",
                 map_location: str | torch.device = "cpu", verify: bool = True) -> ShardedBank:
    """Load this rank's shard of a saved bank, reading only its own tensor rows from disk.

    The docstore (text, metadata) is read whole to find the shard boundaries, then only the local
    records are kept. verify=True checks both files' sha256 against the manifest (reads the file
    once, streaming; memory stays that of the shard).
    """
    from safetensors import safe_open

    rank, world = dist.get_rank(group), dist.get_world_size(group)
    vdir, manifest, parts = read_version(Path(path), verify=verify)
    template = MemoryBank.from_manifest(manifest, vdir / MANIFEST)
    parents: dict[str, list[int]] = {}
    for row, p in enumerate(parts):
        parents.setdefault(p.parent_id, []).append(row)
    rows = shard_rows(list(parents.values()), rank, world, strategy)
    counts = torch.tensor([p.n_chunks for p in parts], dtype=torch.long)
    starts = torch.cumsum(counts, 0) - counts
    ranges = _merge_ranges([(int(starts[r]), int(starts[r] + counts[r])) for r in rows])
    device = torch.device(map_location)
    with safe_open(str(vdir / TENSORS), framework="pt", device="cpu") as f:
        tensors = {}
        for name in TENSOR_NAMES:
            sl = f.get_slice(name)
            pieces = [sl[:, a:b] for a, b in ranges]
            empty = torch.empty(len(template.layers), 0, template.kv_heads, template.head_dim,
                                dtype=template.storage_dtype)
            tensors[name] = torch.cat(pieces, dim=1).to(device) if pieces else empty.to(device)
    local = template.with_contents(tuple(parts[r] for r in rows), tensors, device)
    return ShardedBank(local, torch.tensor(rows, dtype=torch.long), counts, len(parents), rank, world, group)


def _merge_ranges(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for a, b in ranges:
        if out and out[-1][1] == a:
            out[-1] = (out[-1][0], b)
        else:
            out.append((a, b))
    return out


# ---- the global top-k ------------------------------------------------------------------------
def merge_top_k(scores: torch.Tensor, rows: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Global top-k from gathered candidates: scores/rows [B, M], row -1 marks padding.

    Order is select_top_k's: score descending, then lower global row first. Returns (values, rows)
    [B, k_eff] with k_eff = min(k, fewest real candidates of any row).
    """
    valid = rows >= 0
    # Three stable sorts = lexicographic (real first, score desc, row asc); rows are unique.
    by_row = torch.sort(torch.where(valid, rows, torch.iinfo(torch.long).max), dim=1, stable=True).indices
    by_score = by_row.gather(1, torch.sort(scores.gather(1, by_row), dim=1, descending=True, stable=True).indices)
    order = by_score.gather(1, torch.sort((~valid.gather(1, by_score)).to(torch.uint8), dim=1, stable=True).indices)
    k_eff = min(k, int(valid.sum(dim=1).min())) if rows.shape[0] else 0
    order = order[:, :k_eff]
    return scores.gather(1, order), rows.gather(1, order)


def _comm_device(group: Any) -> torch.device:
    """Where collective buffers live: the current CUDA device for NCCL, CPU otherwise."""
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


class DistributedMemoryRouter(MemoryRouter):
    """MemoryRouter over a ShardedBank: local scoring, a global top-k per layer, K̄/V̄ from the owners.

    `routings[layer]` holds doc_scores of the LOCAL rows [B, n_local] (filtered ones -inf) and the
    GLOBAL selection (selected are global rows, best first, identical on every rank).
    `allowed` is a mask over the local rows (shard.local.row_mask(filter)).
    """

    def __init__(self, shard: ShardedBank, router: RouterProjectors, cfg: RoutingConfig,
                 routing_mask: torch.Tensor, **kw: Any) -> None:
        super().__init__(shard.local, router, cfg, routing_mask, **kw)
        self.shard = shard
        self.comm = _comm_device(shard.group)

    def __call__(self, layer: int, x: torch.Tensor) -> Memory | None:
        li = self.layer_pos.get(layer)
        if li is None or self.shard.num_parts == 0:  # global facts: every rank takes the same branch
            return None
        doc_scores = self._local_scores(li, self._routing_queries(layer, x), x.dtype)
        values, rows = self._global_top_k(doc_scores)
        self.routings[layer] = LayerRouting(doc_scores, rows, values)
        if not self.attend or rows.shape[1] == 0:
            return None
        return self._exchange(li, rows, x.device, x.dtype)

    def _local_scores(self, li: int, q: torch.Tensor, states_dtype: torch.dtype) -> torch.Tensor:
        bank = self.bank
        if bank.num_parts == 0:
            return torch.empty(q.shape[0], 0, dtype=torch.float32, device=q.device)
        doc_scores = self._doc_scores(li, q, states_dtype)  # the Triton kernel on a GPU shard, else the reference
        if self.allowed is not None:
            doc_scores = doc_scores.masked_fill(~self.allowed.to(doc_scores.device), float("-inf"))
        return doc_scores

    def _global_top_k(self, doc_scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """all_gather of each rank's top-k (score, global row) padded to k, then merge_top_k."""
        b, k = doc_scores.shape[0], self.top_k
        n_allowed = int(self.allowed.sum()) if self.allowed is not None else self.bank.num_parts
        # float64 holds float32 scores and row ids < 2**53 exactly: one collective carries both.
        packed = torch.full((b, k, 2), -1.0, dtype=torch.float64)
        packed[:, :, 0] = float("-inf")
        k_local = min(k, n_allowed)
        if k_local:
            values, local_rows = select_top_k(doc_scores, k_local, self.allowed)
            packed[:, :k_local, 0] = values.cpu().double()
            packed[:, :k_local, 1] = self.shard.global_rows[local_rows.cpu()].double()
        packed = packed.to(self.comm)
        gathered = [torch.empty_like(packed) for _ in range(self.shard.world_size)]
        dist.all_gather(gathered, packed, group=self.shard.group)
        cands = torch.cat(gathered, dim=1).cpu()
        values, rows = merge_top_k(cands[..., 0].float(), cands[..., 1].long(), k)
        return values.to(doc_scores.device), rows.to(doc_scores.device)

    def _exchange(self, li: int, rows: torch.Tensor, device: torch.device, dtype: torch.dtype) -> Memory:
        """The chosen documents' K̄/V̄, laid out as MemoryRouter._gather does: owners fill, all_reduce sums."""
        rows = rows.cpu()
        counts = self.shard.chunk_counts[rows]  # [B, k] chunks of each chosen row
        totals = counts.sum(dim=1)
        starts = torch.cumsum(counts, dim=1) - counts
        b, m = rows.shape[0], int(totals.max())
        kv, d = self.bank.kv_heads, self.bank.head_dim
        buf = torch.zeros(2, b, kv, m, d, dtype=dtype, device=self.comm)
        for row in range(b):
            local = self.shard.local_of[rows[row]]
            mine = local >= 0
            if not bool(mine.any()):
                continue
            chunks = self.bank.chunks_of(local[mine])
            # destination slots: start..start+count of each owned choice, concatenated in choice order
            n = counts[row][mine]
            dest = torch.repeat_interleave(starts[row][mine] - (torch.cumsum(n, 0) - n), n) + torch.arange(int(n.sum()))
            dest = dest.to(self.comm)
            k_rows, v_rows = self.bank.gather_kv(li, chunks, self.comm, dtype)  # any K/V tier
            buf[0, row][:, dest] = k_rows.transpose(0, 1)
            buf[1, row][:, dest] = v_rows.transpose(0, 1)
        dist.all_reduce(buf, op=dist.ReduceOp.SUM, group=self.shard.group)
        valid = torch.arange(m).unsqueeze(0) < totals.unsqueeze(1)
        return Memory(buf[0].to(device), buf[1].to(device), valid.to(device))


# ---- retrieval and latent answers ------------------------------------------------------------
def check_same_call(group: Any, *items: Any) -> None:
    """Raise InvalidInputError on every rank unless all ranks passed the same `items` (a digest each)."""
    text = json.dumps(items, default=repr, sort_keys=True)
    digest = int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:7], "big")
    mine = torch.tensor([digest], dtype=torch.long, device=_comm_device(group))
    gathered = [torch.empty_like(mine) for _ in range(dist.get_world_size(group))]
    dist.all_gather(gathered, mine, group=group)
    if len({int(t) for t in gathered}) != 1:
        raise InvalidInputError("ranks called with different arguments (question, k, filter, ...); every rank "
                                "must make the same call: broadcast the question from rank 0 first")


def _check_model(model: MSAModel, shard: ShardedBank) -> None:
    if model.reference is not None:
        raise InvalidInputError("distributed routing does not support the reference profile yet; "
                                "load the model with profile='default'")
    model.check_bank(shard.local)


@torch.no_grad()
def distributed_retrieve(model: MSAModel, question: str | Sequence[str], shard: ShardedBank, k: int = 5, *,
                         filter: Filter = None, include_parts: bool = False, layer_scores: bool = False
                         ) -> list[RetrievedDocument] | list[list[RetrievedDocument]]:
    """MSAModel.retrieve over a sharded bank; every rank calls it with the same arguments and gets the
    same result."""
    if isinstance(k, bool) or not isinstance(k, int) or k <= 0:
        raise InvalidInputError(f"k must be an integer >= 1, got {k!r}")
    _check_model(model, shard)
    questions = [question] if isinstance(question, str) else list(question)
    if not questions:
        raise InvalidInputError("no question given")
    for q in questions:
        if not isinstance(q, str) or not q.strip():
            raise InvalidInputError(f"a question must be a non-empty string, got {q!r}")
        check_text(q, "the question")
    check_same_call(shard.group, questions, k, filter, include_parts, layer_scores)
    allowed = shard.local.row_mask(filter)
    if shard.num_parts == 0:
        return [] if isinstance(question, str) else [[] for _ in questions]
    per_layer = _route_scores(model, questions, shard, allowed)  # [L, B, n_local]
    total = aggregate_layers(per_layer, model.config.routing.layer_aggregate)
    local_hits = [_local_hits(model, shard, total[b], per_layer[:, b], allowed, k, include_parts, layer_scores)
                  for b in range(len(questions))]
    gathered: list[Any] = [None] * shard.world_size
    dist.all_gather_object(gathered, local_hits, group=shard.group)
    # Each parent lives on one rank, so its best part is found locally; the global list is the k best
    # local hits by (score desc, global row asc), exactly the order of MSAModel._rank's stable sort.
    results = [[hit for _, _, hit in sorted((h for rank_hits in gathered for h in rank_hits[b]),
                                            key=lambda h: (-h[0], h[1]))[:k]]
               for b in range(len(questions))]
    return results[0] if isinstance(question, str) else results


def _route_scores(model: MSAModel, questions: list[str], shard: ShardedBank, allowed: torch.Tensor) -> torch.Tensor:
    """MSAModel._route_scores with a DistributedMemoryRouter: local doc scores per layer [L, B, n_local]."""
    cfg = model.config.routing

    def hook(routing: torch.Tensor, positions: torch.Tensor) -> DistributedMemoryRouter:
        return DistributedMemoryRouter(shard, model.router, cfg, routing, allowed=allowed, positions=positions,
                                       attend=cfg.retrieve_with_memory)

    state = routed_prefill(model.backbone, [build_prompt(model.tokenizer, q) for q in questions],
                           offset=model.position_offset(cfg.top_k), hook=hook, pad_id=model.tokenizer.pad_token_id or 0,
                           score_only=True, last_layer=max(model.layers))
    return torch.stack([state.hook.routings[layer].doc_scores for layer in model.layers]).cpu()


def _local_hits(model: MSAModel, shard: ShardedBank, total: torch.Tensor, per_layer: torch.Tensor,
                allowed: torch.Tensor, k: int, include_parts: bool, with_layers: bool
                ) -> list[tuple[float, int, RetrievedDocument]]:
    """MSAModel.ranked_rows on the local rows, each hit with its score and global row (the merge keys)."""
    hits = model.ranked_rows(shard.local, total, per_layer, allowed, k, include_parts, with_layers)
    return [(hit.score, int(shard.global_rows[row]), hit) for row, hit in hits]


@torch.no_grad()
def distributed_answer(model: MSAModel, question: str | Sequence[Message], shard: ShardedBank, *,
                       k: int | None = None, filter: Filter = None, max_new_tokens: int = 128,
                       temperature: float = 0.0, top_p: float = 1.0, stop: Sequence[str] | None = None,
                       seed: int | None = None) -> Answer:
    """MSAModel.answer(mode="latent") over a sharded bank. Routing (in the prefill) is distributed;
    decoding is replicated on every rank, so every rank returns the same Answer."""
    _check_model(model, shard)
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                            stop=list(stop or []), seed=seed)
    k = model.config.routing.top_k if k is None else k
    if isinstance(k, bool) or not isinstance(k, int) or k <= 0:
        raise InvalidInputError(f"k must be >= 1, got {k!r}")
    check_same_call(shard.group, question, k, filter, max_new_tokens, temperature, top_p, list(stop or []), seed)
    prompt = build_prompt(model.tokenizer, question)
    memory = None
    if shard.num_parts:
        allowed = shard.local.row_mask(filter)

        def memory(routing: torch.Tensor, positions: torch.Tensor) -> DistributedMemoryRouter:
            return DistributedMemoryRouter(shard, model.router, model.config.routing, routing, allowed=allowed,
                                           top_k=k, positions=positions)

    gen = Generation(model.backbone, model.tokenizer, prompt, params, memory=memory,
                     position_offset=model.position_offset(k) if memory else 0, eos_ids=model.eos_ids)
    text = "".join(gen)
    ids, scores, per_layer = _used_documents(model, shard, gen.router)
    return Answer(text, "latent", ids, scores, gen.finish_reason, per_layer)


def _used_documents(model: MSAModel, shard: ShardedBank, router: DistributedMemoryRouter | None):
    """MSAModel._used_documents: the owners report (parent id, aggregated score) of their chosen rows."""
    if router is None or not router.routings:
        return [], [], {}
    stacked = torch.stack([router.routings[layer].doc_scores[0] for layer in model.layers]).unsqueeze(1)
    total = aggregate_layers(stacked.cpu(), model.config.routing.layer_aggregate)[0]  # local rows
    chosen = {r for rt in router.routings.values() for r in rt.selected[0].tolist()}
    mine = {}
    for g in chosen:
        local = int(shard.local_of[g])
        if local >= 0:
            mine[g] = (shard.local.docstore[local].parent_id, float(total[local]))
    gathered: list[Any] = [None] * shard.world_size
    dist.all_gather_object(gathered, mine, group=shard.group)
    info = {g: v for part in gathered for g, v in part.items()}
    per_layer = {layer: list(dict.fromkeys(info[r][0] for r in rt.selected[0].tolist()))
                 for layer, rt in router.routings.items()}
    best: dict[str, float] = {}
    for rows in (rt.selected[0].tolist() for rt in router.routings.values()):
        for r in rows:
            pid, score = info[r]
            best[pid] = max(best.get(pid, float("-inf")), score)
    ranked = sorted(best.items(), key=lambda kv: -kv[1])
    return [p for p, _ in ranked], [s for _, s in ranked], per_layer
