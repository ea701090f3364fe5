"""Stage 2 and 3: route the question's prefill to memory, then decode with a KV cache.

In a routing layer the question's normed hidden states become routing queries; the bank's pooled
routing keys are scored (paper Eq. 2), each row keeps its top-k documents *for this layer*, and their
pooled K/V are placed in front of the question's own keys (memory_router.py; on a GPU the whole prefill
replays from a CUDA graph, captured.py). Lower layers see local context only.
Routing happens once, in the prefill; decode steps reuse the caches.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ..decoder.backbone import Backbone
from ..errors import InvalidInputError, check_text
from .captured import capturable, captured_prefill
from .engine import Engine, Session
from .memory_router import LayerRouting, MemoryRouter  # noqa: F401  (LayerRouting: re-exported for callers)

_QUESTION_SLOT = "\u2063MSA_QUESTION\u2063"  # an invisible marker no real question contains


@dataclass
class Prompt:
    """Token ids of one prompt and which of them are routing tokens (the question itself)."""

    ids: list[int]
    routing: list[bool]


Message = dict  # {"role": "system" | "user" | "assistant", "content": str}


def last_user_text(question: "str | Sequence[Message]") -> str:
    """The text that routes: the question, or the last user message of a conversation."""
    if isinstance(question, str):
        return question
    users = [m.get("content", "") for m in question if m.get("role") == "user"]
    if not users:
        raise InvalidInputError("the conversation has no user message to answer")
    return users[-1]


HYBRID_INSTRUCTION = (
    "Answer the question using only the documents below. Answer briefly.\n\n{documents}\n\nQuestion: {question}"
)


def hybrid_text(question: str, documents: Sequence[str]) -> str:
    """The instruction of a hybrid answer: the documents' texts, numbered, then the question."""
    listed = "\n\n".join(f"Document [{i + 1}]: {t}" for i, t in enumerate(documents))
    return HYBRID_INSTRUCTION.format(documents=listed, question=question)


def with_last_user(messages: Sequence[Message], content: str) -> list[Message]:
    """A copy of the conversation whose last user message says `content` instead."""
    out = [dict(m) for m in messages]
    last = max(i for i, m in enumerate(out) if m.get("role") == "user")
    out[last]["content"] = content
    return out


def build_prompt(tokenizer: Any, question: "str | Sequence[Message]", *, chat: bool = True,
                 system: str | None = None) -> Prompt:
    """Wrap a question (or a conversation) in the backbone's chat template; only the question's
    tokens (the last user message) route.

    The template's own text (system prompt, role tags) would otherwise dominate the max over query
    tokens (spec §6.7), so we tokenize the three spans separately and mark the middle one.
    """
    text = last_user_text(question)
    if not isinstance(text, str) or not text.strip():
        raise InvalidInputError("the question is empty; pass some text")
    check_text(text, "the question")
    template = chat and getattr(tokenizer, "chat_template", None)
    if template and isinstance(question, str):  # the same head and tail for every question: rendered once
        head, tail = _cached_ends(tokenizer, template, system)
    else:
        head, tail = _ends(tokenizer, question, system, template)
    body = _tokens(tokenizer, text)
    return Prompt(head + body + tail, [False] * len(head) + [True] * len(body) + [False] * len(tail))


def _tokens(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"]) if text else []


def _ends(tokenizer: Any, question: str | Sequence[Message], system: str | None,
          template: Any) -> tuple[list[int], list[int]]:
    """Token ids before and after the routing text: the chat template's, else "role: content" lines of the
    earlier turns of a conversation."""
    prefix, suffix = "", ""
    if template:
        rendered = tokenizer.apply_chat_template(_with_slot(question, system), tokenize=False,
                                                 add_generation_prompt=True)
        prefix, _, suffix = rendered.partition(_QUESTION_SLOT)
    elif not isinstance(question, str):
        prefix = "".join(f"{m['role']}: {m['content']}\n" for m in question[:-1]) if len(question) > 1 else ""
    return _tokens(tokenizer, prefix), _tokens(tokenizer, suffix)


# tokenizer -> {(template, system, vocabulary size): (head ids, tail ids)}: rendering a chat template costs about as
# much as the rest of a CPU question's routing outside the model (jinja, then two tokenizer calls)
_TEMPLATE_ENDS: weakref.WeakKeyDictionary[Any, dict] = weakref.WeakKeyDictionary()


def _cached_ends(tokenizer: Any, template: str, system: str | None) -> tuple[list[int], list[int]]:
    """`_ends` of a single user question, rendered once per (template, system prompt, vocabulary size)."""
    try:
        cache = _TEMPLATE_ENDS.setdefault(tokenizer, {})
    except TypeError:  # a tokenizer that cannot be weakly referenced or hashed: no cache
        cache = {}
    key = (template, system, len(tokenizer))  # (tokens added to the vocabulary may tokenize the ends anew)
    if key not in cache:
        cache[key] = _ends(tokenizer, _QUESTION_SLOT, system, template)
    head, tail = cache[key]
    return list(head), list(tail)


def _with_slot(question: "str | Sequence[Message]", system: str | None) -> list[Message]:
    """The conversation with the last user message replaced by a marker we can find again."""
    if isinstance(question, str):
        return ([{"role": "system", "content": system}] if system else []) + [
            {"role": "user", "content": _QUESTION_SLOT}]
    messages = [dict(m) for m in question]
    last = max(i for i, m in enumerate(messages) if m.get("role") == "user")
    messages[last]["content"] = _QUESTION_SLOT
    if system and not any(m.get("role") == "system" for m in messages):
        messages.insert(0, {"role": "system", "content": system})
    return messages


def left_pad(prompts: Sequence[Prompt], pad_id: int, device: torch.device):
    """Batch prompts with left padding: ids, valid, routing mask [B, T]."""
    t = max(len(p.ids) for p in prompts)
    ids = torch.full((len(prompts), t), pad_id, dtype=torch.long)
    valid = torch.zeros(len(prompts), t, dtype=torch.bool)
    routing = torch.zeros_like(valid)
    for row, p in enumerate(prompts):
        n = len(p.ids)
        ids[row, t - n:] = torch.tensor(p.ids, dtype=torch.long)
        valid[row, t - n:] = True
        routing[row, t - n:] = torch.tensor(p.routing)
    return ids.to(device), valid.to(device), routing.to(device)


def query_positions(valid: torch.Tensor, offset: int) -> torch.Tensor:
    """RoPE positions of left-padded prompts: offset, offset+1, ... over real tokens."""
    return offset + (valid.long().cumsum(1) - 1).clamp(min=0)


# (routing mask [B, T], positions [B, T]) -> the memory hook of one prefill, or None for local context only
HookFactory = Callable[[torch.Tensor, torch.Tensor], "MemoryRouter | None"]


def engine_for(backbone: Backbone) -> Engine:
    """The backbone's inference engine (made once; it pools caches and decode graphs)."""
    engine = getattr(backbone, "msa_engine", None)
    if engine is None or engine.backbone is not backbone:  # (a shallow copy of a backbone shares the attribute)
        engine = Engine(backbone)
        object.__setattr__(backbone, "msa_engine", engine)  # a plain attribute, not a submodule
    backbone.packs.refresh(backbone)  # GPU packs current before graphs replay them (decoder/packed.py)
    return engine


@dataclass
class Prefilled:
    """What a routed prefill leaves: last-position logits and the engine session to decode from (None when
    it only scored), the memory hook with every routing layer's decision, and the prompt's positions."""

    logits: torch.Tensor | None  # [B, V]
    session: Session | None
    hook: MemoryRouter | None
    positions: torch.Tensor  # [B, T]

    @property
    def next_position(self) -> int:
        """The position of the first token after the prompt (batch of one)."""
        return int(self.positions[0, -1]) + 1


@torch.no_grad()
def routed_prefill(backbone: Backbone, prompts: Sequence[Prompt], *, offset: int, hook: HookFactory | None = None,
                   pad_id: int = 0, extra_capacity: int = 0, score_only: bool = False,
                   last_layer: int | None = None) -> Prefilled:
    """The one routed prefill every path runs (generation, retrieval, the reference profile, interleave, the
    debug trace, Memory Parallel): left-pad the prompts, number them from `offset`, build the memory hook
    and run the backbone; the hook routes each routing layer and splices in the chosen documents' K/V.

    score_only: no caches and no logits, stop after `last_layer`, then let the hook score any layers it
    deferred (`MemoryRouter.finish`); for retrieval. Otherwise the engine's static caches hold the prompt
    plus `extra_capacity` more tokens.
    """
    ids, valid, routing = left_pad(prompts, pad_id, backbone.device)
    positions = query_positions(valid, offset)
    memory = hook(routing, positions) if hook is not None else None
    if isinstance(memory, MemoryRouter):
        memory.trust_prompts(prompts)
    if score_only:
        backbone(ids, positions, valid=valid, memory_hook=memory, last_layer=last_layer, hooks_only_in_last=True)
        if memory is not None:
            memory.finish()
        return Prefilled(None, None, memory, positions)
    engine = engine_for(backbone)
    if memory is not None and capturable(engine, memory):
        done = captured_prefill(engine, memory, ids, positions, valid, routing, extra_capacity)
        if done is not None:
            return Prefilled(*done, memory, positions)
    logits, session = engine.prefill(ids, positions, valid, memory_hook=memory, extra_tokens=extra_capacity)
    return Prefilled(logits, session, memory, positions)


@torch.no_grad()
def route_questions(backbone: Backbone, prompts: Sequence[Prompt], hook: MemoryRouter, *, offset: int,
                    pad_id: int = 0) -> MemoryRouter:
    """Retrieval's routing on the question's own states: the engine's query forward (a CUDA graph per
    length bucket on a GPU) gives every routing layer's queries, then the hook scores them all at once.
    Without graphs it runs over the question tokens only, behind the template head's cached K/V."""
    engine, head = engine_for(backbone), None
    hook.trust_prompts(prompts)
    forward = engine.query_forward(hook.router, list(hook.layer_pos))
    if not engine.use_graphs:  # a captured graph replays whole prompts; eager, the head comes from a cache
        prompts, offset, head = engine.question_heads.split(backbone, prompts, offset, forward.layers[-1])
    ids, valid, routing = left_pad(prompts, pad_id, backbone.device)
    positions = query_positions(valid, offset)
    queries = forward(ids, positions, valid, head)
    pad = next(iter(queries.values())).shape[1] - routing.shape[1]
    hook.routing_mask = torch.nn.functional.pad(routing, (pad, 0))
    hook.score_queries(queries, backbone.dtype)
    return hook


def extend(backbone: Backbone, session: Session, token_ids: Sequence[int], causal: bool = True) -> torch.Tensor:
    """Feed a segment of tokens after a prefill (e.g. an interleave injection); returns the last position's
    logits [1, V]. Routing layers keep attending to the memory in the session's caches."""
    ids = torch.tensor([list(token_ids)], device=backbone.device)
    return engine_for(backbone).extend(session, ids, causal)


class HostToken:
    """A token id [B] on its way to the host: the copy is queued behind the step that made it, so the host
    reads it while the device already runs the next step (one step behind, never a full sync)."""

    def __init__(self, token: torch.Tensor) -> None:
        if token.is_cuda:
            self.host = torch.empty(token.shape, dtype=token.dtype, pin_memory=True)
            self.host.copy_(token, non_blocking=True)
            self.ready = torch.cuda.Event()
            self.ready.record()
        else:
            self.host, self.ready = token, None

    def get(self) -> list[int]:
        if self.ready is not None:
            self.ready.synchronize()
        return self.host.tolist()


def sample_next(logits: torch.Tensor, temperature: float, top_p: float,
                generator: torch.Generator | None) -> torch.Tensor:
    """Greedy for temperature 0, else nucleus sampling. logits [B, V] -> token ids [B]."""
    if temperature <= 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_p, order = probs.sort(-1, descending=True)
        keep = sorted_p.cumsum(-1) - sorted_p < top_p  # always keeps the most likely token
        sorted_p = sorted_p * keep
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_p)
    return torch.multinomial(probs / probs.sum(-1, keepdim=True), 1, generator=generator).squeeze(-1)


@dataclass
class SamplingParams:
    max_new_tokens: int = 128
    temperature: float = 0.0
    top_p: float = 1.0
    stop: list[str] = field(default_factory=list)
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise InvalidInputError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise InvalidInputError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise InvalidInputError(f"top_p must be in (0, 1], got {self.top_p}")
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        if any(not s for s in self.stop):
            raise InvalidInputError("stop strings must not be empty")


class TextStream:
    """Turns generated token ids into text pieces, honouring stop strings.

    Text is re-decoded from all tokens each step (tokenizers merge bytes across tokens); a piece is
    held back while it ends in an incomplete character or could be the start of a stop string.
    """

    def __init__(self, tokenizer: Any, stop: Sequence[str]) -> None:
        self.tokenizer, self.stop = tokenizer, list(stop)
        self.tokens: list[int] = []
        self.emitted = 0
        self.text = ""
        self.stopped = False

    def push(self, token: int) -> str:
        self.tokens.append(token)
        text = self.tokenizer.decode(self.tokens, skip_special_tokens=True)
        for s in self.stop:
            at = text.find(s)
            if at != -1:
                text, self.stopped = text[:at], True
        self.text = text
        if self.stopped:
            return self._emit(len(text))
        if text.endswith("\ufffd"):
            return ""
        return self._emit(len(text) - self._held_back(text))

    def flush(self) -> str:
        return self._emit(len(self.text))

    def _held_back(self, text: str) -> int:
        longest = 0
        for s in self.stop:
            for n in range(min(len(s) - 1, len(text)), 0, -1):
                if text.endswith(s[:n]):
                    longest = max(longest, n)
                    break
        return longest

    def _emit(self, upto: int) -> str:
        piece = self.text[self.emitted:upto] if upto > self.emitted else ""
        self.emitted = max(self.emitted, upto)
        return piece


class Generation:
    """One streaming generation: iterate for text pieces; afterwards read text and routing.

    `routed_prefill` of the prompt at positions offset.. (routed to memory in routing layers when a hook
    factory is given), then one token per step with the caches (`extend`).
    """

    def __init__(self, backbone: Backbone, tokenizer: Any, prompt: Prompt, params: SamplingParams, *,
                 memory: HookFactory | None = None, position_offset: int = 0,
                 eos_ids: Sequence[int] = ()) -> None:
        self.backbone, self.tokenizer, self.prompt, self.params = backbone, tokenizer, prompt, params
        self.memory_factory, self.offset = memory, position_offset
        self.eos_ids = set(eos_ids)
        self.router: MemoryRouter | None = None
        self.stream = TextStream(tokenizer, params.stop)
        self.finish_reason: str | None = None

    @property
    def text(self) -> str:
        return self.stream.text

    @property
    def token_ids(self) -> list[int]:
        return list(self.stream.tokens)

    def __iter__(self) -> Iterator[str]:
        with torch.no_grad():
            yield from self._run()

    def _run(self) -> Iterator[str]:
        p = self.params
        state = routed_prefill(self.backbone, [self.prompt], offset=self.offset, hook=self.memory_factory,
                               extra_capacity=p.max_new_tokens + 64)
        self.router, session = state.hook, state.session
        engine = engine_for(self.backbone)
        dev = state.logits.device
        gen = torch.Generator(device=dev).manual_seed(p.seed) if p.seed is not None else None
        token = sample_next(state.logits, p.temperature, p.top_p, gen)
        pending = HostToken(token)
        for step in range(p.max_new_tokens):
            queued = None
            if step < p.max_new_tokens - 1:  # queue the next step before reading this token
                token = sample_next(engine.decode_one_token(session, token), p.temperature, p.top_p, gen)
                queued = HostToken(token)
            tid = pending.get()[0]
            if tid in self.eos_ids:
                self.finish_reason = "eos"
                break
            piece = self.stream.push(tid)
            if piece:
                yield piece
            if self.stream.stopped:
                self.finish_reason = "stop"
                return
            pending = queued
        self.finish_reason = self.finish_reason or "length"
        tail = self.stream.flush()
        if tail:
            yield tail


@dataclass
class BatchResult:
    """What `generate_batch` leaves: per row the text, token ids and finish reason; the memory hook with each
    row's routing (row r of every LayerRouting)."""

    texts: list[str]
    token_ids: list[list[int]]
    finish_reasons: list[str]
    router: MemoryRouter | None


def generate_batch(backbone: Backbone, tokenizer: Any, prompts: Sequence[Prompt], params: SamplingParams, *,
                   memory: HookFactory | None = None, position_offset: int = 0, pad_id: int = 0,
                   eos_ids: Sequence[int] = ()) -> BatchResult:
    """Answer several prompts in one batch: one routed prefill (each row routes on its own), then one decode
    step per token for all rows. A row that ends (eos, a stop string) is left alone while the others go on;
    the loop ends when all have. Rows equal their single-row runs (tests/inference/test_generate_batch.py)."""
    state = routed_prefill(backbone, prompts, offset=position_offset, hook=memory, pad_id=pad_id,
                           extra_capacity=params.max_new_tokens + 64)
    engine, eos = engine_for(backbone), set(eos_ids)
    gen = (torch.Generator(device=state.logits.device).manual_seed(params.seed) if params.seed is not None else None)
    streams = [TextStream(tokenizer, params.stop) for _ in prompts]
    reasons: list[str | None] = [None] * len(prompts)
    token = sample_next(state.logits, params.temperature, params.top_p, gen)
    pending = HostToken(token)
    for step in range(params.max_new_tokens):
        queued = None
        if step < params.max_new_tokens - 1:  # queued before the host reads this step's tokens
            token = sample_next(engine.decode_one_token(state.session, token), params.temperature, params.top_p, gen)
            queued = HostToken(token)
        for row, tid in enumerate(pending.get()):
            if reasons[row] is not None:
                continue
            if tid in eos:
                reasons[row] = "eos"
                continue
            streams[row].push(tid)
            if streams[row].stopped:
                reasons[row] = "stop"
        if all(r is not None for r in reasons):
            break
        pending = queued
    for stream in streams:
        stream.flush()
    return BatchResult([st.text for st in streams], [list(st.tokens) for st in streams],
                       [r or "length" for r in reasons], state.hook)
