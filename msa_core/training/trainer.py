"""Train router projectors (W_QR, W_KR) with the backbone frozen: the paper's decoupled InfoNCE (Eq. 5)
over per-layer document scores (Eq. 2 or ColBERT order: the same `document_scores` retrieval uses).

    report = train_router(model, ["train/squad.jsonl"], "router.safetensors", TrainConfig(steps=2000))

The backbone's states are cached once (msa_core/train_cache.py), so a step costs a few small matrix
products, on states preconditioned by a fixed map S (msa_core/train_precondition.py) that is folded into
the saved router. Negatives: the other documents of the batch, plus hard negatives mined with BM25 before
training and with the router itself during it. Only the routing (aux) loss trains the router: top-k
selection is not differentiable (spec §2.6), so with a frozen backbone an LM loss would give the
projectors no gradient and is not offered.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field

from ..config import RoutingConfig
from ..errors import InvalidInputError
from ..routing.projectors import RouterProjectors
from ..routing.scores import document_scores
from .cache import RaggedStates
from .data import TrainingSet

_CKPT_POINTER = "LATEST"


def decoupled_infonce(scores: torch.Tensor, positive: torch.Tensor, tau: float = 0.1) -> torch.Tensor:
    """Paper Eq. 5: the mean over (query, positive document) pairs of
    -log(e^{s+/tau} / (e^{s+/tau} + sum over the query's negatives of e^{s-/tau})).

    scores [B, N]; positive [B, N] bool (every other document of the row is a negative). Each
    positive competes with the negatives only, never with the query's other positives.
    """
    if scores.shape != positive.shape or scores.dim() != 2:
        raise InvalidInputError(f"scores and positive must both be [B, N], got {tuple(scores.shape)} "
                                f"and {tuple(positive.shape)}")
    if not positive.any():
        raise InvalidInputError("no positive document in the batch")
    logits = scores.float() / tau
    negatives = torch.logsumexp(logits.masked_fill(positive, float("-inf")), dim=1, keepdim=True)
    per_pair = F.softplus(negatives - logits)  # -log(e^a / (e^a + e^b)) = softplus(b - a)
    return per_pair[positive].mean()


def teacher_kl(scores: torch.Tensor, teacher: torch.Tensor, tau: float, teacher_tau: float) -> torch.Tensor | None:
    """Listwise distillation: the mean over rows of KL(p_teacher || p_student), each a softmax over the row's
    teacher-scored documents only (teacher [B, N], -inf where unscored) at its own temperature; rows with
    fewer than two scored documents are skipped (None when no row has two)."""
    scored = torch.isfinite(teacher)
    rows = scored.sum(dim=1) >= 2
    if not rows.any():
        return None
    scored, teacher, scores = scored[rows], teacher[rows], scores[rows].float()
    log_student = torch.log_softmax((scores / tau).masked_fill(~scored, float("-inf")), dim=1)
    log_teacher = torch.log_softmax(teacher / teacher_tau, dim=1)
    p_teacher = log_teacher.exp()
    per_doc = torch.where(scored, p_teacher * (log_teacher - log_student), torch.zeros_like(log_student))
    return per_doc.sum(dim=1).mean()


class TrainConfig(BaseModel):
    """Router training settings. Defaults suit the embedded 135M backbone on one GPU."""

    model_config = ConfigDict(extra="forbid")

    steps: int = Field(default=1500, ge=1)
    batch_size: int = Field(default=256, ge=2, description="Questions per step.")
    lr: float = Field(default=5e-4, gt=0)
    weight_decay: float = Field(default=0.0, ge=0)
    warmup_steps: int = Field(default=100, ge=0)
    tau: float = Field(default=0.1, gt=0, le=0.5, description="InfoNCE temperature (paper: 0.1).")
    hard_negatives: int = Field(default=3, ge=0, description="Mined negatives sampled per question per step.")
    bm25_depth: int = Field(default=30, ge=0, description="BM25 hits kept as the hard-negative pool (0: none).")
    router_depth: int = Field(default=30, ge=1, description="Router hits kept when mining with the router.")
    mine_at: list[float] = Field(default_factory=lambda: [0.4, 0.7],
                                 description="Fractions of the steps after which the router mines negatives.")
    aggregate_weight: float = Field(default=0.0, ge=0,
                                    description="Weight of the loss on the layer-aggregated score.")
    teacher_weight: float = Field(default=0.0, ge=0, description="Weight of the listwise distillation loss "
                                  "(teacher_kl) on questions whose data carries teacher scores; 0: none.")
    teacher_tau: float = Field(default=0.05, gt=0, description="Temperature of the teacher's softmax over a "
                               "question's scored documents (teacher_kl).")
    eval_every: int = Field(default=250, ge=1)
    heldout_fraction: float = Field(default=0.02, ge=0, lt=1)
    heldout_sources: list[str] = Field(default_factory=list,
                                       description="Sources held out whole: layer choice then favours transfer.")
    checkpoint_every: int = Field(default=500, ge=1)
    seed: int = 0
    precision: str = Field(default="auto", pattern="^(auto|fp32|bf16)$",
                           description="bf16 autocast for projections on GPU when 'auto'.")
    max_layers: int | None = Field(default=None, ge=1,
                                   description="Keep only the best n routing layers (chosen on held-out data).")
    max_per_source: int | None = Field(default=None, ge=1, description="Cap on questions per source (data mix).")
    title_rate: float = Field(default=0.5, ge=0, le=1, description="Share of titled documents encoded with title.")
    cache_batch_tokens: int = Field(default=16384, ge=256, description="Padded tokens per caching forward.")
    needles: int = Field(default=0, ge=0, description="Synthetic needle-lookup questions added to the training "
                         "split (and a share of it to the held-out split), built from the split's own documents.")
    span_pairs: int = Field(default=0, ge=0, description="Self-supervised questions added to the training split: "
                            "a few words cut from a training document, answered by that document.")
    pair_questions: int = Field(default=0, ge=0, description="Self-supervised two-document questions added to "
                                "the training split: words around a name in each of two training documents.")
    tune_from_layer: int | None = Field(default=None, ge=1, description="Also train the backbone's layers from "
                                        "this one up, as rank-lora_rank adapters carried in the router file "
                                        "(msa_core/train_tuned.py); None: the backbone stays frozen.")
    lora_rank: int = Field(default=32, ge=1, description="Rank of the backbone adapters (with tune_from_layer).")
    adapter_lr: float = Field(default=5e-4, gt=0, description="Peak learning rate of the backbone adapters.")
    lm_weight: float = Field(default=0.1, ge=0, description="Weight of the next-token loss on a few of each "
                             "batch's documents, which keeps the tuned backbone a language model.")
    recompute: bool = Field(default=False, description="With tune_from_layer: run each tuned layer again in the "
                            "backward pass instead of keeping its activations (about a third more time, a "
                            "fraction of the memory).")
    precondition: str = Field(default="standardize", pattern="^(none|standardize|whiten)$",
                              description="Train on conditioned states S·x and save W = V·S "
                              "(msa_core/train_precondition.py).")


@dataclass
class TrainReport:
    steps: int
    seconds: float
    device: str
    layers: list[int]
    train_queries: int
    train_documents: int
    heldout_queries: int
    heldout_documents: int
    sources: dict[str, int]
    history: list[dict[str, Any]] = field(default_factory=list)
    final: dict[str, Any] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


# ---- scoring ------------------------------------------------------------------------------------


def layer_doc_scores(router: RouterProjectors, layer: int, q_x: torch.Tensor, q_mask: torch.Tensor,
                     d_x: torch.Tensor, chunk_doc: torch.Tensor, n_docs: int, cfg: RoutingConfig) -> torch.Tensor:
    """Eq. 2 document scores [B, N] of one layer from cached states: q_x [B, T, hidden] normed question
    states, d_x [C, hidden] pooled document states, chunk_doc [C] the document of each chunk.
    Differentiable in the router's weights; the same functions rank documents at retrieval time."""
    q = router.project_queries(layer, q_x)
    k = router.project_keys(layer, d_x)
    return document_scores(q, q_mask, k, chunk_doc, n_docs, head_reduce=cfg.head_reduce,
                           query_reduce=cfg.query_reduce, chunk_reduce=cfg.chunk_reduce,
                           normalization=cfg.normalization)


@torch.no_grad()
def corpus_scores(router: RouterProjectors, layers: Sequence[int], queries: RaggedStates,
                  documents: RaggedStates, cfg: RoutingConfig, *, block: int = 256,
                  state_layers: Sequence[int] | None = None):
    """Yield (query rows, per-layer scores [L, b, N]) over all documents, `block` questions at a time.
    state_layers: the layers the cached states hold, in order (default: `layers`)."""
    dev = documents.x.device
    column = {layer: i for i, layer in enumerate(state_layers or layers)}
    chunk_doc = torch.repeat_interleave(torch.arange(len(documents)), documents.lengths()).to(dev)
    keys = {layer: router.project_keys(layer, documents.x[:, column[layer]]) for layer in layers}
    for start in range(0, len(queries), block):
        rows = list(range(start, min(start + block, len(queries))))
        q_x, q_mask = queries.padded(rows)
        per_layer = []
        for layer in layers:
            q = router.project_queries(layer, q_x[:, :, column[layer]])
            per_layer.append(document_scores(q, q_mask, keys[layer], chunk_doc, len(documents),
                                             head_reduce=cfg.head_reduce, query_reduce=cfg.query_reduce,
                                             chunk_reduce=cfg.chunk_reduce, normalization=cfg.normalization))
        yield rows, torch.stack(per_layer)


def recall_at(ranked: torch.Tensor, positives: Sequence[Sequence[int]], ks: Sequence[int]) -> dict[str, float]:
    """Mean share of each question's positives in its top k (ranked [Q, >=max k] document indices)."""
    out = {}
    for k in ks:
        top = ranked[:, :k].tolist()
        out[f"recall@{k}"] = sum(len(set(t) & set(p)) / len(p) for t, p in zip(top, positives)) / len(positives)
    return out


def _aggregate(per_layer: torch.Tensor, how: str) -> torch.Tensor:
    return per_layer.mean(0) if how == "mean" else per_layer.amax(0)


@torch.no_grad()
def evaluate(router: RouterProjectors, layers: Sequence[int], queries: RaggedStates, documents: RaggedStates,
             positives: Sequence[Sequence[int]], cfg: RoutingConfig, ks: Sequence[int] = (1, 5, 10), *,
             state_layers: Sequence[int] | None = None) -> dict[str, Any]:
    """Recall@k of the layer-aggregated ranking, and recall@5 of each layer on its own."""
    kmax = min(max(ks), len(documents))
    agg, per = [], []
    for _, scores in corpus_scores(router, layers, queries, documents, cfg, state_layers=state_layers):
        agg.append(_aggregate(scores, cfg.layer_aggregate).topk(kmax, dim=1).indices.cpu())
        per.append(scores.topk(min(5, len(documents)), dim=2).indices.cpu())
    result: dict[str, Any] = recall_at(torch.cat(agg), positives, ks)
    per_layer = torch.cat(per, dim=1)
    result["per_layer_recall@5"] = {str(layer): round(recall_at(per_layer[li], positives, [5])["recall@5"], 4)
                                    for li, layer in enumerate(layers)}
    return result


@torch.no_grad()
def choose_layers(router: RouterProjectors, layers: Sequence[int], queries: RaggedStates,
                  documents: RaggedStates, positives: Sequence[Sequence[int]], cfg: RoutingConfig,
                  max_layers: int) -> list[int]:
    """Greedy forward selection of at most `max_layers` layers by held-out mean recall@{1,5,10} of
    their aggregated score."""
    blocks = [scores.cpu() for _, scores in corpus_scores(router, layers, queries, documents, cfg)]
    scores = torch.cat(blocks, dim=1)  # [L, Q, N]
    kmax = min(10, scores.shape[2])

    def quality(chosen: list[int]) -> float:
        ranked = _aggregate(scores[chosen], cfg.layer_aggregate).topk(kmax, dim=1).indices
        return sum(recall_at(ranked, positives, [1, 5, kmax]).values())

    chosen: list[int] = []
    best = -1.0
    while len(chosen) < max_layers:
        candidates = [(quality(chosen + [i]), i) for i in range(len(layers)) if i not in chosen]
        value, i = max(candidates)
        if chosen and value <= best:
            break
        chosen.append(i)
        best = value
    return sorted(layers[i] for i in chosen)


# ---- the trainer --------------------------------------------------------------------------------


class RouterTrainer:
    """Trains a router on cached states. Deterministic for a seed; checkpoints can resume exactly."""

    def __init__(self, router: RouterProjectors, layers: Sequence[int], train: TrainingSet,
                 train_queries: RaggedStates, train_docs: RaggedStates, heldout: TrainingSet | None,
                 heldout_queries: RaggedStates | None, heldout_docs: RaggedStates | None,
                 config: TrainConfig, routing: RoutingConfig, *, checkpoint_dir: str | Path | None = None,
                 log: Any = None, extra_parameters: dict[str, torch.nn.Parameter] | None = None,
                 extra_lr_scale: float = 1.0) -> None:
        self.router, self.layers, self.cfg, self.routing = router, list(layers), config, routing
        self.train, self.tq, self.td = train, train_queries, train_docs
        self.heldout, self.hq, self.hd = heldout, heldout_queries, heldout_docs
        self.device = next(router.parameters()).device
        self.router_pool: list[list[int]] = [[] for _ in range(len(train))]
        self.step = 0
        self.history: list[dict[str, Any]] = []
        self.checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir else None
        self.log = log or (lambda message: None)
        self.names = dict(router.named_parameters())  # every trained tensor, by the name checkpoints use
        self.names.update({f"backbone.{n}": p for n, p in (extra_parameters or {}).items()})
        for p in self.names.values():
            p.requires_grad_(True)
        # Extra parameters (backbone adapters) learn at extra_lr_scale times the router's rate.
        groups = [{"params": list(router.parameters()), "lr_scale": 1.0}]
        if extra_parameters:
            groups.append({"params": list(extra_parameters.values()), "lr_scale": extra_lr_scale})
        self.optimizer = torch.optim.AdamW(groups, lr=config.lr, weight_decay=config.weight_decay)
        bf16 = config.precision == "bf16" or (config.precision == "auto" and self.device.type == "cuda")
        self.autocast = torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=bf16)
        self.mine_steps = sorted({max(1, int(f * config.steps)) for f in config.mine_at if 0 < f < 1})

    # -- schedule and batches --

    def lr_at(self, step: int) -> float:
        """Linear warm-up, then cosine decay to a tenth of the peak."""
        c = self.cfg
        if step < c.warmup_steps:
            return c.lr * (step + 1) / c.warmup_steps
        progress = (step - c.warmup_steps) / max(1, c.steps - c.warmup_steps)
        return c.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))

    def batch_rows(self, step: int) -> list[int]:
        """Questions of `step`: epoch-wise permutations seeded by (seed, epoch), so any step is
        reproducible on its own (what exact resumption needs)."""
        n, b = len(self.train), min(self.cfg.batch_size, len(self.train))
        first = step * b
        rows: list[int] = []
        while len(rows) < b:
            epoch, offset = divmod(first + len(rows), n)
            perm = torch.randperm(n, generator=torch.Generator().manual_seed(self.cfg.seed * 7919 + epoch))
            rows.extend(perm[offset : offset + b - len(rows)].tolist())
        return rows

    def batch_documents(self, step: int, rows: Sequence[int]) -> tuple[list[int], torch.Tensor]:
        """The batch's documents (positives, given and sampled hard negatives) and the positive mask."""
        gen = torch.Generator().manual_seed(self.cfg.seed * 1_000_003 + step)
        docs: dict[int, int] = {}
        for q in rows:
            for d in self.train.positives[q]:
                docs.setdefault(d, len(docs))
        for q in rows:
            pool = list(dict.fromkeys(self.train.mined_negatives[q] + self.router_pool[q]))
            picks = list(self.train.given_negatives[q])
            if pool and self.cfg.hard_negatives:
                take = torch.randperm(len(pool), generator=gen)[: self.cfg.hard_negatives].tolist()
                picks += [pool[i] for i in take]
            for d in picks:
                docs.setdefault(d, len(docs))
        order = list(docs)
        positive = torch.zeros(len(rows), len(order), dtype=torch.bool)
        for b, q in enumerate(rows):
            for d in self.train.positives[q]:
                positive[b, docs[d]] = True
        return order, positive.to(self.device)

    # -- one step --

    def batch_states(self, rows: Sequence[int], docs: Sequence[int]):
        """Question states [B, T, L, hidden] and mask, pooled document states [C, L, hidden] and the
        batch position of each chunk's document."""
        q_x, q_mask = self.tq.padded(rows)
        d_x, owner = self.td.flat(docs)
        return q_x, q_mask, d_x, owner

    def extra_loss(self, docs: Sequence[int]) -> tuple[torch.Tensor | None, dict[str, float]]:
        """A loss added to the routing loss (none here; the tuned trainer adds the LM loss)."""
        return None, {}

    def loss(self, step: int) -> tuple[torch.Tensor, dict[str, float]]:
        rows = self.batch_rows(step)
        docs, positive = self.batch_documents(step, rows)
        per_layer = []
        with self.autocast:
            q_x, q_mask, d_x, owner = self.batch_states(rows, docs)
            for li, layer in enumerate(self.layers):
                per_layer.append(layer_doc_scores(self.router, layer, q_x[:, :, li], q_mask, d_x[:, li], owner,
                                                  len(docs), self.routing))
            extra, info = self.extra_loss(docs)
        losses = torch.stack([decoupled_infonce(s, positive, self.cfg.tau) for s in per_layer])
        total = losses.mean()
        if self.cfg.aggregate_weight:
            agg = _aggregate(torch.stack(per_layer), self.routing.layer_aggregate)
            total = total + self.cfg.aggregate_weight * decoupled_infonce(agg, positive, self.cfg.tau)
        if self.cfg.teacher_weight:
            teacher = self.teacher_scores(rows, docs)
            kls = [kl for kl in (teacher_kl(s, teacher, self.cfg.tau, self.cfg.teacher_tau) for s in per_layer)
                   if kl is not None]
            if kls:
                kl = torch.stack(kls).mean()
                total = total + self.cfg.teacher_weight * kl
                info = {**info, "teacher_kl": float(kl.detach())}
        info = {"loss": float(total.detach()), **info, "documents": len(docs)}
        return (total if extra is None else total + extra), info

    def teacher_scores(self, rows: Sequence[int], docs: Sequence[int]) -> torch.Tensor:
        """[B, N] the teacher's score of each batch document for each row's question (-inf: not scored)."""
        column = {d: i for i, d in enumerate(docs)}
        out = torch.full((len(rows), len(docs)), float("-inf"))
        for b, q in enumerate(rows):
            for d, t in self.train.teacher[q].items():
                if d in column:
                    out[b, column[d]] = t
        return out.to(self.device)

    def run(self, stop_at: int | None = None) -> list[dict[str, Any]]:
        """Train to config.steps (or stop early at `stop_at`, as an interrupted run would)."""
        c = self.cfg
        started = time.perf_counter()
        while self.step < min(c.steps, stop_at or c.steps):
            for group in self.optimizer.param_groups:
                group["lr"] = self.lr_at(self.step) * group["lr_scale"]
            self.optimizer.zero_grad(set_to_none=True)
            loss, info = self.loss(self.step)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(list(self.names.values()), 1.0)
            self.optimizer.step()
            self.step += 1
            record = {"step": self.step, "lr": self.lr_at(self.step - 1), **info}
            if self.step in self.mine_steps:
                t = time.perf_counter()
                self.mine_router_negatives()
                record["mined_seconds"] = round(time.perf_counter() - t, 2)
            if self.heldout is not None and (self.step % c.eval_every == 0 or self.step == c.steps):
                record["heldout"] = self.evaluate_heldout()
            if self.step % 50 == 0 or "heldout" in record or self.step == c.steps:
                record["elapsed"] = round(time.perf_counter() - started, 2)
                if self.device.type == "cuda":
                    record["gpu_peak_gib"] = round(torch.cuda.max_memory_allocated(self.device) / 2**30, 2)
                self.log(json.dumps(record))
                self.history.append(record)
            if self.checkpoint_dir and (self.step % c.checkpoint_every == 0 or self.step == c.steps):
                self.save_checkpoint()
        return self.history

    def backbone_delta(self) -> tuple[dict[str, torch.Tensor], float]:
        """The backbone delta the saved router carries: here, the starting router's own (the backbone is
        frozen, but a router trained on a tuned backbone's states needs that backbone)."""
        return dict(self.router.backbone_delta), self.router.delta_scale

    def heldout_states(self) -> tuple[RaggedStates, RaggedStates]:
        """The held-out questions' and documents' states as the router reads them now."""
        assert self.hq is not None and self.hd is not None
        return self.hq, self.hd

    def evaluate_heldout(self) -> dict[str, Any]:
        assert self.heldout is not None
        hq, hd = self.heldout_states()
        return evaluate(self.router, self.layers, hq, hd, self.heldout.positives, self.routing)

    @torch.no_grad()
    def mine_router_negatives(self) -> None:
        """Each question's best-scored documents that are not its positives, by the current router."""
        depth = self.cfg.router_depth
        extra = max(len(p) for p in self.train.positives)
        k = min(depth + extra, len(self.train.documents))
        with self.autocast:
            for rows, scores in corpus_scores(self.router, self.layers, self.tq, self.td, self.routing, block=512):
                top = _aggregate(scores, self.routing.layer_aggregate).topk(k, dim=1).indices.tolist()
                for q, hits in zip(rows, top):
                    pos = set(self.train.positives[q])
                    self.router_pool[q] = [d for d in hits if d not in pos][:depth]

    # -- checkpoints --

    def save_checkpoint(self) -> Path:
        """step-NNNNNN/ with router, optimizer moments, mined pools and counters; LATEST names it.
        Written to a temporary folder and renamed, then the pointer is replaced: a crash leaves the
        previous checkpoint readable."""
        from safetensors.torch import save_file

        assert self.checkpoint_dir is not None
        root = self.checkpoint_dir
        root.mkdir(parents=True, exist_ok=True)
        name = f"step-{self.step:06d}"
        tmp = root / f".{name}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        save_file({n: p.detach().cpu().contiguous() for n, p in self.names.items()}, str(tmp / "router.safetensors"))
        moments: dict[str, torch.Tensor] = {}
        for n, p in self.names.items():
            state = self.optimizer.state.get(p, {})
            for key in ("exp_avg", "exp_avg_sq", "step"):
                if key in state:
                    moments[f"{n}.{key}"] = torch.as_tensor(state[key]).detach().cpu().contiguous()
        save_file(moments, str(tmp / "optimizer.safetensors"))
        state = {"step": self.step, "config": self.cfg.model_dump(), "layers": self.layers,
                 "history": self.history, "router_pool": self.router_pool}
        (tmp / "state.json").write_text(json.dumps(state))
        target = root / name
        shutil.rmtree(target, ignore_errors=True)
        os.replace(tmp, target)
        pointer = root / f".{_CKPT_POINTER}.tmp"
        pointer.write_text(name)
        os.replace(pointer, root / _CKPT_POINTER)
        for old in sorted(root.glob("step-*"))[:-2]:  # keep the last two
            shutil.rmtree(old, ignore_errors=True)
        return target

    def load_checkpoint(self) -> bool:
        """Resume from the LATEST checkpoint, if there is one. Returns whether one was loaded."""
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        if self.checkpoint_dir is None or not (self.checkpoint_dir / _CKPT_POINTER).is_file():
            return False
        folder = self.checkpoint_dir / (self.checkpoint_dir / _CKPT_POINTER).read_text().strip()
        try:
            state = json.loads((folder / "state.json").read_text())
            weights = load_file(str(folder / "router.safetensors"))
            moments = load_file(str(folder / "optimizer.safetensors"))
        except (OSError, ValueError, SafetensorError) as e:
            raise InvalidInputError(f"checkpoint {folder} cannot be read ({e}); delete it to start over") from e
        if state["layers"] != self.layers:
            raise InvalidInputError(f"checkpoint {folder} trains layers {state['layers']}, this run {self.layers}")
        with torch.no_grad():
            for n, p in self.names.items():
                p.copy_(weights[n].to(p.device, p.dtype))
        for n, p in self.names.items():
            if f"{n}.exp_avg" in moments:
                self.optimizer.state[p] = {
                    "step": moments[f"{n}.step"].clone(),
                    "exp_avg": moments[f"{n}.exp_avg"].to(p.device),
                    "exp_avg_sq": moments[f"{n}.exp_avg_sq"].to(p.device),
                }
        self.step = int(state["step"])
        self.history = list(state["history"])
        self.router_pool = [list(x) for x in state["router_pool"]]
        return True


# ---- the whole job ------------------------------------------------------------------------------


def heldout_needles(c: TrainConfig) -> int:
    """Needle questions added to the held-out split alongside c.needles training ones."""
    return max(1, int(c.needles * c.heldout_fraction))


def read_training_data(data: Sequence[str | Path], c: TrainConfig, log: Any = print):
    """Read and split the pairs, add synthetic questions, mine BM25 negatives.
    Returns (all pairs, training split, held-out split, {"data": seconds})."""
    from .data import add_needle_pairs, add_pair_questions, add_span_pairs, load_pairs

    torch.manual_seed(c.seed)
    t0 = time.perf_counter()
    full = load_pairs(data, title_rate=c.title_rate, max_per_source=c.max_per_source)
    train, heldout = full.split(c.heldout_fraction, c.heldout_sources)
    if c.needles:
        add_needle_pairs(train, c.needles, seed=c.seed + 1)
        add_needle_pairs(heldout, heldout_needles(c), seed=c.seed + 2)
    add_span_pairs(train, c.span_pairs, seed=c.seed + 3)
    add_pair_questions(train, c.pair_questions, seed=c.seed + 4)
    if len(train) < 2:
        raise InvalidInputError(f"only {len(train)} training questions after the held-out split; give more data")
    log(f"data: {len(train)} training questions over {len(train.documents)} documents, "
        f"{len(heldout)} held out over {len(heldout.documents)}; sources {full.source_counts()}")
    if c.bm25_depth:
        train.mine_bm25_negatives(c.bm25_depth)
    timings = {"data": round(time.perf_counter() - t0, 2)}
    log(f"data read and BM25 negatives mined in {timings['data']} s")
    return full, train, heldout, timings
