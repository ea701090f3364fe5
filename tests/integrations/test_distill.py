"""Distilled router data: template pseudo-questions over titled passages, a teacher's filter and negatives."""

from __future__ import annotations

import json
import random

import pytest

from msa_core.errors import InvalidInputError
from msa_core.training.data import load_pairs
from msa_integrations.compare import load_dataset
from msa_integrations.distill.questions import Passage, facts, make_questions
from msa_integrations.distill.teacher import build_distill_set, read_passages, teacher_label

PEOPLE = [
    ("Juan Bustillo Oro", "Juan Bustillo Oro( 2 June 1904 – 10 June 1989) was a Mexican film director, screenwriter "
     "and producer. He made many comedies."),
    ("Rob Margolies", "Rob Margolies( born February 28, 1983) is an American film producer and director. "
     "He grew up in Rumson, New Jersey."),
    ("Eddie Romero", "Eddie Romero( July 7, 1924 – May 28, 2013) was a Filipino film director and screenwriter."),
]
FILMS = [
    ("Kamakalawa", "Kamakalawa is a 1981 Filipino fantasy film directed by Eddie Romero and starring Christopher "
     "De Leon. It was well received."),
    ("Jhoothi", "Jhoothi is a 1985 Bollywood Hindi comedy film directed by Hrishikesh Mukherjee. The film stars Rekha."),
]
OTHER = [("Daughter of Destiny", "Daughter of Destiny may refer to: a 1917 film; a 1928 film."),
         ("Vasilyevsky Island", "Vasilyevsky Island is an island in St. Petersburg, Russia, bordered by rivers.")]


def _passages() -> list[Passage]:
    return [Passage(f"w{i}", t, x) for i, (t, x) in enumerate(PEOPLE + FILMS + OTHER)]


def test_first_sentences_give_kind_years_and_description():
    by_title = {p.title: facts(p) for p in _passages()}
    assert by_title["Juan Bustillo Oro"].kind == "person" and by_title["Juan Bustillo Oro"].years == ("1904", "1989")
    assert by_title["Juan Bustillo Oro"].description == "Mexican film director"  # a film director is not a film
    assert by_title["Kamakalawa"].kind == "film" and by_title["Kamakalawa"].years == ("1981",)
    assert by_title["Vasilyevsky Island"].kind == "other"
    assert by_title["Daughter of Destiny"] is None  # a disambiguation page asks nothing
    assert Passage("x", "Nancy Drew (2019 TV series)", "t").name == "Nancy Drew"


def test_questions_name_their_passages_and_bridges_follow_relations():
    passages = _passages()
    ids = {p.id: p for p in passages}
    questions = make_questions(passages, seed=0, describes=1.0)
    assert len({q.text for q in questions}) == len(questions)
    kinds = {q.kind for q in questions}
    assert {"single", "compare", "bridge", "describe"} <= kinds
    for q in questions:
        if q.kind in ("single", "compare", "bridge"):
            assert ids[q.positives[0]].name in q.text  # the question names the first positive
        if q.kind == "compare":
            a, b = (ids[d] for d in q.positives)
            assert b.name in q.text and facts(a).kind == facts(b).kind
    bridges = [q for q in questions if q.kind == "bridge"]
    assert [(ids[a].title, ids[b].title) for a, b in (q.positives for q in bridges)] == [("Kamakalawa", "Eddie Romero")]
    assert "director of Kamakalawa" in bridges[0].text
    assert make_questions(passages, seed=0, describes=1.0) == questions  # deterministic for a seed
    assert "w5" not in {d for q in questions for d in q.positives}  # the disambiguation page


class _FixedTeacher:
    """A teacher with a known ranking: passages in a fixed order, except a question's named passage first."""

    name = "fixed"

    def index(self, corpus):
        self.ids = [d.id for d in corpus]

    def search(self, questions, k):
        return [[(d, 1.0 - i / 10) for i, d in enumerate(self.ids)][:k] for _ in questions]


def test_teacher_negatives_are_ranked_below_every_positive():
    passages = _passages()
    questions = make_questions(passages, seed=0)
    labelled = teacher_label(questions, passages, _FixedTeacher(), depth=8, negatives=2)
    order = [p.id for p in passages]
    for x in labelled:
        ranks = [order.index(d) for d in x.question.positives]
        assert x.positive_ranks == tuple(ranks)
        assert all(order.index(n) > max(ranks) for n in x.negatives)  # denoised: never above a positive
        assert list(x.negatives) == [d for d in order[max(ranks) + 1:]][:2]
        assert x.scores == {d: 1.0 - i / 10 for i, d in enumerate(order[:8])}  # the teacher's own scores


def _write_corpus(path, n_extra=60):
    rng = random.Random(0)
    rows = [{"id": p.id, "title": p.title, "text": p.text} for p in _passages()]
    for i in range(n_extra):  # more people and films, so the split has both sides
        year = 1900 + rng.randrange(100)
        if i % 2:
            rows.append({"id": f"x{i}", "title": f"Person Number{i}", "text": f"Person Number{i}( born {year}) is a "
                         f"Ruritanian painter{i} and sculptor. Known for work {i}."})
        else:
            rows.append({"id": f"x{i}", "title": f"Film Title{i}", "text": f"Film Title{i} is a {year} Ruritanian "
                         f"drama{i} film directed by Person Number{i + 1}."})
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return rows


def test_build_writes_training_pairs_and_a_dev_set_split_by_passage(tmp_path):
    pytest.importorskip("bm25s")
    from msa_integrations.compare.retrievers import BM25

    corpus = tmp_path / "corpus.jsonl"
    rows = _write_corpus(corpus)
    reserved = tmp_path / "eval.jsonl"
    reserved.write_text(json.dumps({"id": "e1", "title": "Jhoothi", "text": FILMS[1][1]}) + "\n")
    out = tmp_path / "out"
    summary = build_distill_set(corpus, out, exclude=[reserved], dev_fraction=0.2, keep_top=3, teacher=BM25())
    assert summary["excluded"] == ["w4"] and summary["passages"] == len(rows) - 1
    assert 0 < summary["train_questions_kept"] <= summary["train_questions_generated"]
    dev = load_dataset(out / "dev")
    dev_ids = {d for q in dev.queries for d in q.gold_ids}
    assert dev.queries and len(dev.corpus) == len(rows) - 1 and "w4" not in {d.id for d in dev.corpus}
    records = [json.loads(line) for line in (out / "train.jsonl").read_text().splitlines()]
    text_id = {r["text"]: r["id"] for r in rows}
    assert records and all(r["source"] == "wiki_pseudo" for r in records)
    assert not {text_id[r["positive"]] for r in records} & dev_ids  # training questions touch no dev passage
    assert all(n["text"] != r["positive"] for r in records for n in r["negatives"])
    data = load_pairs([out / "train.jsonl"], title_rate=1.0)  # the trainer reads it as it is
    assert len(data) == summary["train_questions_kept"]
    for r in records:  # the teacher's scores ride along, positive above every negative (denoised)
        assert len(r["teacher"]["negatives"]) == len(r["negatives"])
        assert all(r["teacher"]["positive"] >= t for t in r["teacher"]["negatives"])
    q = data.queries.index(records[0]["query"])
    assert sorted(data.teacher[q]) == sorted([*data.positives[q], *data.given_negatives[q]])
    assert json.loads((out / "summary.json").read_text())["teacher"] == "bm25"


def test_bad_passage_files_are_clear_errors(tmp_path):
    f = tmp_path / "c.jsonl"
    f.write_text('{"id": "a", "title": "T", "text": "x"}\n{"id": "a", "title": "U", "text": "y"}\n')
    with pytest.raises(InvalidInputError, match="c.jsonl:2: passage id 'a' occurs twice"):
        read_passages(f)
    f.write_text('{"id": "a", "text": "x"}\n')
    with pytest.raises(InvalidInputError, match="c.jsonl:1: each line needs"):
        read_passages(f)
    with pytest.raises(InvalidInputError, match="does not exist"):
        read_passages(tmp_path / "missing.jsonl")
    f.write_text('{"id": "a", "title": "T", "text": "x"}\n')
    with pytest.raises(InvalidInputError, match="keep_top"):
        build_distill_set(f, tmp_path / "o", keep_top=40, depth=30, teacher=_FixedTeacher())
