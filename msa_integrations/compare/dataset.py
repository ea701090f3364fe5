"""Evaluation datasets: the format of ../shared/data/eval/ (and of `msa niah`).

    DIR/corpus.jsonl    {"id": str, "title": str, "text": str}                      one document per line
    DIR/queries.jsonl   {"id": str, "question": str, "answer": str, "gold_ids": [str]}  one question per line
    DIR/dataset.json    optional: settings of a generated set (NIAH), e.g. {"tokens": 64000, ...}

Extra keys of a query (RULER's "answers", HotpotQA's "type") are kept in `Query.extra`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from msa_core.errors import InvalidInputError


@dataclass(frozen=True)
class Document:
    id: str
    text: str
    title: str = ""

    @property
    def passage(self) -> str:
        """What every built-in retriever indexes: the title (when there is one) on its own line, then the text."""
        return f"{self.title}\n{self.text}" if self.title else self.text


@dataclass(frozen=True)
class Query:
    id: str
    question: str
    gold_ids: tuple[str, ...]
    answer: str | None = None
    extra: dict[str, Any] = field(default_factory=dict, hash=False, compare=False)

    @property
    def answers(self) -> list[str]:
        """Expected answers: a NIAH query's list of values, else [answer] (empty when none is known)."""
        values = self.extra.get("answers")
        if isinstance(values, list) and values:
            return [str(v) for v in values]
        return [self.answer] if self.answer else []


@dataclass
class Dataset:
    name: str
    corpus: list[Document]
    queries: list[Query]
    info: dict[str, Any] = field(default_factory=dict)  # dataset.json, plus how the set was cut
    path: str | None = None

    def __post_init__(self) -> None:
        ids = [d.id for d in self.corpus]
        if len(set(ids)) != len(ids):
            seen: set[str] = set()
            dup = next(i for i in ids if i in seen or seen.add(i))  # type: ignore[func-returns-value]
            raise InvalidInputError(f"dataset {self.name}: document id {dup!r} appears twice in the corpus")
        known = set(ids)
        for q in self.queries:
            missing = [g for g in q.gold_ids if g not in known]
            if missing:
                raise InvalidInputError(f"dataset {self.name}: question {q.id!r} names gold documents {missing} that "
                                        "are not in the corpus")

    @property
    def generated_by_niah(self) -> bool:
        return self.info.get("generator") == "msa_core.niah"

    def summary(self) -> dict[str, Any]:
        return {"name": self.name, "path": self.path, "documents": len(self.corpus), "questions": len(self.queries),
                "gold_per_question": (sum(len(q.gold_ids) for q in self.queries) / len(self.queries)
                                      if self.queries else 0.0),
                **{k: v for k, v in self.info.items() if k in ("tokens", "tokenizer", "generator", "spec", "cut")}}

    def subset(self, limit: int | None = None, corpus_limit: int | None = None) -> Dataset:
        """The first `limit` questions and a prefix of the corpus.

        corpus_limit=None keeps the shortest prefix holding every gold document of those questions (for
        hotpotqa100, whose corpus lists each question's 10 context passages in question order, that is
        their candidate pools, less the last question's passages after its last gold one); an integer
        keeps that many documents (it must hold the gold documents). limit=None keeps every question
        and the whole corpus unless corpus_limit is given.
        """
        if limit is None and corpus_limit is None:
            return self
        if limit is not None and limit < 1:
            raise InvalidInputError(f"limit must be >= 1, got {limit}")
        queries = self.queries[:limit] if limit is not None else list(self.queries)
        position = {d.id: i for i, d in enumerate(self.corpus)}
        needed = 1 + max((position[g] for q in queries for g in q.gold_ids), default=0)
        keep = needed if corpus_limit is None else corpus_limit
        if keep < needed:
            raise InvalidInputError(f"corpus_limit {corpus_limit} drops gold documents of the first {len(queries)} "
                                    f"questions; it must be at least {needed}")
        info = {**self.info, "cut": {"questions": len(queries), "of_questions": len(self.queries),
                                     "documents": min(keep, len(self.corpus)), "of_documents": len(self.corpus)}}
        info.pop("tokens", None)  # the generator's token count was for the whole corpus
        return Dataset(self.name, self.corpus[:keep], queries, info, self.path)


def load_dataset(path: str | os.PathLike[str], *, limit: int | None = None,
                 corpus_limit: int | None = None, name: str | None = None) -> Dataset:
    """Read DIR/corpus.jsonl and DIR/queries.jsonl (and DIR/dataset.json when present); see Dataset.subset."""
    root = Path(path).expanduser()
    for required in ("corpus.jsonl", "queries.jsonl"):
        if not (root / required).is_file():
            raise InvalidInputError(f"{root} has no {required}; a dataset folder holds corpus.jsonl (id, title, text) "
                                    "and queries.jsonl (id, question, answer, gold_ids)")
    corpus = [_document(rec, root / "corpus.jsonl", n) for n, rec in _jsonl(root / "corpus.jsonl")]
    queries = [_query(rec, root / "queries.jsonl", n) for n, rec in _jsonl(root / "queries.jsonl")]
    if not corpus or not queries:
        raise InvalidInputError(f"{root}: the corpus or the question file is empty")
    info: dict[str, Any] = {}
    if (root / "dataset.json").is_file():
        try:
            info = json.loads((root / "dataset.json").read_text(encoding="utf-8"))
        except ValueError as exc:
            raise InvalidInputError(f"{root / 'dataset.json'} is not valid JSON: {exc}") from exc
    ds = Dataset(name or root.name, corpus, queries, info, str(root))
    return ds.subset(limit, corpus_limit)


def write_dataset(path: str | os.PathLike[str], corpus: Sequence[Document], queries: Sequence[Query],
                  info: dict[str, Any] | None = None) -> Path:
    """Write a dataset folder in the same format (for tests and hand-made sets)."""
    root = Path(path)
    root.mkdir(parents=True, exist_ok=True)
    with open(root / "corpus.jsonl", "w", encoding="utf-8") as f:
        for d in corpus:
            f.write(json.dumps({"id": d.id, "title": d.title, "text": d.text}, ensure_ascii=False) + "\n")
    with open(root / "queries.jsonl", "w", encoding="utf-8") as f:
        for q in queries:
            f.write(json.dumps({"id": q.id, "question": q.question, "answer": q.answer,
                                "gold_ids": list(q.gold_ids), **q.extra}, ensure_ascii=False) + "\n")
    if info:
        (root / "dataset.json").write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
    return root


def _jsonl(path: Path):
    with open(path, encoding="utf-8-sig") as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                try:
                    rec = json.loads(line)
                except ValueError as exc:
                    raise InvalidInputError(f"{path} line {n}: not valid JSON ({exc})") from exc
                if not isinstance(rec, dict):
                    raise InvalidInputError(f"{path} line {n}: expected a JSON object")
                yield n, rec


def _document(rec: dict[str, Any], path: Path, n: int) -> Document:
    text, doc_id = rec.get("text"), rec.get("id")
    if not isinstance(text, str) or not text.strip():
        raise InvalidInputError(f"{path} line {n}: 'text' must be a non-empty string")
    if doc_id is None or str(doc_id) == "":
        raise InvalidInputError(f"{path} line {n}: 'id' is missing")
    return Document(str(doc_id), text, str(rec.get("title") or ""))


def _query(rec: dict[str, Any], path: Path, n: int) -> Query:
    question, gold = rec.get("question"), rec.get("gold_ids")
    if not isinstance(question, str) or not question.strip():
        raise InvalidInputError(f"{path} line {n}: 'question' must be a non-empty string")
    if not isinstance(gold, list) or not gold:
        raise InvalidInputError(f"{path} line {n}: 'gold_ids' must be a non-empty list of document ids")
    extra = {k: v for k, v in rec.items() if k not in ("id", "question", "answer", "gold_ids")}
    answer = rec.get("answer")
    return Query(str(rec.get("id", f"line-{n}")), question, tuple(dict.fromkeys(str(g) for g in gold)),
                 None if answer is None else str(answer), extra)
