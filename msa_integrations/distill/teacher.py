"""Router training data distilled from an offline teacher: pseudo-questions over unlabelled passages
(msa_integrations/distill/questions.py), kept when a teacher retriever agrees, with negatives the teacher
ranks below every positive.

    summary = build_distill_set("2wiki_corpus.jsonl", "wiki_pseudo/", exclude=["eval/hotpotqa100/corpus.jsonl"])
    # wiki_pseudo/train.jsonl   for `msa train-router` (query, positive, title, negatives, source)
    # wiki_pseudo/dev/          a retrieval set of held-out passages' questions (`msa compare --data`)

The teacher is any retriever of the harness (`index`, `search`); by default MiniLM + BM25 fused
(`DenseBM25Fusion`), the hybrid search a user could build without msa. Consistency filtering keeps a
training question only when all its positives are in the teacher's top `keep_top`; its negatives are the
first `negatives` passages the teacher ranks after its last positive (denoised: no passage the teacher
prefers to a positive is ever a negative). Dev questions are not filtered: their labels are by
construction, so the dev split measures the teacher too.
"""

from __future__ import annotations

import json
import os
import re
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from msa_core.errors import InvalidInputError
from msa_core.training.data import stable_hash

from ..compare.dataset import Document, Query, write_dataset
from .questions import Passage, PseudoQuestion, make_questions

SOURCE = "wiki_pseudo"


@dataclass(frozen=True)
class Labelled:
    question: PseudoQuestion
    positive_ranks: tuple[int | None, ...]  # each positive's rank in the teacher's list (0 = first), None: not found
    negatives: tuple[str, ...]  # passage ids
    scores: dict[str, float]  # the teacher's score of each passage in its list (the trainer's teacher_kl reads them)


def read_passages(path: str | os.PathLike[str]) -> list[Passage]:
    """{"id", "title", "text"} per line (the format of ../shared/data/distractors and eval corpora)."""
    path = Path(path)
    if not path.is_file():
        raise InvalidInputError(f"passage file {path} does not exist")
    out, seen = [], set()
    with path.open(encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise InvalidInputError(f"{path}:{n}: not valid JSON ({e.msg})") from e
            if not isinstance(rec, dict) or not all(isinstance(rec.get(k), str) and rec[k].strip()
                                                    for k in ("id", "title", "text")):
                raise InvalidInputError(f"{path}:{n}: each line needs non-empty string 'id', 'title' and 'text'")
            if rec["id"] in seen:
                raise InvalidInputError(f"{path}:{n}: passage id {rec['id']!r} occurs twice")
            seen.add(rec["id"])
            out.append(Passage(rec["id"], rec["title"].strip(), rec["text"].strip()))
    if not out:
        raise InvalidInputError(f"{path} holds no passages")
    return out


def _normal(text: str) -> str:
    return re.sub(r"\W+", " ", text.lower()).strip()


def is_dev(passage: Passage, fraction: float) -> bool:
    """A stable share of passages, by a hash of the title: the same split on every run and machine."""
    return stable_hash(passage.title) % 100_000 < fraction * 100_000


def teacher_label(questions: Sequence[PseudoQuestion], passages: Sequence[Passage], teacher: Any, *,
                  depth: int = 30, negatives: int = 3, batch: int = 256,
                  progress: Callable[[int, int], None] | None = None) -> list[Labelled]:
    """Rank every passage for every question with the teacher (indexed here over `passages`)."""
    teacher.index([Document(p.id, p.text, p.title) for p in passages])
    out: list[Labelled] = []
    for start in range(0, len(questions), batch):
        block = questions[start:start + batch]
        for q, hits in zip(block, teacher.search([q.text for q in block], depth)):
            ranked = [doc for doc, _ in hits]
            ranks = tuple(ranked.index(d) if d in ranked else None for d in q.positives)
            last = max((r for r in ranks if r is not None), default=len(ranked))
            out.append(Labelled(q, ranks, tuple(ranked[last + 1:last + 1 + negatives]),
                                {doc: float(score) for doc, score in hits}))
        if progress:
            progress(min(start + batch, len(questions)), len(questions))
    return out


def default_teacher() -> Any:
    from ..compare.retrievers import DenseBM25Fusion

    return DenseBM25Fusion(show_progress=False)


def build_distill_set(corpus: str | os.PathLike[str], out: str | os.PathLike[str], *,
                      exclude: Sequence[str | os.PathLike[str]] = (), dev_fraction: float = 0.05,
                      keep_top: int = 10, negatives: int = 3, depth: int = 30, seed: int = 0,
                      teacher: Any = None, progress: Callable[[int, int], None] | None = None) -> dict[str, Any]:
    """Write out/train.jsonl, out/dev/{corpus,queries}.jsonl and out/summary.json; returns the summary."""
    if not 0 <= dev_fraction < 1:
        raise InvalidInputError(f"dev_fraction must be in [0, 1), got {dev_fraction}")
    if not 1 <= keep_top <= depth:
        raise InvalidInputError(f"keep_top must be in [1, depth={depth}], got {keep_top}")
    started = time.perf_counter()
    teacher = teacher if teacher is not None else default_teacher()
    passages = read_passages(corpus)
    reserved = {_normal(p.text) for path in exclude for p in read_passages(path)}
    dropped = {p.id for p in passages if _normal(p.text) in reserved}
    passages = [p for p in passages if p.id not in dropped]
    held = {p.id for p in passages if is_dev(p, dev_fraction)}
    dev = [p for p in passages if p.id in held]
    train = [p for p in passages if p.id not in held]
    train_q = make_questions(train, seed=seed)
    dev_q = make_questions(dev, seed=seed + 1)
    labelled = teacher_label(train_q + dev_q, passages, teacher, depth=depth,
                             negatives=negatives, progress=progress)
    by_id = {p.id: p for p in passages}
    kept = [x for x in labelled[:len(train_q)]
            if all(r is not None and r < keep_top for r in x.positive_ranks)]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / "train.jsonl.tmp"
    with tmp.open("w", encoding="utf-8") as f:
        for x in kept:
            negs = [{"title": by_id[d].title, "text": by_id[d].text} for d in x.negatives]
            for d in x.question.positives:
                scores = {"positive": x.scores[d], "negatives": [x.scores[n] for n in x.negatives]}
                f.write(json.dumps({"query": x.question.text, "positive": by_id[d].text, "title": by_id[d].title,
                                    "negatives": negs, "teacher": scores, "source": SOURCE,
                                    "kind": x.question.kind}) + "\n")
    tmp.replace(out / "train.jsonl")
    write_dataset(out / "dev", [Document(p.id, p.text, p.title) for p in passages],
                  [Query(f"d{i:05d}", q.text, q.positives, extra={"type": q.kind}) for i, q in enumerate(dev_q)])
    dev_hits = labelled[len(train_q):]
    summary = {
        "corpus": str(corpus), "passages": len(passages), "excluded": sorted(dropped),
        "train_passages": len(train), "dev_passages": len(dev),
        "train_questions_generated": len(train_q), "train_questions_kept": len(kept),
        "kept_by_kind": _count(x.question.kind for x in kept),
        "generated_by_kind": _count(q.kind for q in train_q),
        "dev_questions": len(dev_q), "dev_by_kind": _count(q.kind for q in dev_q),
        "teacher": getattr(teacher, "name", type(teacher).__name__),
        "teacher_dev_recall@5": round(_recall(dev_hits, 5), 4),
        "teacher_dev_recall@10": round(_recall(dev_hits, 10), 4),
        "settings": {"dev_fraction": dev_fraction, "keep_top": keep_top, "negatives": negatives, "depth": depth,
                     "seed": seed},
        "seconds": round(time.perf_counter() - started, 1),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    return summary


def _count(items) -> dict[str, int]:
    return dict(sorted(Counter(items).items()))


def _recall(labelled: Sequence[Labelled], k: int) -> float:
    if not labelled:
        return 0.0
    return sum(sum(r is not None and r < k for r in x.positive_ranks) / len(x.positive_ranks)
               for x in labelled) / len(labelled)
