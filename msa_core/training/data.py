"""Router training data: (query, positive[, negatives]) pairs read from JSONL, grouped into one
document table, split without shared documents, and hard negatives mined with BM25.

    data = load_pairs(["train/squad.jsonl", ...])
    train, heldout = data.split(0.02)
    train.mine_bm25_negatives(depth=30)
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import re
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import InvalidInputError
from ..memory.lexical import import_bm25s

# RULER's needle sentence and question (the NIAH generator in msa_integrations.compare writes its sets with them)
NEEDLE = "One of the special magic {type} for {key} is: {value}."
QUESTION = "What is the special magic {type} for {key} mentioned in the provided text?"


def stable_hash(text: str) -> int:
    """A hash of text that is the same on every run and machine (Python's hash() is salted per process)."""
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "big")


def render_document(text: str, title: str | None, title_rate: float) -> str:
    """The document as it is encoded: "title\\ntext" (as the A/B harness indexes passages) for a
    stable `title_rate` share of titled documents, so the router sees documents with and without."""
    if title and title.strip() and (stable_hash(text) % 1000) < title_rate * 1000:
        return f"{title.strip()}\n{text}"
    return text


@dataclass
class TrainingSet:
    """Queries over one table of unique documents. Indices into `documents` everywhere."""

    documents: list[str]
    queries: list[str]
    positives: list[list[int]]  # per query: its positive documents
    given_negatives: list[list[int]]  # per query: negatives from the data file
    sources: list[str]  # per query: the source tag (file's `source` field, else the file name)
    mined_negatives: list[list[int]] = field(default_factory=list)  # per query: ranked hard negatives
    teacher: list[dict[int, float]] = field(default_factory=list)  # per query: a teacher's score per document

    def __post_init__(self) -> None:
        n = len(self.queries)
        if not (len(self.positives) == len(self.given_negatives) == len(self.sources) == n):
            raise InvalidInputError("TrainingSet: queries, positives, negatives and sources differ in length")
        if not self.mined_negatives:
            self.mined_negatives = [[] for _ in range(n)]
        if not self.teacher:
            self.teacher = [{} for _ in range(n)]

    def __len__(self) -> int:
        return len(self.queries)

    def source_counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for s in self.sources:
            counts[s] = counts.get(s, 0) + 1
        return dict(sorted(counts.items()))

    def subset(self, query_rows: Sequence[int]) -> TrainingSet:
        """The given queries with only the documents they name (re-indexed)."""
        used = sorted({d for q in query_rows for d in (*self.positives[q], *self.given_negatives[q],
                                                        *self.mined_negatives[q])})
        new = {old: i for i, old in enumerate(used)}
        return TrainingSet(
            documents=[self.documents[d] for d in used],
            queries=[self.queries[q] for q in query_rows],
            positives=[[new[d] for d in self.positives[q]] for q in query_rows],
            given_negatives=[[new[d] for d in self.given_negatives[q]] for q in query_rows],
            sources=[self.sources[q] for q in query_rows],
            mined_negatives=[[new[d] for d in self.mined_negatives[q]] for q in query_rows],
            teacher=[{new[d]: t for d, t in self.teacher[q].items()} for q in query_rows],
        )

    def split(self, heldout_fraction: float, heldout_sources: Sequence[str] = ()
              ) -> tuple[TrainingSet, TrainingSet]:
        """(train, held-out) by document: a query is held out when its first positive is (or its source
        is in heldout_sources: a domain the router never sees, the better test of transfer), and a
        training query that touches a held-out document is dropped, so no document is in both.
        The choice hashes document text, so it does not move when files are added or reordered."""
        if not 0.0 <= heldout_fraction < 1.0:
            raise InvalidInputError(f"heldout_fraction must be in [0, 1), got {heldout_fraction}")
        unknown = set(heldout_sources) - set(self.sources)
        if unknown:
            raise InvalidInputError(f"held-out sources {sorted(unknown)} are not in the data; sources are "
                                    f"{sorted(set(self.sources))}")
        held_docs = {d for d, text in enumerate(self.documents)
                     if (stable_hash(text) % 100_000) < heldout_fraction * 100_000}
        by_source = set(heldout_sources)
        held = [q for q in range(len(self)) if self.positives[q][0] in held_docs or self.sources[q] in by_source]
        held_docs |= {d for q in held for d in self.positives[q]}
        held_set = set(held)
        train = [q for q in range(len(self)) if q not in held_set
                 and not any(d in held_docs for d in (*self.positives[q], *self.given_negatives[q]))]
        return self.subset(train), self.subset(held)

    def mine_bm25_negatives(self, depth: int = 30, show_progress_bar: bool = False) -> None:
        """For every query, the BM25 top-`depth` documents that are not its positives, best first. A query
        whose file gave negatives (a teacher's, denoised) keeps those alone: BM25 would bring back the
        false negatives the teacher left out."""
        try:
            bm25s = import_bm25s()
        except ImportError as e:
            raise InvalidInputError("BM25 hard negatives need bm25s: pip install bm25s "
                                    "(or train with bm25_negatives=0)") from e
        corpus = bm25s.tokenize(self.documents, stopwords="en", show_progress=show_progress_bar)
        index = bm25s.BM25()
        index.index(corpus, show_progress=show_progress_bar)
        k = min(depth + max(len(p) for p in self.positives), len(self.documents))
        tokens = bm25s.tokenize(self.queries, stopwords="en", show_progress=show_progress_bar)
        # numpy selection: bm25s's "auto" picks JAX when installed, and JAX claims 75% of the GPU on import
        hits, _ = index.retrieve(tokens, k=k, show_progress=show_progress_bar, n_threads=-1,
                                 backend_selection="numpy")
        for q, row in enumerate(hits.tolist()):
            pos = set(self.positives[q])
            self.mined_negatives[q] = [] if self.given_negatives[q] else [d for d in row if d not in pos][:depth]


_WORD = re.compile(r"^[a-z]{4,10}$")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")  # where synthetic questions cut documents into sentences


def _body_sentences(document: str) -> list[list[str]]:
    """The words of each sentence of a document's body: the first line (a titled document's title) is
    skipped, so a title alone never gives a synthetic question away."""
    return [s.split() for s in _SENTENCE_END.split(document.split("\n", 1)[-1])]


def add_needle_pairs(data: TrainingSet, n: int, *, doc_words: int = 300, seed: int = 1) -> None:
    """Add n synthetic key-lookup questions in RULER's needle format, built from `data`'s own documents.

    Each new document is ~doc_words words of the documents with one sentence "One of the special magic
    numbers for KEY is: VALUE." inserted between sentences; its question asks for KEY. Keys are two
    words drawn from the documents' own vocabulary (not the NIAH generator's adjective-noun lists), so
    the router learns to find a key phrase inside unrelated text, not the evaluation's keys.
    """
    if n <= 0 or not data.documents:
        return
    rng = random.Random(seed)
    vocab = sorted({w for d in data.documents[:5000] for w in d.lower().split() if _WORD.match(w)})
    if len(vocab) < 50:
        raise InvalidInputError("too few distinct words in the training documents to draw needle keys from")
    sentences = [s for d in data.documents for s in _SENTENCE_END.split(d) if len(s.split()) >= 4]
    kinds = ("numbers", "uuids", "words")
    for i in range(n):
        key = f"{rng.choice(vocab)}-{rng.choice(vocab)}"
        kind = kinds[i % len(kinds)]
        value = (str(rng.randint(1_000_000, 9_999_999)) if kind == "numbers"
                 else str(uuid.UUID(int=rng.getrandbits(128), version=4)) if kind == "uuids"
                 else f"{rng.choice(vocab)}-{rng.choice(vocab)}")
        body: list[str] = []
        start = rng.randrange(len(sentences))
        while sum(len(x.split()) for x in body) < doc_words:
            body.append(sentences[(start + len(body)) % len(sentences)])
        body.insert(rng.randint(0, len(body)), NEEDLE.format(type=kind, key=key, value=value))
        data.documents.append(" ".join(body))
        data.queries.append(QUESTION.format(type=kind, key=key))
        data.positives.append([len(data.documents) - 1])
        data.given_negatives.append([])
        data.mined_negatives.append([])
        data.teacher.append({})
        data.sources.append("needles")


def add_span_pairs(data: TrainingSet, n: int, *, min_words: int = 6, max_words: int = 12, seed: int = 1) -> None:
    """Add n self-supervised questions: a window of min_words..max_words words cut from one sentence
    of a document, whose positive is that document (unchanged, so no new document states are needed).

    A fragment finds its own passage by the words they share (names, numbers, terms), and no labels are
    needed, so a router can learn from any corpus. Measured: a large gain when labelled questions are few,
    none on top of the full 64k-question training set (README, Training routers). The first line is
    skipped (a titled document's title), so a title alone never gives the answer away. At most three
    questions are cut from one document.
    """
    if n <= 0 or not data.documents:
        return
    rng = random.Random(seed)
    existing = set(data.queries)
    order = list(range(len(data.documents)))
    rng.shuffle(order)
    added = 0
    for d in order * 3:  # several windows per document when n exceeds the number of documents
        if added >= n:
            break
        sentences = [s for s in _body_sentences(data.documents[d]) if len(s) >= min_words]
        if not sentences:
            continue
        words = rng.choice(sentences)
        size = rng.randint(min_words, min(max_words, len(words)))
        start = rng.randint(0, len(words) - size)
        query = " ".join(words[start:start + size])
        if query in existing:
            continue
        existing.add(query)
        data.queries.append(query)
        data.positives.append([d])
        data.given_negatives.append([])
        data.mined_negatives.append([])
        data.teacher.append({})
        data.sources.append("spans")
        added += 1


def _name_window(document: str, rng: random.Random, around: int = 3) -> str | None:
    """A few words either side of a name in the document's body: a capitalised word that does not open its
    sentence."""
    spots = [(words, i) for words in _body_sentences(document) for i in range(1, len(words)) if words[i][:1].isupper()]
    if not spots:
        return None
    words, i = rng.choice(spots)
    return " ".join(words[max(0, i - around): i + around + 1])


def add_pair_questions(data: TrainingSet, n: int, *, seed: int = 2) -> None:
    """Add n self-supervised two-document questions: "<words around a name in A> and <words around a
    name in B>", whose positives are A and B.

    Multi-hop questions (HotpotQA's comparisons and bridges) name one or two entities among many other
    words; routing takes the max over query tokens, so each named document should win on its own words.
    Each positive competes with the negatives only (decoupled InfoNCE), never with the other. Windows skip
    the first line (a titled document's title) and the first word of each sentence.
    """
    if n <= 0 or len(data.documents) < 2:
        return
    rng = random.Random(seed)
    existing = set(data.queries)
    added = 0
    for _ in range(4 * n):  # documents without a name are drawn again, within bounds
        if added >= n:
            break
        a, b = rng.sample(range(len(data.documents)), 2)
        windows = [_name_window(data.documents[d], rng) for d in (a, b)]
        query = None if None in windows else " and ".join(windows)
        if query is None or query in existing:
            continue
        existing.add(query)
        data.queries.append(query)
        data.positives.append([a, b])
        data.given_negatives.append([])
        data.mined_negatives.append([])
        data.teacher.append({})
        data.sources.append("pairs")
        added += 1


def load_pairs(paths: Iterable[str | Path], *, title_rate: float = 0.5,
               max_per_source: int | None = None) -> TrainingSet:
    """Read JSONL files of {"query", "positive", "negatives"?, "title"?, "source"?, "teacher"?}.

    "teacher": {"positive": float, "negatives": [float, ...]} gives a teacher retriever's scores of this line's
    positive and negatives (msa distill-data writes them), for the trainer's distillation loss.

    Repeated documents become one row; a query repeated with different positives becomes one
    query with several. max_per_source caps the queries kept per source (the data mix), taking
    the first ones in file order.
    """
    documents: list[str] = []
    doc_row: dict[str, int] = {}
    query_row: dict[tuple[str, str], int] = {}
    queries: list[str] = []
    positives: list[list[int]] = []
    negatives: list[list[int]] = []
    sources: list[str] = []
    teacher: list[dict[int, float]] = []
    per_source: dict[str, int] = {}

    def row_of(text: str) -> int:
        if text not in doc_row:
            doc_row[text] = len(documents)
            documents.append(text)
        return doc_row[text]

    paths = [Path(p) for p in paths]
    if not paths:
        raise InvalidInputError("no training files given")
    for path in paths:
        for line_no, rec in _read_jsonl(path):
            where = f"{path}:{line_no}"
            query, positive = rec.get("query"), rec.get("positive")
            if not isinstance(query, str) or not query.strip():
                raise InvalidInputError(f"{where}: 'query' must be a non-empty string")
            if not isinstance(positive, str) or not positive.strip():
                raise InvalidInputError(f"{where}: 'positive' must be a non-empty string")
            negs = rec.get("negatives") or []
            if not isinstance(negs, list) or not all(_negative_ok(n) for n in negs):
                raise InvalidInputError(f"{where}: 'negatives' must be a list of non-empty strings or of "
                                        "{\"text\": ..., \"title\": ...} objects")
            scores = _teacher_scores(rec.get("teacher"), len(negs), where)
            source = str(rec.get("source") or path.stem)
            key = (source, query)
            if key not in query_row:
                if max_per_source is not None and per_source.get(source, 0) >= max_per_source:
                    continue
                per_source[source] = per_source.get(source, 0) + 1
                query_row[key] = len(queries)
                queries.append(query)
                positives.append([])
                negatives.append([])
                sources.append(source)
                teacher.append({})
            q = query_row[key]
            title = rec.get("title") if isinstance(rec.get("title"), str) else None
            d = row_of(render_document(positive, title, title_rate))
            if d not in positives[q]:
                positives[q].append(d)
            if scores:
                teacher[q][d] = scores[0]
            for i, n in enumerate(negs):  # a titled negative is rendered as a positive is, so titles tell nothing apart
                nd = row_of(n if isinstance(n, str) else render_document(n["text"], n.get("title"), title_rate))
                if nd not in negatives[q]:
                    negatives[q].append(nd)
                if scores:
                    teacher[q][nd] = scores[1 + i]
    if not queries:
        raise InvalidInputError(f"no (query, positive) pairs found in {', '.join(map(str, paths))}")
    for q in range(len(queries)):  # a document that is a positive of this query is never its negative
        negatives[q] = [d for d in negatives[q] if d not in positives[q]]
    return TrainingSet(documents, queries, positives, negatives, sources, teacher=teacher)


def _teacher_scores(rec: object, n_negatives: int, where: str) -> list[float] | None:
    """[positive's score, each negative's score] of a line's "teacher" field, or None without one."""
    if rec is None:
        return None
    ok = (isinstance(rec, dict) and _finite(rec.get("positive")) and isinstance(rec.get("negatives"), list)
          and len(rec["negatives"]) == n_negatives and all(_finite(x) for x in rec["negatives"]))
    if not ok:
        raise InvalidInputError(f"{where}: 'teacher' must be {{\"positive\": number, \"negatives\": [number, ...]}} "
                                f"with one finite score per negative ({n_negatives})")
    return [float(rec["positive"]), *map(float, rec["negatives"])]


def _finite(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _negative_ok(n: object) -> bool:
    if isinstance(n, str):
        return bool(n.strip())
    return (isinstance(n, dict) and isinstance(n.get("text"), str) and bool(n["text"].strip())
            and isinstance(n.get("title"), (str, type(None))))


def _read_jsonl(path: Path):
    try:
        with path.open(encoding="utf-8") as f:
            for line_no, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError as e:
                    raise InvalidInputError(f"{path}:{line_no}: not valid JSON ({e.msg})") from e
                if not isinstance(rec, dict):
                    raise InvalidInputError(f"{path}:{line_no}: each line must be a JSON object")
                yield line_no, rec
    except FileNotFoundError as e:
        raise InvalidInputError(f"training file {path} does not exist") from e
    except UnicodeDecodeError as e:
        raise InvalidInputError(f"{path} is not UTF-8 text ({e.reason} at byte {e.start})") from e
