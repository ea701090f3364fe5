"""Pseudo-questions over unlabelled, titled encyclopedia passages, by templates: the questions a router
should answer on Wikipedia-like text, with positives known by construction.

    passages = [Passage("w1", "Jhoothi", "Jhoothi is a 1985 Bollywood Hindi comedy film directed by ..."), ...]
    questions = make_questions(passages, seed=0)   # [PseudoQuestion(text, positives, kind), ...]

Each passage's first sentence says what it is about ("X( born 1950) is an American writer", "X is a 1985
Hindi film directed by Y"), which gives its kind (person, film, other), years and a short description.
Three shapes of question come from it, none copied from any evaluation set:
- one entity: "When was the film A released?", or a description without the name ("Which American writer
  was born in 1950?");
- a comparison of two passages of one kind: "Who was born first, A or B?" (positives A and B);
- a bridge, where A's text names another passage B after a relation ("directed by B", "son of B"):
  "When was the director of A born?" (positives A and B).
"""

from __future__ import annotations

import random
import re
from collections.abc import Sequence
from dataclasses import dataclass

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z\"(])")
_YEAR = re.compile(r"\b(1[0-9]{3}|20[0-9]{2})\b")
_PAREN_DATES = re.compile(r"^[^()]{0,80}\(\s*([^()]*\b(?:1[0-9]{3}|20[0-9]{2})\b[^()]*)\)")
_DESCRIPTION = re.compile(r"\b(?:is|was|are|were) (?:an?|the) ([^,.;:()\"]{3,200}?)(?=[,.;:()]| who\b| whose\b"
                          r"| that\b| which\b| best known\b| known\b| from\b| born\b| based\b| in \d| directed\b"
                          r"| written\b| produced\b| starring\b| released\b|$)")
_NAME = r"((?:[A-Z][\w'\-]*\.?)(?: (?:[A-Z][\w'\-]*\.?|de|van|von|of|la|del|da|bin)){0,4})"
# relation phrase before another passage's name -> the role that passage plays for this one
_FILM = re.compile(r"\b(?:film|movie)\b(?! (?:director|producer|actor|actress|editor|critic|composer|maker|"
                   r"score|scholar|historian|studio|company|distributor|festival|series))")
_RELATIONS = {
    "directed by": "director", "written by": "writer", "produced by": "producer", "composed by": "composer",
    "founded by": "founder", "son of": "parent", "daughter of": "parent", "wife of": "husband",
    "husband of": "wife", "married to": "spouse", "married": "spouse", "father of": "child",
    "mother of": "child", "starring": "star", "created by": "creator", "designed by": "designer",
}
_RELATION = re.compile(r"\b(" + "|".join(sorted(map(re.escape, _RELATIONS), key=len, reverse=True)) + r") " + _NAME)


@dataclass(frozen=True)
class Passage:
    id: str
    title: str
    text: str

    @property
    def name(self) -> str:
        """The title without a trailing disambiguation ("Nancy Drew (2019 TV series)" -> "Nancy Drew")."""
        return re.sub(r"\s*\([^()]*\)\s*$", "", self.title).strip() or self.title


@dataclass(frozen=True)
class PseudoQuestion:
    text: str
    positives: tuple[str, ...]  # passage ids
    kind: str  # single, describe, compare, bridge


@dataclass(frozen=True)
class Facts:
    kind: str  # person, film, other
    description: str | None  # "American film director"
    years: tuple[str, ...]  # years in the opening parenthesis (a person's birth and death) or the description


def first_sentence(text: str) -> str:
    return _SENTENCE_END.split(text.strip(), maxsplit=1)[0]


def facts(passage: Passage) -> Facts | None:
    """What the first sentence says the passage is about; None for a disambiguation page."""
    sentence = first_sentence(passage.text)
    if "may refer to" in sentence or "may also refer to" in sentence:
        return None
    dates = _PAREN_DATES.match(sentence)
    m = _DESCRIPTION.search(sentence)
    description = " ".join(m.group(1).split()) if m else None
    if description and len(description.split()) > 8:
        description = " ".join(description.split()[:8])
    if description and _FILM.search(description):
        years = tuple(_YEAR.findall(description))
        return Facts("film", description, years)
    if dates:
        return Facts("person", description, tuple(_YEAR.findall(dates.group(1))))
    return Facts("other", description, tuple(_YEAR.findall(description or "")))


def _strip_year(description: str) -> str:
    return " ".join(w for w in description.split() if not _YEAR.fullmatch(w))


def single_question(p: Passage, f: Facts, rng: random.Random) -> PseudoQuestion:
    a = p.name
    if f.kind == "person":
        options = [f"When was {a} born?", f"What nationality was {a}?", f"What was the profession of {a}?",
                   f"Who was {a}?"]
        if len(f.years) >= 2:
            options += [f"When did {a} die?", f"Where did {a} die?"]
    elif f.kind == "film":
        options = [f"Who directed the film {a}?", f"When was the film {a} released?",
                   f"Which country is the film {a} from?", f"Who starred in {a}?"]
    else:
        options = [f"What is {a} known for?", f"What can you tell me about {a}?",
                   f"Which country is {a} associated with?"]
    return PseudoQuestion(rng.choice(options), (p.id,), "single")


def describe_question(p: Passage, f: Facts, rng: random.Random) -> PseudoQuestion | None:
    """The passage found by what it is, not by its name ("Which American film director was born in 1904?")."""
    if not f.description or len(f.description.split()) < 2:
        return None
    what = _strip_year(f.description)
    if f.kind == "person" and f.years:
        text = rng.choice([f"Which {what} was born in {f.years[0]}?", f"Who is the {what} born in {f.years[0]}?"])
    elif f.kind == "film" and f.years:
        text = rng.choice([f"Which {what} came out in {f.years[0]}?", f"What {what} was released in {f.years[0]}?"])
    else:
        return None
    return PseudoQuestion(text, (p.id,), "describe")


def compare_question(p: Passage, fp: Facts, q: Passage, fq: Facts, rng: random.Random) -> PseudoQuestion:
    a, b = p.name, q.name
    if fp.kind == "person":
        options = [f"Who was born first, {a} or {b}?", f"Are {a} and {b} of the same nationality?",
                   f"Did {a} and {b} have the same profession?"]
        if len(fp.years) >= 2 and len(fq.years) >= 2:
            options += [f"Who died first, {a} or {b}?", f"Who lived longer, {a} or {b}?"]
    elif fp.kind == "film":
        options = [f"Which film came out first, {a} or {b}?", f"Are the films {a} and {b} from the same country?",
                   f"Do the films {a} and {b} have the same director?"]
    else:
        options = [f"Are {a} and {b} associated with the same country?", f"What do {a} and {b} have in common?"]
    return PseudoQuestion(rng.choice(options), (p.id, q.id), "compare")


def bridge_questions(p: Passage, by_name: dict[str, Passage], kinds: dict[str, Facts],
                     rng: random.Random) -> list[PseudoQuestion]:
    """Questions about a passage B that A names after a relation, asked through A ("the director of A")."""
    out, seen = [], set()
    for m in _RELATION.finditer(p.text):
        role, words = _RELATIONS[m.group(1)], m.group(2).split()
        target = next((by_name[" ".join(words[:n])] for n in range(len(words), 0, -1)
                       if " ".join(words[:n]) in by_name), None)
        if target is None or target.id == p.id or target.id in seen:
            continue
        seen.add(target.id)
        a = p.name  # every relation names a person
        options = [f"When was the {role} of {a} born?", f"What nationality is the {role} of {a}?",
                   f"Where was the {role} of {a} born?"]
        if len(kinds[target.id].years) >= 2:
            options.append(f"When did the {role} of {a} die?")
        out.append(PseudoQuestion(rng.choice(options), (p.id, target.id), "bridge"))
    return out


def make_questions(passages: Sequence[Passage], *, seed: int = 0, singles: float = 1.0, describes: float = 0.5,
                   compares: float = 1.0, bridges: bool = True) -> list[PseudoQuestion]:
    """Questions over `passages`: about `singles` one-entity and `describes` description questions per
    passage, `compares` comparisons per passage (pairs of one kind), and every bridge found. Deterministic
    for a seed; a question text occurs once."""
    rng = random.Random(seed)
    known = {p.id: f for p in passages if (f := facts(p)) is not None}
    usable = [p for p in passages if p.id in known]
    by_name = {p.name: p for p in usable if len(p.name) >= 6 and " " in p.name}
    out: list[PseudoQuestion] = []
    for p in usable:
        f = known[p.id]
        if rng.random() < singles:
            out.append(single_question(p, f, rng))
        if rng.random() < describes and (d := describe_question(p, f, rng)):
            out.append(d)
        if bridges:
            out.extend(bridge_questions(p, by_name, known, rng))
    by_kind: dict[str, list[Passage]] = {}
    for p in usable:
        by_kind.setdefault(known[p.id].kind, []).append(p)
    for group in by_kind.values():
        if len(group) < 2:
            continue
        for _ in range(int(compares * len(group))):
            p, q = rng.sample(group, 2)
            out.append(compare_question(p, known[p.id], q, known[q.id], rng))
    unique: dict[str, PseudoQuestion] = {}
    for q in out:
        unique.setdefault(q.text, q)
    return list(unique.values())
