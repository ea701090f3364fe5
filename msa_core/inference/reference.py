"""The `reference` profile: inference as the released MSA code runs it (spec §2-3), minus its bugs.

What changes against our default profile:
- documents are rendered `<|im_start|>[i]. TEXT[i]<|im_end|>` with a stable integer i per document
  (stored in the document's metadata under `msa_doc_index`), then encoded alone from position 0;
- the user-template head `<|im_start|>user\\n` is encoded once (positions 0..T-1, attending only to
  itself, so its K/V never depend on the documents) and placed in front of the keys of EVERY layer;
  routing layers add the chunks of their top-k documents after it, in ascending document index;
- the question is wrapped in the reference instruction; the whole wrapper (the doc_id 0 span of spec
  §3.1) routes, and the prompt starts at position T + k;
- without a memory bank the prompt is the template head followed by the question (positions from T).
Every intentional difference from the reference code is listed in docs/reference-profile.md.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..decoder.backbone import Memory
from ..errors import InvalidInputError
from ..memory.bank import MemoryBank
from .encode import DocumentPart
from .generate import Generation, Prefilled, Prompt, SamplingParams, routed_prefill
from .memory_router import MemoryRouter
from .protocols import ModelLike

TEMPLATE_HEAD = "<|im_start|>user\n"
INSTRUCTION_HEAD = "\nPlease answer the question based on the above historical document information\n\n"
INSTRUCTION_TAIL = "\nPlease return all documents related to the question\n"
PROMPT_TAIL = "<|im_end|>\n<|im_start|>"  # the reference stops after <|im_start|>: no "assistant\n"
DOC_PREFIX = "<|im_start|>[{index}]. "
DOC_INDEX_KEY = "msa_doc_index"  # metadata key of the `[i]` a document is rendered and cited with


def render_document(index: int, text: str) -> str:
    """Spec §2.1, literally: the id is written again right after the text."""
    return f"{DOC_PREFIX.format(index=index)}{text}[{index}]<|im_end|>"


def instruction(question: str) -> str:
    """The routing span of the first call (doc_id 0, spec §3.1)."""
    return INSTRUCTION_HEAD + question + INSTRUCTION_TAIL


@dataclass(frozen=True)
class Segment:
    """A piece of the query-side text. kind: instruction (routes), injection (routes when it is the
    latest one: spec §3.3), context (never routes)."""

    text: str
    kind: str = "context"


def question_segments(question: str) -> list[Segment]:
    return [Segment(instruction(question), "instruction"), Segment(PROMPT_TAIL, "context")]


@dataclass
class TemplateKV:
    """Post-RoPE K/V of the template head for every layer: k[layer], v[layer] are [kv_heads, T, D]."""

    ids: list[int]
    k: list[torch.Tensor]
    v: list[torch.Tensor]


class ReferenceMemoryRouter(MemoryRouter):
    """Memory hook of the reference profile: the template head in every layer, plus, in routing
    layers, every chunk of the per-layer top-k documents (ascending document index, spec §2.4)."""

    def __init__(self, bank: MemoryBank | None, router: Any, cfg: Any, routing_mask: torch.Tensor, *,
                 template: TemplateKV, doc_order: torch.Tensor | None = None, allowed: torch.Tensor | None = None,
                 top_k: int | None = None, positions: torch.Tensor | None = None) -> None:
        if bank is not None:
            super().__init__(bank, router, cfg, routing_mask, allowed=allowed, top_k=top_k, positions=positions)
        else:  # no memory: the template head alone
            self.bank, self.router, self.cfg, self.routing_mask = None, router, cfg, routing_mask
            self.allowed, self.top_k, self.attend, self.positions = allowed, top_k or cfg.top_k, True, positions
            self.layer_pos, self.routings = {}, {}
        self.template = template
        self.doc_order = doc_order

    def __call__(self, layer: int, x: torch.Tensor) -> Memory | None:
        chunks = super().__call__(layer, x) if self.bank is not None else None
        b = x.shape[0]
        tk = self.template.k[layer].to(x.device, x.dtype).unsqueeze(0).expand(b, -1, -1, -1)
        tv = self.template.v[layer].to(x.device, x.dtype).unsqueeze(0).expand(b, -1, -1, -1)
        tvalid = torch.ones(b, tk.shape[2], dtype=torch.bool, device=x.device)
        if chunks is None:
            return Memory(tk, tv, tvalid)
        return Memory(torch.cat([tk, chunks.k], 2), torch.cat([tv, chunks.v], 2), torch.cat([tvalid, chunks.valid], 1))

    def _gather(self, li: int, rows: torch.Tensor, device: torch.device, dtype: torch.dtype) -> Memory:
        if self.doc_order is not None:  # ascending document index, then part order (= row order)
            by_row = rows.sort(dim=1).values
            key = self.doc_order.to(by_row.device)[by_row]
            rows = by_row.gather(1, torch.sort(key, dim=1, stable=True).indices)
        return super()._gather(li, rows, device, dtype)


class ReferenceProfile:
    """The reference's prompts, rendering and memory layout for one model (an MSAModel)."""

    def __init__(self, model: ModelLike) -> None:
        self.model = model
        self.head_ids: list[int] = list(model.tokenizer(TEMPLATE_HEAD, add_special_tokens=False)["input_ids"])
        if not self.head_ids:
            raise InvalidInputError("the tokenizer turns the template head into no tokens")
        self._template: TemplateKV | None = None
        self._template_key: tuple | None = None

    # ---- template head ----------------------------------------------------------------------

    @property
    def template_length(self) -> int:
        """T: 3 with Qwen's tokenizer; computed with this model's tokenizer."""
        return len(self.head_ids)

    @torch.no_grad()
    def template(self) -> TemplateKV:
        """The template head's K/V in every layer, computed once per device and dtype."""
        bb = self.model.backbone
        key = (bb.device, bb.dtype)
        if self._template is None or self._template_key != key:
            t = len(self.head_ids)
            ids = torch.tensor([self.head_ids], device=bb.device)
            ks: dict[int, torch.Tensor] = {}
            vs: dict[int, torch.Tensor] = {}

            def capture(layer: int, x: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
                ks[layer], vs[layer] = k[0].clone(), v[0].clone()

            bb(ids, torch.arange(t, device=bb.device)[None], capture=capture)
            n = bb.args.num_layers
            self._template = TemplateKV(list(self.head_ids), [ks[i] for i in range(n)], [vs[i] for i in range(n)])
            self._template_key = key
        return self._template

    def position_offset(self, k: int, with_memory: bool = True) -> int:
        """First position of the prompt: T + k with memory (spec §2.4), T without."""
        return self.template_length + (k if with_memory else 0)

    # ---- prompts ------------------------------------------------------------------------------

    def encode_segments(self, segments: Sequence[Segment]) -> Prompt:
        """Token ids and routing mask of query-side segments. Each segment is tokenized on its own
        (the reference finds its spans by tokenizing prefixes; boundaries are special tokens, so the
        ids agree). Routing: the instruction and the latest injection."""
        last_injection = max((i for i, s in enumerate(segments) if s.kind == "injection"), default=-1)
        ids: list[int] = []
        routing: list[bool] = []
        for i, seg in enumerate(segments):
            if not seg.text:
                continue
            toks = self.model.tokenizer(seg.text, add_special_tokens=False)["input_ids"]
            routes = seg.kind == "instruction" or (seg.kind == "injection" and i == last_injection)
            ids += toks
            routing += [routes] * len(toks)
        return Prompt(ids, routing)

    def question_prompt(self, question: str) -> Prompt:
        if not isinstance(question, str) or not question.strip():
            raise InvalidInputError("the question is empty; pass some text")
        return self.encode_segments(question_segments(question))

    def prompt_text(self, segments: Sequence[Segment]) -> str:
        """The exact text the model reads: template head + segments."""
        return TEMPLATE_HEAD + "".join(s.text for s in segments)

    # ---- documents ----------------------------------------------------------------------------

    def document_indices(self, bank: MemoryBank, ids: Sequence[str],
                         metadatas: Sequence[dict[str, Any]]) -> list[int]:
        """Stable `[i]` per document: a replaced document keeps its number, a new one takes the next
        free one (0, 1, 2 ... in file order for a fresh bank); a number given in the metadata is used."""
        existing: dict[str, int] = {}
        for rec in bank.docstore:
            value = rec.metadata.get(DOC_INDEX_KEY)
            if rec.part_index == 0 and _is_index(value):
                existing[rec.parent_id] = value
        owner = {v: pid for pid, v in existing.items()}
        nxt = max(owner, default=-1) + 1  # always above every number in use
        out: list[int] = []
        for doc_id, meta in zip(ids, metadatas):
            given = meta.get(DOC_INDEX_KEY)
            if given is not None and not _is_index(given):
                raise InvalidInputError(f"metadata[{DOC_INDEX_KEY!r}] of {doc_id!r} must be an integer >= 0, "
                                        f"got {given!r}")
            idx = given if given is not None else existing.get(doc_id, nxt)
            holder = owner.get(idx)
            if holder is not None and holder != doc_id:
                raise InvalidInputError(f"document number {idx} of {doc_id!r} already belongs to {holder!r}; "
                                        f"delete {holder!r} first or pick another {DOC_INDEX_KEY}")
            out.append(idx)
            owner[idx] = doc_id
            nxt = max(nxt, idx + 1)
        return out

    def document_parts(self, bank: MemoryBank, texts: Sequence[str], ids: Sequence[str],
                       metadatas: Sequence[dict[str, Any]], max_doc_tokens: int) -> list[DocumentPart]:
        """Render, number and tokenize documents. A document longer than max_doc_tokens (the
        reference never splits; our default limit is the model's context) becomes parts of the
        rendered tokens whose texts are slices of the original text."""
        tok = self.model.tokenizer
        parts: list[DocumentPart] = []
        for text, doc_id, meta, idx in zip(texts, ids, metadatas, self.document_indices(bank, ids, metadatas)):
            meta = {**meta, DOC_INDEX_KEY: idx}
            rendered = render_document(idx, text)
            lead = len(DOC_PREFIX.format(index=idx))  # characters before the original text
            enc = tok(rendered, add_special_tokens=False, return_offsets_mapping=True)
            tokens, offsets = list(enc["input_ids"]), enc["offset_mapping"]
            if len(tokens) <= max_doc_tokens:
                parts.append(DocumentPart(doc_id, doc_id, 0, text, tokens, meta))
                continue

            def original(char: int) -> int:
                return min(max(char - lead, 0), len(text))

            for n, start in enumerate(range(0, len(tokens), max_doc_tokens)):
                end = min(start + max_doc_tokens, len(tokens))
                a = original(offsets[start][0]) if n else 0
                b = original(offsets[end][0]) if end < len(tokens) else len(text)
                parts.append(DocumentPart(f"{doc_id}#{n}", doc_id, n, text[a:b], tokens[start:end], meta))
        return parts

    @staticmethod
    def doc_order(bank: MemoryBank) -> torch.Tensor:
        """[N] document number of each part row (the row itself when a record has none)."""
        return torch.tensor([rec.metadata.get(DOC_INDEX_KEY, row) if _is_index(rec.metadata.get(DOC_INDEX_KEY))
                             else row for row, rec in enumerate(bank.docstore)], dtype=torch.long)

    @staticmethod
    def documents_by_index(bank: MemoryBank, allowed: torch.Tensor | None = None) -> dict[int, str]:
        """{document number: parent id} of the (allowed) documents."""
        out: dict[int, str] = {}
        for row, rec in enumerate(bank.docstore):
            idx = rec.metadata.get(DOC_INDEX_KEY)
            if _is_index(idx) and (allowed is None or bool(allowed[row])):
                out.setdefault(idx, rec.parent_id)
        return out

    # ---- routing and prefill ------------------------------------------------------------------

    def hook(self, bank: MemoryBank | None, routing: torch.Tensor, positions: torch.Tensor | None,
             allowed: torch.Tensor | None, k: int) -> ReferenceMemoryRouter:
        use = bank is not None and len(bank) > 0
        m = self.model
        return ReferenceMemoryRouter(bank if use else None, m.router, m.config.routing, routing,
                                     template=self.template(), doc_order=self.doc_order(bank) if use else None,
                                     allowed=allowed, top_k=k, positions=positions)

    def route_scores(self, questions: Sequence[str], bank: MemoryBank, allowed: torch.Tensor) -> torch.Tensor:
        """[L, B, N] document scores per routing layer (the routing of a full reference prefill)."""
        m = self.model
        k = m.config.routing.top_k
        state = routed_prefill(m.backbone, [self.question_prompt(q) for q in questions],
                               offset=self.position_offset(k), pad_id=m.tokenizer.pad_token_id or 0,
                               hook=lambda routing, pos: self.hook(bank, routing, pos, allowed, k),
                               score_only=True, last_layer=max(m.layers))
        return torch.stack([state.hook.routings[layer].doc_scores for layer in m.layers]).cpu()

    def prefill(self, prompt: Prompt, bank: MemoryBank | None, k: int, allowed: torch.Tensor | None = None,
                extra_capacity: int = 256) -> Prefilled:
        """One reference prefill (routing included) of a single prompt."""
        m = self.model
        use = bank is not None and len(bank) > 0
        return routed_prefill(m.backbone, [prompt], offset=self.position_offset(k, use),
                              pad_id=m.tokenizer.pad_token_id or 0, extra_capacity=extra_capacity,
                              hook=lambda routing, pos: self.hook(bank, routing, pos, allowed, k))

    # ---- latent answer ------------------------------------------------------------------------

    def latent(self, question: str, bank: MemoryBank | None, k: int, allowed: torch.Tensor | None,
               params: SamplingParams) -> tuple[Generation, Prompt]:
        """A streaming Generation of the reference's first call (no interleave)."""
        m = self.model
        prompt = self.question_prompt(question)
        use = bank is not None and len(bank) > 0

        def memory(routing: torch.Tensor, positions: torch.Tensor) -> ReferenceMemoryRouter:
            return self.hook(bank if use else None, routing, positions, allowed, k)

        gen = Generation(m.backbone, m.tokenizer, prompt, params, memory=memory,
                         position_offset=self.position_offset(k, use), eos_ids=m.eos_ids)
        return gen, prompt


def _is_index(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def check_documents_map(documents: Mapping[int, str]) -> dict[int, str]:
    out = {}
    for k, v in documents.items():
        if not _is_index(k) or not isinstance(v, str):
            raise InvalidInputError(f"documents must map numbers >= 0 to texts, got {k!r}: {type(v).__name__}")
        out[k] = v
    return out
