"""Memory interleave (spec §3): the model names documents, we inject their texts, it routes again.

The loop is a small state machine, `InterleaveMachine.step(text_so_far, finished) -> action`, fed
the text generated since the last (re-)prefill or injection. Actions:

    Generate()            keep generating
    Reroute(conversation) the model named documents: their texts were appended; prefill the whole
                          conversation again, routing with the question plus the latest injection
    Inject(text)          the model ended retrieval (or hit the round cap): feed the re-prompt into
                          the running context, then generate the answer
    Finish(answer)        done; the answer follows the last "The answer to the question is:"

`run_interleave(machine, backend, max_new_tokens)` drives a backend: `ModelBackend` is the real
model (reference profile); tests script a fake one. One round = one injection of named documents.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch

from ..errors import InvalidInputError
from ..memory.bank import MemoryBank
from .generate import Prefilled, Prompt, SamplingParams, extend, sample_next
from .memory_router import LayerRouting
from .protocols import ModelLike
from .reference import Segment, question_segments

OBJECT_REF_END = "<|object_ref_end|>"
END_OF_RETRIEVE = "<End-of-Retrieve>"
ANSWER_MARKER = "The answer to the question is:"
_SPECIALS = ("<|im_end|>", "<|endoftext|>", OBJECT_REF_END, END_OF_RETRIEVE, "<|im_start|>")
_ID_RE = re.compile(r"\[(\d+)\]")


def parse_ids(text: str) -> list[int]:
    """Document numbers `[n]` named in `text`: deduplicated, ascending (spec §3.1)."""
    return sorted({int(m) for m in _ID_RE.findall(text)})


def injection_text(numbers: Sequence[int], documents: Mapping[int, str]) -> str:
    """`[i]. ORIGINAL_TEXT\\n` per document; the closing <|object_ref_end|> is a segment of its own."""
    return "".join(f"[{i}]. {documents[i]}\n" for i in numbers)


def reprompt_text(question: str) -> str:
    """What follows <End-of-Retrieve> (spec §3.1)."""
    return f"<|im_start|>The user's question is: {question}\n{OBJECT_REF_END}"


def extract_answer(text: str) -> str:
    """Text after the last answer marker up to <|im_end|>; without a marker, the text minus specials."""
    at = text.rfind(ANSWER_MARKER)
    if at != -1:
        text = text[at + len(ANSWER_MARKER):]
    text = text.split("<|im_end|>", 1)[0]
    for s in _SPECIALS:
        text = text.replace(s, "")
    return text.strip()


@dataclass(frozen=True)
class Generate:
    pass


@dataclass(frozen=True)
class Reroute:
    conversation: tuple[Segment, ...]
    documents: tuple[int, ...]  # the numbers injected this round


@dataclass(frozen=True)
class Inject:
    text: str
    bidirectional: bool = False


@dataclass(frozen=True)
class Finish:
    answer: str
    reason: str  # eos | length


Action = Generate | Reroute | Inject | Finish


class InterleaveMachine:
    """The generative-retrieval protocol of the released model, with a round cap.

    documents: {document number: original text} of the documents the model may name; other numbers
    are dropped. max_rounds: the most injections of named documents (the reference has no cap); at
    the cap, or when an id listing runs past max_id_chars without naming a known document, retrieval
    is ended for the model: `<End-of-Retrieve>` and the re-prompt are injected, then it answers.
    """

    def __init__(self, question: str, documents: Mapping[int, str], *, max_rounds: int = 4,
                 max_id_chars: int = 1000, bidirectional_injection: bool = False) -> None:
        if not isinstance(question, str) or not question.strip():
            raise InvalidInputError("the question is empty; pass some text")
        if max_rounds < 0:
            raise InvalidInputError(f"max_rounds must be >= 0, got {max_rounds}")
        if max_id_chars < 1:
            raise InvalidInputError(f"max_id_chars must be >= 1, got {max_id_chars}")
        self.question = question
        self.documents = dict(documents)
        self.max_rounds, self.max_id_chars = max_rounds, max_id_chars
        self.bidirectional = bidirectional_injection
        self.conversation: list[Segment] = question_segments(question)
        self.rounds: list[list[int]] = []  # numbers injected per round
        self.named: list[list[int]] = []  # every number named per round, unknown ones included
        self.generated: list[str] = []  # the model's text, segment by segment
        self.phase = "ids"  # ids -> answer -> done
        self.capped = False
        self.answer: str | None = None
        self.finish_reason: str | None = None

    @property
    def transcript(self) -> str:
        """Everything after the template head: prompt, model output and injections."""
        return "".join(s.text for s in self.conversation)

    def step(self, text: str, finished: str | None = None) -> Action:
        """`text`: generated since the last prefill or injection; `finished`: None while the model
        may go on, else why it stopped ('eos' or 'length')."""
        if self.phase == "done":
            raise InvalidInputError("the interleave already finished")
        if finished is not None:
            return self._finish(text, finished)
        if self.phase == "answer" or ANSWER_MARKER in text:
            return Generate()
        if END_OF_RETRIEVE in text:
            return self._end_retrieval(text, forced=False)
        if OBJECT_REF_END in text:
            return self._retrieve(text)
        if len(text) > self.max_id_chars:
            if any(i in self.documents for i in parse_ids(text)):
                return self._retrieve(text)
            return self._end_retrieval(text, forced=True)
        return Generate()

    def _retrieve(self, text: str) -> Action:
        named = parse_ids(text)
        if len(self.rounds) >= self.max_rounds:
            self.capped = True
            return self._end_retrieval(text, forced=True)
        known = [i for i in named if i in self.documents]
        self.named.append(named)
        self.rounds.append(known)
        self.generated.append(text)
        self.conversation.append(Segment(text, "context"))
        if known:
            self.conversation.append(Segment(injection_text(known, self.documents), "injection"))
        self.conversation.append(Segment(OBJECT_REF_END, "context"))
        return Reroute(tuple(self.conversation), tuple(known))

    def _end_retrieval(self, text: str, *, forced: bool) -> Action:
        self.generated.append(text)
        self.conversation.append(Segment(text, "context"))
        inject = ("" if END_OF_RETRIEVE in text else END_OF_RETRIEVE) + reprompt_text(self.question)
        self.conversation.append(Segment(inject, "context"))
        self.phase = "answer"
        return Inject(inject, self.bidirectional)

    def _finish(self, text: str, reason: str) -> Finish:
        self.generated.append(text)
        self.conversation.append(Segment(text, "context"))
        self.phase = "done"
        self.answer = extract_answer(text)  # once the marker appears nothing pauses: it is in this segment
        self.finish_reason = reason
        return Finish(self.answer, reason)


class Backend(Protocol):
    """What the driver needs from a model."""

    def start(self, conversation: Sequence[Segment]) -> None:
        """(Re-)prefill the conversation with routing."""

    def feed(self, text: str, bidirectional: bool) -> None:
        """Append text to the running context (no re-routing)."""

    def next_piece(self) -> str | None:
        """Generate one token; its text (possibly ''), or None at end of sequence."""


class _AnswerPieces:
    """Streams the answer part (after the marker) as it grows."""

    def __init__(self) -> None:
        self.emitted = ""

    def update(self, text: str) -> str:
        at = text.rfind(ANSWER_MARKER)
        if at == -1:
            return ""
        partial = text[at + len(ANSWER_MARKER):].split("<|im_end|>", 1)[0].lstrip()
        if partial.startswith(self.emitted) and len(partial) > len(self.emitted):
            piece, self.emitted = partial[len(self.emitted):], partial
            return piece
        return ""

    def final(self, answer: str) -> str:
        if answer.startswith(self.emitted):
            piece, self.emitted = answer[len(self.emitted):], answer
            return piece
        return ""


def run_interleave(machine: InterleaveMachine, backend: Backend, max_new_tokens: int = 128) -> Iterator[str]:
    """Drive `backend` through the machine; yields pieces of the answer. max_new_tokens bounds each
    generation segment (an id listing, or the answer)."""
    if max_new_tokens < 1:
        raise InvalidInputError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    backend.start(machine.conversation)
    text, n = "", 0
    pieces = _AnswerPieces()
    while True:
        piece = backend.next_piece() if n < max_new_tokens else None
        reason = None
        if piece is None:
            reason = "eos" if n < max_new_tokens else "length"
        else:
            text, n = text + piece, n + 1
        action = machine.step(text, reason)
        if isinstance(action, Generate):
            out = pieces.update(text)
            if out:
                yield out
        elif isinstance(action, Reroute):
            backend.start(action.conversation)
            text, n = "", 0
            pieces = _AnswerPieces()
        elif isinstance(action, Inject):
            backend.feed(action.text, action.bidirectional)
            text, n = "", 0
            pieces = _AnswerPieces()
        else:
            out = pieces.final(action.answer)
            if out:
                yield out
            return


@dataclass
class ModelBackend:
    """The real model under the reference profile: prefill with routing, sample, feed injections.

    forced: token ids emitted instead of sampled ones, in order, across segments (tests and the
    smoke benchmark use it to script the model's first outputs).
    """

    model: ModelLike
    bank: "MemoryBank"
    k: int
    params: SamplingParams
    allowed: torch.Tensor | None = None
    forced: list[int] = field(default_factory=list)
    prefills: list[Prefilled] = field(default_factory=list)
    prompts: list[Prompt] = field(default_factory=list)  # the prompt of each prefill

    def __post_init__(self) -> None:
        if self.model.reference is None:
            raise InvalidInputError("interleave needs the reference profile")
        self.profile = self.model.reference
        self.gen = (torch.Generator(device="cpu").manual_seed(self.params.seed)
                    if self.params.seed is not None else None)
        self.eos = set(self.model.eos_ids)
        self._pending: int | None = None

    @property
    def routings(self) -> list[dict[int, LayerRouting]]:
        return [p.hook.routings for p in self.prefills]

    @torch.no_grad()
    def start(self, conversation: Sequence[Segment]) -> None:
        prompt = self.profile.encode_segments(conversation)
        state = self.profile.prefill(prompt, self.bank, self.k, self.allowed,
                                     extra_capacity=self.params.max_new_tokens + 64)
        self.prefills.append(state)
        self.prompts.append(prompt)
        self.session, self.logits = state.session, state.logits
        self._pending = None
        self._reset_segment()

    def _reset_segment(self) -> None:
        self._tokens: list[int] = []
        self._text = ""

    @torch.no_grad()
    def _forward(self, ids: Sequence[int], causal: bool = True) -> None:
        self.logits = extend(self.model.backbone, self.session, ids, causal=causal)

    def _flush(self) -> None:
        if self._pending is not None:
            self._forward([self._pending])
            self._pending = None

    def next_piece(self) -> str | None:
        self._flush()
        if self.forced:
            token = self.forced.pop(0)
        else:
            token = int(sample_next(self.logits.cpu(), self.params.temperature, self.params.top_p, self.gen)[0])
        if token in self.eos:
            return None
        self._pending = token  # fed before the next token is drawn (the reference feeds a trigger once)
        self._tokens.append(token)
        text = self.model.tokenizer.decode(self._tokens, skip_special_tokens=False)
        if text.endswith("\ufffd"):
            return ""
        piece, self._text = text[len(self._text):], text
        return piece

    def feed(self, text: str, bidirectional: bool) -> None:
        self._flush()
        ids = self.model.tokenizer(text, add_special_tokens=False)["input_ids"]
        if ids:
            self._forward(ids, causal=not bidirectional)
        self._reset_segment()
