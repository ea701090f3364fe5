"""Memory interleave (spec §3): the state machine scripted, the driver with a fake model, the real
tiny model with forced outputs, model.answer(mode="interleave") and the CLI."""

from __future__ import annotations

import json

import pytest
import torch

from msa_core import InvalidInputError, MemoryBank, MSAModel
from msa_core.decoder.backbone import attention_mask
from msa_core.inference.generate import SamplingParams
from msa_core.inference.interleave import (
    ANSWER_MARKER,
    END_OF_RETRIEVE,
    OBJECT_REF_END,
    Finish,
    Generate,
    Inject,
    InterleaveMachine,
    ModelBackend,
    Reroute,
    extract_answer,
    parse_ids,
    reprompt_text,
    run_interleave,
)
from msa_core.inference.reference import INSTRUCTION_TAIL, PROMPT_TAIL, Segment

DOCUMENTS = {0: "The lighthouse was built in 1887.", 2: "Ada Quist was an engineer.", 5: "Paris is in France."}
QUESTION = "Who built the lighthouse?"
REPROMPT = reprompt_text(QUESTION)


def machine(**kw) -> InterleaveMachine:
    return InterleaveMachine(QUESTION, DOCUMENTS, **kw)


def feed(m: InterleaveMachine, text: str, finished: str | None = None):
    """Feed `text` character by character, as a model would; return the first non-Generate action."""
    for n in range(1, len(text) + 1):
        action = m.step(text[:n], None if n < len(text) else finished)
        if not isinstance(action, Generate):
            assert n == len(text), f"stopped early at {text[:n]!r}"
            return action
    return action


# ---- the state machine ------------------------------------------------------------------------


def test_ids_then_answer():
    m = machine()
    action = feed(m, "[2][0]" + OBJECT_REF_END)
    assert isinstance(action, Reroute) and action.documents == (0, 2)
    assert m.rounds == [[0, 2]]
    injection = "[0]. The lighthouse was built in 1887.\n[2]. Ada Quist was an engineer.\n"
    assert m.transcript.endswith("[2][0]" + OBJECT_REF_END + injection + OBJECT_REF_END)
    kinds = [s.kind for s in action.conversation]
    assert kinds == ["instruction", "context", "context", "injection", "context"]
    action = feed(m, END_OF_RETRIEVE)
    assert isinstance(action, Inject) and action.text == REPROMPT and not action.bidirectional
    action = feed(m, f"{ANSWER_MARKER} Ada Quist", finished="eos")
    assert isinstance(action, Finish) and action.answer == "Ada Quist" and action.reason == "eos"
    assert m.phase == "done" and m.transcript.endswith(END_OF_RETRIEVE + REPROMPT + f"{ANSWER_MARKER} Ada Quist")
    with pytest.raises(InvalidInputError):
        m.step("more")


def test_end_of_retrieve_first():
    m = machine(bidirectional_injection=True)
    action = feed(m, END_OF_RETRIEVE)
    assert isinstance(action, Inject) and action.bidirectional and m.rounds == []
    assert isinstance(m.step(f"{ANSWER_MARKER} 1887"), Generate)  # the answer phase never pauses
    assert isinstance(m.step(f"{ANSWER_MARKER} 1887 [2]{OBJECT_REF_END}"), Generate)
    action = m.step(f"{ANSWER_MARKER} 1887", "length")
    assert action == Finish("1887", "length")


def test_unknown_ids_are_dropped():
    m = machine()
    action = feed(m, "[7][5][99]" + OBJECT_REF_END)
    assert action.documents == (5,) and m.rounds == [[5]] and m.named == [[5, 7, 99]]
    action = feed(m, "[42]" + OBJECT_REF_END)  # nothing known: no document text, a new round all the same
    assert isinstance(action, Reroute) and action.documents == () and m.rounds == [[5], []]
    assert action.conversation[-1] == Segment(OBJECT_REF_END, "context")
    assert [s.kind for s in action.conversation].count("injection") == 1


def test_repeated_ids_are_injected_once():
    m = machine()
    action = feed(m, "[5][2][5][2]" + OBJECT_REF_END)
    assert action.documents == (2, 5)
    assert m.transcript.count("[5]. Paris is in France.\n") == 1


def test_endless_ids_hit_the_round_cap():
    m = machine(max_rounds=2)
    for _ in range(2):
        assert isinstance(feed(m, "[0]" + OBJECT_REF_END), Reroute)
    action = feed(m, "[0]" + OBJECT_REF_END)
    assert isinstance(action, Inject) and action.text == END_OF_RETRIEVE + REPROMPT
    assert m.capped and m.rounds == [[0], [0]] and m.phase == "answer"
    action = m.step("[0]" + OBJECT_REF_END + "[0]", "length")
    assert isinstance(action, Finish) and action.answer == "[0][0]"


def test_runaway_id_listing():
    m = machine(max_id_chars=20)
    action = feed(m, "no ids here at all, r")  # past 20 chars and nothing known: stop retrieving
    assert isinstance(action, Inject) and m.rounds == []
    m = machine(max_id_chars=20)
    action = feed(m, "[2] and some more tex")
    assert isinstance(action, Reroute) and action.documents == (2,)


def test_parsing_helpers():
    assert parse_ids("[3][1] and [3], [x] [12]") == [1, 3, 12]
    assert extract_answer(f"junk {ANSWER_MARKER} a {ANSWER_MARKER}  Paris <|im_end|> tail") == "Paris"
    assert extract_answer(f"[1]{OBJECT_REF_END} no marker<|endoftext|>") == "[1] no marker"
    with pytest.raises(InvalidInputError):
        InterleaveMachine(" ", DOCUMENTS)


# ---- the driver, with a scripted fake model -----------------------------------------------------


class FakeModel:
    """Plays scripted outputs, one string per segment, two characters per token; None = end of sequence."""

    def __init__(self, script: list[str]) -> None:
        self.script = list(script)
        self.starts: list[tuple[Segment, ...]] = []
        self.fed: list[tuple[str, bool]] = []
        self.current = ""

    def start(self, conversation):
        self.starts.append(tuple(conversation))
        self._next()

    def feed(self, text, bidirectional):
        self.fed.append((text, bidirectional))
        self._next()

    def _next(self):
        self.current = self.script.pop(0) if self.script else ""

    def next_piece(self):
        if not self.current:
            return None
        piece, self.current = self.current[:2], self.current[2:]
        return piece


def test_driver_runs_rounds_and_streams_the_answer():
    fake = FakeModel(["[2]" + OBJECT_REF_END, "[0][5]" + OBJECT_REF_END, END_OF_RETRIEVE,
                      f"{ANSWER_MARKER} Ada Quist, in 1887."])
    m = machine()
    pieces = list(run_interleave(m, fake, max_new_tokens=100))
    assert "".join(pieces) == "Ada Quist, in 1887." and len(pieces) > 1
    assert m.rounds == [[2], [0, 5]] and len(fake.starts) == 3 and fake.fed == [(REPROMPT, False)]
    first, _, third = fake.starts
    assert [s.kind for s in first] == ["instruction", "context"]
    assert first[0].text.endswith(QUESTION + INSTRUCTION_TAIL) and first[1].text == PROMPT_TAIL
    routed = [s.text for s in third if s.kind == "injection"]
    assert routed[-1] == f"[0]. {DOCUMENTS[0]}\n[5]. {DOCUMENTS[5]}\n"  # only the latest one routes


def test_driver_stops_each_segment_at_max_new_tokens():
    fake = FakeModel(["[2" * 50])
    m = machine()
    assert list(run_interleave(m, fake, max_new_tokens=3)) == ["[2[2[2"]  # no marker: the text is the answer
    assert m.finish_reason == "length" and m.generated == ["[2[2[2"]


# ---- the real tiny model ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model(tiny_msa_dir) -> MSAModel:
    return MSAModel.from_pretrained(tiny_msa_dir(), device="cpu")


@pytest.fixture(scope="module")
def bank(model):
    return model.index(["The lighthouse was built in 1887.", "Ada Quist was an engineer.", "Paris is in France."],
                       ids=["light", "ada", "paris"])


def _ids(model, text):
    return model.tokenizer(text, add_special_tokens=False)["input_ids"]


def test_forced_outputs_run_two_rounds_on_the_model(model, bank):
    script = "[1]" + OBJECT_REF_END + "[0][2]" + OBJECT_REF_END + END_OF_RETRIEVE + f"{ANSWER_MARKER} Ada"
    backend = ModelBackend(model, bank, 2, SamplingParams(max_new_tokens=30), forced=_ids(model, script) + [2])
    m = InterleaveMachine(QUESTION, {0: "The lighthouse was built in 1887.", 1: "Ada Quist was an engineer.",
                                     2: "Paris is in France."})
    assert "".join(run_interleave(m, backend, 30)) == "Ada"
    assert m.rounds == [[1], [0, 2]] and len(backend.prefills) == 3
    second = backend.prompts[1]
    routed = [t for t, r in zip(second.ids, second.routing) if r]
    instruction = backend.profile.question_prompt(QUESTION)
    n = sum(instruction.routing)
    assert routed[:n] == instruction.ids[:n]
    assert model.tokenizer.decode(routed[n:]) == "[1]. Ada Quist was an engineer.\n"
    t = backend.profile.template_length
    assert backend.prefills[2].positions[0, 0].item() == t + 2  # every re-prefill starts at T + k again
    assert set(backend.routings[1]) == set(model.layers)


def test_injection_is_causal_unless_asked(model, bank):
    prefix, block = _ids(model, "[0]"), _ids(model, "abc def ghi")

    def run(bidirectional):
        backend = ModelBackend(model, bank, 2, SamplingParams(max_new_tokens=5), forced=list(prefix))
        backend.start(InterleaveMachine(QUESTION, {}).conversation)
        for _ in prefix:
            backend.next_piece()
        backend.feed("abc def ghi", bidirectional)
        return backend.logits

    causal, both_ways = run(False), run(True)
    # a causal feed equals the same tokens decoded one at a time
    backend = ModelBackend(model, bank, 2, SamplingParams(max_new_tokens=5), forced=prefix + block)
    backend.start(InterleaveMachine(QUESTION, {}).conversation)
    for _ in prefix + block:
        backend.next_piece()
    backend._flush()
    assert torch.allclose(causal, backend.logits, atol=1e-5)
    assert not torch.allclose(causal, both_ways, atol=1e-4)


def test_non_causal_mask_lets_a_block_see_its_later_tokens():
    valid = torch.ones(1, 5, dtype=torch.bool)
    causal = attention_mask(valid, 2, 3)[0, 0]
    both = attention_mask(valid, 2, 3, causal=False)[0, 0]
    assert causal.tolist() == [[True, True, True, False, False], [True] * 4 + [False], [True] * 5]
    assert both.tolist() == [[True] * 5] * 3


def test_answer_in_interleave_mode(model, bank):
    answer = model.answer(QUESTION, bank, mode="interleave", max_new_tokens=6, max_rounds=2)
    assert answer.mode == "interleave" and isinstance(answer.rounds, list) and len(answer.rounds) <= 2
    assert answer.transcript.startswith("\nPlease answer the question based")
    d = answer.to_dict()
    assert d["rounds"] == answer.rounds and "transcript" in d
    assert set(answer.layer_selections) == set(model.layers)
    latent = model.answer(QUESTION, bank, max_new_tokens=2).to_dict()
    assert "rounds" not in latent  # other modes keep their JSON shape
    with pytest.raises(InvalidInputError, match="bank"):
        model.answer(QUESTION, None, mode="interleave")


def test_interleave_needs_the_reference_profile(tiny_model_dir):
    default = MSAModel.from_pretrained(tiny_model_dir("qwen3"), config={"encode": {"chunk_size": 4}}, device="cpu")
    bank = default.index(["Paris is in France."], ids=["p"])
    with pytest.raises(InvalidInputError, match="reference profile"):
        default.answer(QUESTION, bank, mode="interleave")


def test_cli_ask_interleave(tiny_msa_dir, tmp_path, capsys):
    from msa_core.cli.main import main

    corpus = tmp_path / "corpus.jsonl"
    docs = [("light", "The lighthouse was built in 1887."), ("ada", "Ada Quist was an engineer.")]
    corpus.write_text("\n".join(json.dumps({"id": i, "text": t}) for i, t in docs))
    path = tiny_msa_dir()
    assert main(["index", str(corpus), "--bank", str(tmp_path / "bank"), "--model", str(path), "--no-progress"]) == 0
    saved = MemoryBank.load(tmp_path / "bank").config
    assert saved.profile == "reference" and saved.encode.chunk_size == 4  # the checkpoint's P, not 64
    capsys.readouterr()
    code = main(["ask", str(tmp_path / "bank"), QUESTION, "--mode", "interleave", "--max-new-tokens", "4",
                 "--max-rounds", "1", "--json"])
    out = capsys.readouterr().out
    assert code == 0
    answer = json.loads(out)
    assert answer["mode"] == "interleave" and "rounds" in answer
    code = main(["ask", str(tmp_path / "bank"), QUESTION, "--mode", "interleave", "--max-new-tokens", "3",
                 "--bidirectional-injection"])
    assert code == 0 and "round" in capsys.readouterr().err
