"""`MSAModel`: the object users meet. Encode documents into a bank, retrieve, answer.

    model = MSAModel.from_pretrained("default")          # embedded SmolLM2-135M-Instruct
    bank = model.index(texts, ids=ids, metadatas=metas)  # stage 1
    hits = model.retrieve("question", bank, k=5)         # routing only
    ans = model.answer("question", bank, mode="latent")  # or mode="hybrid"

MSA-format checkpoints (the released MSA-4B) load with the `reference` profile: the authors' prompts,
document rendering and memory layout (msa_core/inference/reference.py), and `mode="interleave"`, their
generative-retrieval loop (msa_core/inference/interleave.py).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from .checkpoints.loading import ModelParts
from .config import MSAConfig
from .decoder.backbone import Backbone
from .decoder.packed import weights_state
from .errors import InvalidInputError, ModelLoadError, check_text
from .inference.encode import encode_parts, split_documents
from .inference.engine import Engine
from .inference.fused_answers import FusedTopK, annotate, answer_fusion, fused_top_k, fusion_kwargs, fusion_record
from .inference.generate import (
    Generation,
    HookFactory,
    Message,
    Prompt,
    SamplingParams,
    build_prompt,
    engine_for,
    generate_batch,
    hybrid_text,
    last_user_text,
    route_questions,
    routed_prefill,
    with_last_user,
)
from .inference.memory_router import MemoryRouter
from .memory.bank import MemoryBank
from .memory.filters import Filter
from .memory.records import check_documents
from .routing.fusion import Fused, check_fusion
from .routing.projectors import RouterProjectors
from .routing.scores import aggregate_layers, relevance

Mode = Literal["latent", "hybrid", "interleave"]
# A hybrid-mode generator: prompt text -> answer text, or an iterator of text pieces (streaming).
Generator = Callable[[str], "str | Iterable[str]"]



@dataclass
class RetrievedDocument:
    id: str
    score: float  # raw routing score (cosine in [-1, 1] with the default normalisation)
    relevance_score: float  # score mapped to [0, 1]
    text: str
    metadata: dict[str, Any]
    layer_scores: dict[int, float] | None = None  # per routing layer, on request
    latent_score: float | None = None  # fusion: the routing score (`score` is then the fused one)
    lexical_score: float | None = None  # fusion: the BM25 score

    def to_dict(self) -> dict[str, Any]:
        d = {"id": self.id, "score": self.score, "relevance_score": self.relevance_score,
             "title": self.metadata.get("title"), "text": self.text, "metadata": self.metadata}
        if self.latent_score is not None:
            d.update(latent_score=self.latent_score, lexical_score=self.lexical_score)
        if self.layer_scores is not None:
            d["layer_scores"] = {str(k): v for k, v in self.layer_scores.items()}
        return d


@dataclass
class Answer:
    text: str
    mode: Mode
    doc_ids: list[str]  # documents the answer was conditioned on, best first
    scores: list[float]  # their routing scores
    finish_reason: str | None = None
    layer_selections: dict[int, list[str]] = field(default_factory=dict)  # latent: per routing layer
    rounds: list[list[str]] | None = None  # interleave: the documents injected in each round
    transcript: str | None = None  # interleave: the whole text the model read and wrote
    fusion: dict[str, Any] | None = None  # fusion: alpha, method, each side's score per doc_ids entry

    def to_dict(self) -> dict[str, Any]:
        d = {"answer": self.text, "mode": self.mode, "doc_ids": self.doc_ids, "scores": self.scores,
             "finish_reason": self.finish_reason,
             "layer_selections": {str(k): v for k, v in self.layer_selections.items()}}
        if self.rounds is not None:
            d["rounds"] = self.rounds
        if self.transcript is not None:
            d["transcript"] = self.transcript
        if self.fusion is not None:
            d["fusion"] = self.fusion
        return d


class AnswerStream:
    """Iterate for text pieces as they are generated; `result` holds the Answer afterwards."""

    def __init__(self, pieces: Iterator[str], finish: Callable[[str], Answer]) -> None:
        self._pieces, self._finish = pieces, finish
        self._text: list[str] = []
        self.result: Answer | None = None

    def __iter__(self) -> Iterator[str]:
        for piece in self._pieces:
            self._text.append(piece)
            yield piece
        self.result = self._finish("".join(self._text))

    def collect(self) -> Answer:
        for _ in self:
            pass
        assert self.result is not None
        return self.result


class MSAModel:
    """A backbone, its router projectors and the engine settings."""

    def __init__(self, backbone: Backbone, tokenizer: Any, router: RouterProjectors, config: MSAConfig, *,
                 name: str = "", eos_ids: Sequence[int] = (), generator: Backbone | None = None) -> None:
        from .inference.reference import ReferenceProfile

        if config.profile is None:
            config = config.model_copy(update={"profile": "default"})
        self.backbone, self.tokenizer, self.router, self.config = backbone, tokenizer, router, config
        # hybrid answers generate with the base weights where the router carries a backbone delta (routing only)
        self.generator = generator if generator is not None else backbone
        self.name = name
        self.layers = config.resolve_routing_layers(backbone.args.num_layers)
        if sorted(router.layers) != self.layers:
            raise ModelLoadError(f"router covers layers {router.layers} but routing layers are {self.layers}")
        self.eos_ids = list(eos_ids)
        self.backbone_fingerprint = backbone.fingerprint()
        self.hf_config: Any = None  # the checkpoint's transformers config, kept for save_pretrained
        self.msa_config: dict[str, Any] | None = None  # an MSA checkpoint's msa_config (defaults filled)
        self.reference = ReferenceProfile(self) if config.profile == "reference" else None
        self.router_source = router.init_mode  # from_pretrained records the file or choice it loaded

    @property
    def engine(self) -> Engine:
        """The inference engine (static caches, CUDA-graph decode on a GPU); `model.engine.set_compile(True)`
        also torch.compiles the captured decode step (about 2x faster decode, a slow first step)."""
        return engine_for(self.backbone)

    @property
    def profile(self) -> str:
        """'default' or 'reference' (the released MSA code's prompts and memory layout)."""
        return self.config.profile or "default"

    # ---- loading ------------------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, name_or_path: str | Path = "default", *, router: str | Path | None = None,
                        config: MSAConfig | dict | None = None, device: str | torch.device | None = None,
                        dtype: torch.dtype | None = None, profile: str | None = None) -> "MSAModel":
        """Load a Llama/Qwen2/Qwen3 checkpoint ("default" = the embedded SmolLM2-135M-Instruct) or an
        MSA-format one (config.json model_type "msa", e.g. EverMind-AI/MSA-4B), by folder or hub id.

        router: None (the default model: its trained router, msa_core/data/routers; MSA checkpoints:
        their own router; others: "native"), "native" (copies of W_Q/W_K), "random", or a router
        .safetensors file.
        profile: "default" or "reference"; None takes the config's, else "reference" for MSA-format
        checkpoints and "default" for the others.
        dtype: None is bfloat16 on a GPU and, on a CPU, bfloat16 where it multiplies bf16 natively (AVX-512 BF16,
        AMX), else float32 (decoder/cpu_precision.py); torch.float32 is the exact path. Banks work with either.
        """
        from .checkpoints.defaults import resolve_model_path
        from .checkpoints.loading import load_parts
        from .checkpoints.msa_format import is_msa_checkpoint, load_msa_parts

        if profile not in (None, "default", "reference"):
            raise InvalidInputError(f"profile must be 'default' or 'reference', got {profile!r}")
        path = resolve_model_path(str(name_or_path))
        load = load_msa_parts if is_msa_checkpoint(path) else load_parts
        return cls.from_parts(load(path, router=router, config=config, profile=profile, device=device, dtype=dtype,
                                   name=str(name_or_path)))

    @classmethod
    def from_parts(cls, parts: ModelParts) -> "MSAModel":
        """The model made of loaded (or built in memory) parts: `checkpoints.loading.ModelParts`."""
        model = cls(parts.backbone, parts.tokenizer, parts.router, parts.config, name=parts.name,
                    eos_ids=parts.eos_ids, generator=parts.generator)
        model.hf_config, model.msa_config = parts.hf_config, parts.msa_config
        if parts.router_source is not None:
            model.router_source = parts.router_source
        return model

    @classmethod
    def from_msa_components(cls, backbone: Backbone, tokenizer: Any, msa_config: dict[str, Any] | None,
                            **kw: Any) -> "MSAModel":
        """A model as if loaded from an MSA checkpoint, from objects in memory (no files): e.g. a random
        MSA-4B-shaped backbone for a benchmark. Keywords: router, config, profile, eos_ids, name."""
        from .checkpoints.msa_format import msa_parts_from_components

        return cls.from_parts(msa_parts_from_components(backbone, tokenizer, msa_config, **kw))

    def save_pretrained(self, path: str | Path, *, format: str = "msa", dtype: torch.dtype | None = None) -> Path:
        """Save backbone, router, settings and tokenizer as an MSA-format checkpoint folder (the
        released model's format: config.json with msa_config, router tensors under the reference's
        names). Loading it back gives the same weights, router fingerprint and settings."""
        from .checkpoints.msa_save import save_msa

        if format != "msa":
            raise InvalidInputError(f"format must be 'msa', got {format!r}")
        return save_msa(self, path, dtype=dtype)

    @property
    def router_fingerprint(self) -> str:
        # Hashing every router weight takes about a second for MSA-4B's 18 layers, and every retrieve and
        # answer checks the bank against it: cached until the router object or one of its weights changes.
        key = (id(self.router), weights_state(self.router) if isinstance(self.router, torch.nn.Module) else ())
        if getattr(self, "_router_fp_key", None) != key:
            self._router_fp, self._router_fp_key = self.router.fingerprint(), key
        return self._router_fp

    # ---- banks --------------------------------------------------------------------------

    def new_bank(self) -> MemoryBank:
        a = self.backbone.args
        return MemoryBank(layers=self.layers, kv_heads=a.kv_heads, head_dim=a.head_dim, config=self.config,
                          backbone_fingerprint=self.backbone_fingerprint,
                          router_fingerprint=self.router_fingerprint, model_name=self.name)

    def index(self, texts: Sequence[str], ids: Sequence[str] | None = None,
              metadatas: Sequence[dict[str, Any]] | None = None, *,
              show_progress_bar: bool | None = None) -> MemoryBank:
        """A new bank holding `texts`."""
        bank = self.new_bank()
        self.add(bank, texts, ids, metadatas, show_progress_bar=show_progress_bar)
        return bank

    def add(self, bank: MemoryBank, texts: Sequence[str], ids: Sequence[str] | None = None,
            metadatas: Sequence[dict[str, Any]] | None = None, *,
            show_progress_bar: bool | None = None) -> list[str]:
        """Encode `texts` into `bank`; an id already in the bank is replaced (upsert). Returns the ids."""
        self.check_bank(bank)
        texts, ids, metadatas = check_documents(texts, ids, metadatas)
        enc = self.config.encode
        if self.reference is not None:
            parts = self.reference.document_parts(bank, texts, ids, metadatas, enc.max_doc_tokens)
        else:
            parts = split_documents(self.tokenizer, texts, ids, metadatas, enc.max_doc_tokens)
        encoded = encode_parts(self.backbone, self.router, self.layers, parts, enc,
                               pad_id=self.tokenizer.pad_token_id or 0, show_progress_bar=show_progress_bar)
        return bank.add(encoded)

    def load_bank(self, path: str | Path, *, device: str | torch.device = "cpu", kv: str = "same") -> MemoryBank:
        """Load a saved bank and check it was built by this backbone and router.

        device: where routing happens (K̄_R, the chunk index); on a GPU, routing runs the Triton kernel.
        kv: "same" (K̄/V̄ on `device` too), "host" (pinned CPU memory, only the chosen documents' chunks are
        copied per question) or "disk" (memory-mapped from the bank's file, for banks larger than RAM).
        """
        bank = MemoryBank.load(path, map_location=device, kv=kv)
        self.check_bank(bank)
        return bank

    def check_bank(self, bank: MemoryBank) -> None:
        bank.check_compatible(self.backbone_fingerprint, self.router_fingerprint)
        built, chunk_size = bank.built_with
        if built != self.profile:
            raise InvalidInputError(
                f"bank was built with the {built!r} profile (document rendering and prompts differ); load the "
                f"model with profile={built!r} or rebuild the bank")
        if chunk_size != self.config.encode.chunk_size or bank.layers != self.layers:
            raise InvalidInputError(
                f"bank was built with chunk size {chunk_size} and layers {bank.layers}; "
                f"this model uses {self.config.encode.chunk_size} and {self.layers}")

    # ---- retrieval ----------------------------------------------------------------------

    @torch.no_grad()
    def retrieve(self, question: str | Sequence[str], bank: MemoryBank, k: int = 5, *, filter: Filter = None,
                 include_parts: bool = False, layer_scores: bool = False, fusion: str | None = None,
                 alpha: float | None = None) -> list[RetrievedDocument] | list[list[RetrievedDocument]]:
        """Documents ranked by routing score (mean over routing layers by default).

        fusion="bm25": ranked by routing and BM25 over the bank's text fused (routing/fusion.py); alpha 1 is
        routing only, 0 BM25 only, None the config's `fusion_alpha`. Hits keep both sides' scores.

        A list of questions is routed as one batch and gives one list per question. k above the
        number of (filtered) documents returns them all.
        """
        if isinstance(k, bool) or not isinstance(k, int) or k <= 0:
            raise InvalidInputError(f"k must be an integer >= 1, got {k!r}")
        self.check_bank(bank)
        alpha = check_fusion(fusion, alpha, self.config.routing)
        questions = [question] if isinstance(question, str) else list(question)
        if not questions:
            raise InvalidInputError("no question given")
        for q in questions:  # checked before the empty-bank shortcut, so bad calls fail the same way always
            if not isinstance(q, str) or not q.strip():
                raise InvalidInputError(f"a question must be a non-empty string, got {q!r}")
            check_text(q, "the question")
        allowed = bank.row_mask(filter)
        if len(bank) == 0:
            return [] if isinstance(question, str) else [[] for _ in questions]
        per_layer = self._route_scores(questions, bank, allowed)  # [L, B, N] where the bank routes
        # one ranking per row on that device; per-layer scores cross to the host only when asked for
        total = aggregate_layers(per_layer, self.config.routing.layer_aggregate).cpu()
        per_layer = per_layer.cpu() if layer_scores else per_layer[:, :, :0].cpu()
        if alpha is not None:
            f = Fused.of(total, bank.lexical_index.scores(questions), allowed, alpha, self.config.routing.fusion_method)
            results = [f.hits(b, self.ranked_rows(bank, f.total[b], per_layer[:, b], allowed, k, include_parts,
                                                  layer_scores)) for b in range(len(questions))]
            return results[0] if isinstance(question, str) else results
        results = [self._rank(bank, total[b], per_layer[:, b], allowed, k, include_parts, layer_scores)
                   for b in range(len(questions))]
        return results[0] if isinstance(question, str) else results

    def _route_scores(self, questions: list[str], bank: MemoryBank, allowed: torch.Tensor) -> torch.Tensor:
        if self.reference is not None:
            return self.reference.route_scores(questions, bank, allowed)
        cfg = self.config.routing
        prompts = [build_prompt(self.tokenizer, q) for q in questions]
        offset, pad_id = self.position_offset(cfg.top_k), self.tokenizer.pad_token_id or 0

        def hook(routing: torch.Tensor, positions: torch.Tensor) -> MemoryRouter:
            return MemoryRouter(bank, self.router, cfg, routing, allowed=allowed, positions=positions,
                                attend=cfg.retrieve_with_memory)

        if cfg.retrieve_with_memory:  # routing layers attend to their top-k on the way: the full prefill
            router = routed_prefill(self.backbone, prompts, offset=offset, hook=hook, pad_id=pad_id, score_only=True,
                                    last_layer=max(self.layers)).hook
        else:  # on the question's own states: the engine's query forward, every layer scored at once
            router = route_questions(self.backbone, prompts, hook(None, None), offset=offset, pad_id=pad_id)
        return torch.stack([router.routings[layer].doc_scores for layer in self.layers])

    def _rank(self, bank: MemoryBank, total: torch.Tensor, per_layer: torch.Tensor, allowed: torch.Tensor,
              k: int, include_parts: bool, with_layers: bool) -> list[RetrievedDocument]:
        return [hit for _, hit in self.ranked_rows(bank, total, per_layer, allowed, k, include_parts, with_layers)]

    def ranked_rows(self, bank: MemoryBank, total: torch.Tensor, per_layer: torch.Tensor, allowed: torch.Tensor,
                    k: int, include_parts: bool, with_layers: bool) -> list[tuple[int, RetrievedDocument]]:
        """(bank row, hit), best part rows first; a parent is ranked by its best part unless parts are
        asked for. Memory Parallel merges these per-rank lists by (score, global row)."""
        n = total.shape[0]
        # Most calls need only the first k rows: order the rows scoring at least the c-th best score (ties included,
        # so the order is a full stable sort's prefix); sort everything only if filters or repeated parents use them up.
        c = min(n, max(8 * k, 256))
        if c < n:
            rows = (total >= torch.topk(total, c).values[-1]).nonzero().flatten()
            order = rows[torch.sort(total[rows], descending=True, stable=True).indices].tolist()
            hits = self._walk(bank, order, total, per_layer, allowed, k, include_parts, with_layers)
            if len(hits) == k:
                return hits
        order = torch.sort(total, descending=True, stable=True).indices.tolist()
        return self._walk(bank, order, total, per_layer, allowed, k, include_parts, with_layers)

    def _walk(self, bank: MemoryBank, order: list[int], total: torch.Tensor, per_layer: torch.Tensor,
              allowed: torch.Tensor, k: int, include_parts: bool, with_layers: bool
              ) -> list[tuple[int, RetrievedDocument]]:
        """The first k allowed rows of `order`, one per parent unless parts are asked for."""
        records, seen, ok = bank.docstore, set(), allowed.cpu()
        rows: list[int] = []
        for row in order:
            if len(rows) == k:
                break
            if not ok[row]:
                continue
            key = records[row].id if include_parts else records[row].parent_id
            if key not in seen:
                seen.add(key)
                rows.append(row)
        cfg, scores = self.config.routing, total[rows]
        rel = relevance(scores, cfg.normalization, self.backbone.args.head_dim, cfg.relevance_calibration).tolist()
        layer_rows = per_layer[:, rows].T.tolist() if with_layers else [None] * len(rows)
        out: list[tuple[int, RetrievedDocument]] = []
        for row, score, r, layers in zip(rows, scores.tolist(), rel, layer_rows):
            rec = records[row]
            key, text = (rec.id, rec.text) if include_parts else (rec.parent_id, bank.text(rec.parent_id))
            layers = dict(zip(self.layers, layers)) if layers is not None else None
            out.append((row, RetrievedDocument(key, score, r, text, dict(rec.metadata), layers)))
        return out

    # ---- generation ---------------------------------------------------------------------

    def position_offset(self, k: int) -> int:
        """First RoPE position of a prompt that attends to k documents' memory (routing.position_offset)."""
        offset = self.config.routing.position_offset
        return k if offset == "top_k" else int(offset)

    def _sampling(self, **kw: Any) -> SamplingParams:
        return SamplingParams(**{k: v for k, v in kw.items() if v is not None})

    def stream_answer(self, question: str | Sequence[Message], bank: MemoryBank | None = None, *, mode: Mode = "latent",
                      k: int | None = None, filter: Filter = None, generator: Generator | None = None,
                      max_new_tokens: int = 128, temperature: float = 0.0, top_p: float = 1.0,
                      stop: Sequence[str] | None = None, seed: int | None = None, max_rounds: int = 4,
                      bidirectional_injection: bool = False, fusion: str | None = None,
                      alpha: float | None = None) -> AnswerStream:
        """Answer `question` (a string, or chat messages whose last user message routes) from `bank`,
        streaming text pieces.

        latent: routing layers attend to the pooled K/V of the top-k documents of each layer.
        hybrid: the top-k documents by routing score are put, as text, into the prompt of
        `generator` (default: this model's LM without memory; with its base weights where the router
        carries a backbone delta, which is trained for routing, not answering).
        interleave (reference profile): the model names documents, their texts are injected and it
        routes again, at most `max_rounds` times, then answers (spec §3); Answer.rounds lists the
        documents of each round. max_new_tokens bounds each generation segment; `stop` does not apply;
        bidirectional_injection=True feeds the re-prompt without a causal mask, as the reference does.
        fusion="bm25" (latent, hybrid): the documents are retrieve(fusion="bm25", alpha=alpha)'s top-k (fused_answers).
        """
        params = self._sampling(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                                stop=list(stop or []), seed=seed)
        k = self.config.routing.top_k if k is None else k
        if k <= 0:
            raise InvalidInputError(f"k must be >= 1, got {k}")
        alpha = answer_fusion(mode, fusion, alpha, self.config.routing)
        if mode == "latent":
            return self._latent(question, bank, k, filter, params, alpha)
        if mode == "hybrid":
            return self._hybrid(question, bank, k, filter, generator, params, alpha)
        if mode == "interleave":
            return self._interleave(question, bank, k, filter, params, max_rounds, bidirectional_injection)
        raise InvalidInputError(f"mode must be 'latent', 'hybrid' or 'interleave', got {mode!r}")

    def answer(self, question: str | Sequence[Message], bank: MemoryBank | None = None, **kw: Any) -> Answer:
        """`stream_answer` collected into one Answer (text, mode, doc_ids, scores)."""
        return self.stream_answer(question, bank, **kw).collect()

    def answer_batch(self, questions: Sequence[str | Sequence[Message]], bank: MemoryBank | None = None, *,
                     mode: Mode = "latent", k: int | None = None, filter: Filter = None, max_new_tokens: int = 128,
                     temperature: float = 0.0, top_p: float = 1.0, stop: Sequence[str] | None = None,
                     seed: int | None = None, fusion: str | None = None, alpha: float | None = None) -> list[Answer]:
        """Answers to several questions, generated as one batch (latent: each row routes on its own; hybrid:
        one batched retrieve, then the prompts with their documents). Equal to answering each alone; the
        reference profile and interleave answer one at a time."""
        params = self._sampling(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                                stop=list(stop or []), seed=seed)
        k = self.config.routing.top_k if k is None else k
        questions = [questions] if isinstance(questions, str) else list(questions)
        if not questions:
            return []
        if self.reference is not None or mode not in ("latent", "hybrid") or k <= 0:
            return [self.answer(q, bank, mode=mode, k=k, filter=filter, max_new_tokens=max_new_tokens,
                                temperature=temperature, top_p=top_p, stop=stop, seed=seed, fusion=fusion,
                                alpha=alpha) for q in questions]
        alpha = answer_fusion(mode, fusion, alpha, self.config.routing)
        if mode == "hybrid":
            if bank is None:
                raise InvalidInputError("hybrid mode needs a memory bank to retrieve from")
            texts = [last_user_text(q) for q in questions]
            hits = self.retrieve(texts, bank, k=k, filter=filter, **fusion_kwargs(alpha))
            prompts = [self._hybrid_prompt(q, t, h) for q, t, h in zip(questions, texts, hits)]
            out = generate_batch(self.generator, self.tokenizer, prompts, params, eos_ids=self.eos_ids,
                                 pad_id=self.tokenizer.pad_token_id or 0)
            return [Answer(text, "hybrid", [d.id for d in h], [d.score for d in h], reason,
                           fusion=fusion_record(alpha, h, self.config.routing))
                    for text, h, reason in zip(out.texts, hits, out.finish_reasons)]
        fused = fused_top_k(self, [last_user_text(q) for q in questions], bank, k, filter, alpha, self.config.routing)
        memory = self._memory_hook(bank, self._allowed(bank, filter, fused), k)
        out = generate_batch(self.backbone, self.tokenizer, [build_prompt(self.tokenizer, q) for q in questions],
                             params, memory=memory, position_offset=self.position_offset(k) if memory else 0,
                             pad_id=self.tokenizer.pad_token_id or 0, eos_ids=self.eos_ids)
        used = [self._used_documents(bank, out.router, row) for row in range(len(questions))]
        return [annotate(Answer(text, "latent", ids, scores, reason, layers), fused, row)
                for row, (text, reason, (ids, scores, layers)) in enumerate(zip(out.texts, out.finish_reasons, used))]

    def generate(self, message: str, bank: MemoryBank | None = None, **kw: Any) -> str:
        """Latent generation for a chat message; plain generation without a bank."""
        return self.answer(message, bank, mode="latent", **kw).text

    def _allowed(self, bank: MemoryBank | None, filter: Filter, fused: FusedTopK | None) -> torch.Tensor | None:
        """The rows a latent answer routes among (None without documents): the filter's, or each row's fused top-k."""
        if bank is None or not len(bank):
            return None
        self.check_bank(bank)
        return bank.row_mask(filter) if fused is None else fused.allowed()

    def _memory_hook(self, bank: MemoryBank, allowed: torch.Tensor | None, k: int) -> HookFactory | None:
        """The memory hook factory of a latent answer over `bank` (None without documents: plain generation)."""
        if allowed is None:
            return None

        def memory(routing: torch.Tensor, positions: torch.Tensor) -> MemoryRouter:
            return MemoryRouter(bank, self.router, self.config.routing, routing, allowed=allowed, top_k=k,
                                positions=positions)

        return memory

    def _latent(self, question: str | Sequence[Message], bank: MemoryBank | None, k: int, filter: Filter,
                params: SamplingParams, alpha: float | None = None) -> AnswerStream:
        fused = fused_top_k(self, [last_user_text(question)], bank, k, filter, alpha, self.config.routing)
        allowed = self._allowed(bank, filter, fused)
        if self.reference is not None:
            gen = self.reference.latent(last_user_text(question), bank, k, allowed, params)[0]
        else:
            memory = self._memory_hook(bank, allowed, k)
            prompt = build_prompt(self.tokenizer, question)
            gen = Generation(self.backbone, self.tokenizer, prompt, params, memory=memory,
                             position_offset=self.position_offset(k) if memory else 0, eos_ids=self.eos_ids)

        def finish(text: str) -> Answer:
            ids, scores, per_layer = self._used_documents(bank, gen.router)
            return annotate(Answer(text, "latent", ids, scores, gen.finish_reason, per_layer), fused, 0)

        return AnswerStream(iter(gen), finish)

    def _interleave(self, question: str | Sequence[Message], bank: MemoryBank | None, k: int, filter: Filter,
                    params: SamplingParams, max_rounds: int, bidirectional: bool) -> AnswerStream:
        from .inference.interleave import InterleaveMachine, ModelBackend, run_interleave

        if self.reference is None:
            raise InvalidInputError("mode='interleave' is the released MSA model's protocol and needs the reference "
                                    "profile: load the model with profile='reference' (the default for MSA-format "
                                    "checkpoints)")
        if bank is None or len(bank) == 0:
            raise InvalidInputError("mode='interleave' needs a memory bank with documents")
        self.check_bank(bank)
        allowed = bank.row_mask(filter)
        numbers = self.reference.documents_by_index(bank, allowed)
        texts = {d["id"]: d["text"] for d in bank.get(list(dict.fromkeys(numbers.values())))}
        text = last_user_text(question)
        machine = InterleaveMachine(text, {i: texts[pid] for i, pid in numbers.items()}, max_rounds=max_rounds,
                                    bidirectional_injection=bidirectional)
        backend = ModelBackend(self, bank, k, params, allowed)
        pieces = run_interleave(machine, backend, params.max_new_tokens)

        def finish(_: str) -> Answer:
            rounds = [[numbers[i] for i in r] for r in machine.rounds]
            named: dict[str, float] = {}
            for r, docs in enumerate(rounds):  # scored by the routing that preceded the naming
                totals = self._parent_totals(bank, backend.routings[r])
                for pid in docs:
                    named.setdefault(pid, totals.get(pid, 0.0))
            first = self._used_documents(bank, backend.prefills[0].hook)[2] if backend.prefills else {}
            return Answer(machine.answer or "", "interleave", list(named), list(named.values()),
                          machine.finish_reason, first,
                          rounds=rounds, transcript=machine.transcript)

        return AnswerStream(pieces, finish)

    def _parent_totals(self, bank: MemoryBank, routings: dict) -> dict[str, float]:
        """Aggregated routing score of every parent (its best part) in one prefill."""
        if not routings:
            return {}
        stacked = torch.stack([routings[layer].doc_scores[0] for layer in self.layers]).unsqueeze(1)
        total = aggregate_layers(stacked, self.config.routing.layer_aggregate)[0]
        out: dict[str, float] = {}
        for row, rec in enumerate(bank.docstore):
            out[rec.parent_id] = max(out.get(rec.parent_id, float("-inf")), float(total[row]))
        return out

    def _used_documents(self, bank: MemoryBank | None, router: MemoryRouter | None, row: int = 0):
        """Parents attended to in any routing layer (by batch row `row`), ranked by aggregated routing score."""
        if bank is None or router is None or not router.routings:
            return [], [], {}
        docstore = bank.docstore
        chosen = torch.stack([rt.selected[row] for rt in router.routings.values()])  # [L, k]
        per_layer = {layer: list(dict.fromkeys(docstore[r].parent_id for r in rows))
                     for layer, rows in zip(router.routings, chosen.tolist())}
        stacked = torch.stack([router.routings[layer].doc_scores[row] for layer in self.layers]).unsqueeze(1)
        total = aggregate_layers(stacked, self.config.routing.layer_aggregate)[0]
        best: dict[str, float] = {}  # (a few reads from the device, not one per row)
        for r, score in zip(chosen.flatten().tolist(), total[chosen.flatten()].tolist()):
            pid = docstore[r].parent_id
            best[pid] = max(best.get(pid, float("-inf")), score)
        ranked = sorted(best.items(), key=lambda kv: -kv[1])
        return [p for p, _ in ranked], [s for _, s in ranked], per_layer

    def _hybrid(self, question: str | Sequence[Message], bank: MemoryBank | None, k: int, filter: Filter,
                generator: Generator | None, params: SamplingParams, alpha: float | None = None) -> AnswerStream:
        if bank is None:
            raise InvalidInputError("hybrid mode needs a memory bank to retrieve from")
        text = last_user_text(question)
        hits = self.retrieve(text, bank, k=k, filter=filter, **fusion_kwargs(alpha))
        gen: Generation | None = None
        if generator is None:
            gen = Generation(self.generator, self.tokenizer, self._hybrid_prompt(question, text, hits), params,
                             eos_ids=self.eos_ids)
            pieces: Iterator[str] = iter(gen)
        else:
            out = generator(hybrid_text(text, [h.text for h in hits]))
            pieces = iter([out]) if isinstance(out, str) else iter(out)

        def finish(text: str) -> Answer:
            reason = gen.finish_reason if gen is not None else None
            return Answer(text, "hybrid", [h.id for h in hits], [h.score for h in hits], reason,
                          fusion=fusion_record(alpha, hits, self.config.routing))

        return AnswerStream(pieces, finish)

    def _hybrid_prompt(self, question: str | Sequence[Message], text: str, hits: list[RetrievedDocument]) -> Prompt:
        """The generator's prompt of a hybrid answer: the question's conversation, its last user message
        replaced by the instruction with the documents' texts."""
        prompt_text = hybrid_text(text, [h.text for h in hits])
        conversation = prompt_text if isinstance(question, str) else with_last_user(question, prompt_text)
        return build_prompt(self.tokenizer, conversation)
