"""The A/B harness on fake and small retrievers: datasets, the Retriever protocol, the ready wrappers
(BM25, FAISS with a toy embedder, MSA on a tiny random model, any LangChain retriever), reports,
plots and the `msa compare` command. The real default model and MiniLM run in test_compare_default.py."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest

from msa_core.cli.main import main
from msa_core.errors import InvalidInputError
from msa_integrations.compare import (
    BM25,
    Dataset,
    DenseFaiss,
    Document,
    IndexStats,
    LangChainRetriever,
    MSARouting,
    Query,
    RandomRanking,
    Settings,
    as_retriever,
    compare,
    evaluate,
    load_dataset,
    write_dataset,
    write_report,
)

CORPUS = [
    Document("light", "The lighthouse was built in 1887 by the engineer Ada Quist.", "Greyhook Lighthouse"),
    Document("ferry", "Ferries leave the harbour every morning at seven and return at dusk.", "Ferries"),
    Document("paris", "Paris is the capital of France and its largest city.", "Paris"),
    Document("msa", "Memory sparse attention routes a question to the documents it needs.", "MSA"),
    Document("pier", "The engineer Ada Quist also built the long stone pier.", "Pier"),
    Document("bread", "The bakery sells rye bread and almond cakes on Sundays.", "Bakery"),
]
QUERIES = [
    Query("q1", "Who built the lighthouse in 1887?", ("light",), "Ada Quist"),
    Query("q2", "When do the ferries leave the harbour?", ("ferry",), "at seven"),
    Query("q3", "What did the engineer Ada Quist build?", ("light", "pier"), "the lighthouse and the pier"),
    Query("q4", "What is the capital of France?", ("paris",), "Paris"),
]


@pytest.fixture
def data_dir(tmp_path) -> Path:
    return write_dataset(tmp_path / "town", CORPUS, QUERIES)


@pytest.fixture
def dataset(data_dir) -> Dataset:
    return load_dataset(data_dir)


class Oracle:
    """Returns the gold documents first: every metric is 1."""

    name = "oracle"

    def __init__(self, gold: dict[str, Sequence[str]]) -> None:
        self.gold, self.ids = gold, []

    def index(self, corpus):
        self.ids = [d.id for d in corpus]
        return IndexStats(len(corpus), build_s=0.5, tokens=100)

    def search(self, questions, k):
        out = []
        for q in questions:
            first = list(self.gold[q])
            out.append([(d, 1.0) for d in (first + [i for i in self.ids if i not in first])[:k]])
        return out

    def size_bytes(self):
        return {"memory": 1000, "disk": None}


def oracle() -> Oracle:
    return Oracle({q.question: q.gold_ids for q in QUERIES})


FAST = Settings(ks=(1, 2, 5), latency_queries=3, progress=False)


# ---- datasets ---------------------------------------------------------------------------------------


def test_load_dataset_round_trip(data_dir):
    ds = load_dataset(data_dir)
    assert ds.name == "town" and ds.corpus == CORPUS and [q.id for q in ds.queries] == ["q1", "q2", "q3", "q4"]
    assert ds.queries[2].gold_ids == ("light", "pier") and ds.queries[0].answers == ["Ada Quist"]
    assert CORPUS[0].passage == "Greyhook Lighthouse\nThe lighthouse was built in 1887 by the engineer Ada Quist."
    assert Document("x", "text only").passage == "text only"


def test_limit_keeps_the_shortest_corpus_prefix_holding_the_gold_documents(data_dir):
    ds = load_dataset(data_dir, limit=2)
    assert [q.id for q in ds.queries] == ["q1", "q2"] and [d.id for d in ds.corpus] == ["light", "ferry"]
    assert ds.info["cut"] == {"questions": 2, "of_questions": 4, "documents": 2, "of_documents": 6}
    assert [d.id for d in load_dataset(data_dir, limit=2, corpus_limit=4).corpus] == ["light", "ferry", "paris", "msa"]
    assert len(load_dataset(data_dir, corpus_limit=5).corpus) == 5  # every question, 5 documents
    with pytest.raises(InvalidInputError, match="at least 2"):
        load_dataset(data_dir, limit=2, corpus_limit=1)


def test_bad_datasets_are_named(tmp_path, data_dir):
    with pytest.raises(InvalidInputError, match="no corpus.jsonl"):
        load_dataset(tmp_path)
    (data_dir / "queries.jsonl").write_text('{"id": "q", "question": "Who?", "gold_ids": ["nope"]}\n')
    with pytest.raises(InvalidInputError, match="'nope'"):
        load_dataset(data_dir)
    (data_dir / "queries.jsonl").write_text('{"id": "q", "question": "Who?", "gold_ids": []}\n')
    with pytest.raises(InvalidInputError, match="line 1"):
        load_dataset(data_dir)
    (data_dir / "corpus.jsonl").write_text('{"id": "a", "text": "x"}\n{"id": "a", "text": "y"}\n')
    (data_dir / "queries.jsonl").write_text('{"id": "q", "question": "Who?", "gold_ids": ["a"]}\n')
    with pytest.raises(InvalidInputError, match="twice"):
        load_dataset(data_dir)


# ---- the harness ------------------------------------------------------------------------------------


def test_oracle_and_random(dataset):
    run = evaluate(dataset, [oracle(), RandomRanking(seed=1)], FAST)
    o = run.retrievers["oracle"]
    assert all(o[key] == 1.0 for key in ("recall@2", "recall@5", "hit@1", "ndcg@10", "mrr"))
    assert o["recall@1"] == pytest.approx((1 + 1 + 0.5 + 1) / 4)  # q3 has two gold documents
    assert o["index_build_s"] == 0.5 and o["index_tokens"] == 100 and o["encode_tokens_per_s"] == 200
    assert o["index_memory_bytes"] == 1000 and o["index_disk_bytes"] is None and o["model_bytes"] is None
    assert o["latency_queries"] == 3 and o["latency_ms_p50"] >= 0 and o["latency_ms_p95"] >= o["latency_ms_p50"]
    assert run.chance["recall@1"] == pytest.approx(1 / 6)
    r = run.retrievers["random"]
    assert 0 <= r["recall@5"] <= 1 and r["questions"] == 4 and r["documents"] == 6
    assert run.rankings["oracle"][2] == {"id": "q3", "gold_ids": ["light", "pier"],
                                         "ranking": ["light", "pier", "ferry", "paris", "msa", "bread"],
                                         "scores": [1.0] * 6}
    assert run.memory_tokens == sum(len(d.passage.split()) for d in CORPUS)  # whitespace fallback
    assert run.token_counter == "whitespace words"


def test_random_ranking_is_seeded(dataset):
    a = RandomRanking(seed=5)
    a.index(dataset.corpus)
    b = RandomRanking(seed=5)
    b.index(dataset.corpus)
    assert a.search(["x", "y"], 3) == b.search(["x", "y"], 3)
    assert len({d for d, _ in a.search(["x"], 6)[0]}) == 6


def test_search_is_batched_and_checked(dataset):
    calls = []

    class Counting(RandomRanking):
        def search(self, questions, k):
            calls.append((len(questions), k))
            return super().search(questions, k)

    evaluate(dataset, [Counting(name="c")], Settings(ks=(1, 2), batch_size=3, latency_queries=2, progress=False))
    assert calls[:2] == [(3, 10), (1, 10)]  # ranking in batches of 3 at depth max(k, 10)
    assert calls[2:] == [(1, 10)] * 3  # warm-up, then 2 timed single questions

    class Broken(RandomRanking):
        def search(self, questions, k):
            return []

    with pytest.raises(InvalidInputError, match="returned 0 rankings"):
        evaluate(dataset, [Broken(name="b")], FAST)


def test_names_and_inputs(dataset):
    with pytest.raises(InvalidInputError, match="distinct name"):
        evaluate(dataset, [RandomRanking(), RandomRanking()], FAST)
    with pytest.raises(InvalidInputError, match="unknown retriever"):
        as_retriever("faiss-ivf")
    with pytest.raises(InvalidInputError, match="cannot compare"):
        as_retriever(object())
    with pytest.raises(InvalidInputError, match="ks"):
        evaluate(dataset, [RandomRanking()], Settings(ks=(0,)))


def test_answers_with_a_fake_generator(dataset):
    prompts = []

    def generator(prompt: str) -> str:
        prompts.append(prompt)
        return "Ada Quist" if "lighthouse" in prompt.split("Question:")[1] else "no idea"

    run = evaluate(dataset, [oracle()], Settings(ks=(1,), latency_queries=0, answers=2, answer_k=1, progress=False),
                   generator=generator)
    m = run.retrievers["oracle"]
    assert m["em_hybrid"] == 0.5 and m["f1_hybrid"] == 0.5 and m["answered_questions"] == 2
    assert "em_latent" not in m and "latency_ms_p50" not in m
    assert prompts[0].startswith("Answer the question using only the documents below.")
    assert "Document [1]: Greyhook Lighthouse\nThe lighthouse was built" in prompts[0]
    assert "Document [2]" not in prompts[0]  # answer_k = 1
    assert run.rankings["oracle"][0]["answer_hybrid"] == "Ada Quist"
    assert "answer_hybrid" not in run.rankings["oracle"][2]


# ---- ready wrappers ---------------------------------------------------------------------------------


def test_bm25(dataset):
    pytest.importorskip("bm25s")
    run = evaluate(dataset, [BM25()], FAST)
    m = run.retrievers["bm25"]
    assert m["hit@1"] == 1.0 and m["recall@2"] == 1.0
    assert m["index_memory_bytes"] > 0 and m["index_disk_bytes"] > 0 and m["model_bytes"] == 0
    bm = BM25()
    bm.index(dataset.corpus)
    hits = bm.search(["the of and", "lighthouse"], 3)  # a question of stop words only still gets a ranking list
    assert len(hits) == 2 and hits[1][0][0] == "light"


def test_dense_bm25_fusion_equals_each_side_at_the_ends(dataset):
    pytest.importorskip("faiss")
    from msa_integrations.compare.retrievers import DenseBM25Fusion, DenseFaiss, top_hits

    ids = [d.id for d in dataset.corpus]
    questions = [q.question for q in dataset.queries]
    dense, bm25 = DenseFaiss(ToyEmbedder(), show_progress=False), BM25()
    dense.index(dataset.corpus)
    bm25.index(dataset.corpus)
    k = len(dataset.corpus)
    for alpha, side in ((1.0, dense), (0.0, bm25)):
        fused = DenseBM25Fusion(alpha=alpha, dense=dense)
        fused.index(dataset.corpus)  # reuses the indexed dense side
        expected = [[d for d, _ in row] for row in top_hits(side.all_scores(questions), ids, k)]
        assert [[d for d, _ in row] for row in fused.search(questions, k)] == expected
    run = evaluate(dataset, [DenseBM25Fusion(alpha=0.5, dense=DenseFaiss(ToyEmbedder(), show_progress=False))], FAST)
    assert run.retrievers["minilm+bm25"]["hit@1"] == 1.0


class ToyEmbedder:
    """Bag of hashed words, L2-normalised: enough to exercise DenseFaiss without a model."""

    def get_sentence_embedding_dimension(self) -> int:
        return 64

    def encode(self, texts, batch_size=32, normalize_embeddings=True, convert_to_numpy=True, show_progress_bar=False):
        out = np.zeros((len(texts), 64), dtype="float32")
        for i, t in enumerate(texts):
            for w in t.lower().replace("?", " ").replace(".", " ").split():
                if len(w) > 3:
                    out[i, sum(map(ord, w)) % 64] += 1
        return out / np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-9)


def test_dense_faiss_with_a_toy_embedder(dataset, tmp_path):
    pytest.importorskip("faiss")
    assert DenseFaiss(ToyEmbedder(), cache_dir=tmp_path / "cache").cache_dir is None  # no id: no cache
    dense = DenseFaiss(ToyEmbedder(), name="toy", cache_dir=tmp_path / "cache", model_id="toy", show_progress=False)
    run = evaluate(dataset, [dense], FAST)
    m = run.retrievers["toy"]
    assert m["hit@1"] >= 0.75 and m["index_memory_bytes"] == 6 * 64 * 4 and m["index_disk_bytes"] > 6 * 64 * 4
    assert m["index_cached"] is False and m["model_bytes"] is None
    again = DenseFaiss(ToyEmbedder(), name="toy", cache_dir=tmp_path / "cache", model_id="toy", show_progress=False)
    stats = again.index(dataset.corpus)
    assert stats.cached and stats.build_s == pytest.approx(m["index_build_s"])
    assert again.search(["lighthouse 1887"], 2) == dense.search(["lighthouse 1887"], 2)


@pytest.fixture(scope="module")
def tiny_msa(tiny_model_dir):
    from msa_core import MSAConfig, MSAModel

    return MSAModel.from_pretrained(tiny_model_dir("llama"), config=MSAConfig(encode={"chunk_size": 4}))


def test_msa_routing_on_a_tiny_model(dataset, tiny_msa, tmp_path):
    msa = MSARouting(tiny_msa, cache_dir=tmp_path / "cache", show_progress=False)
    run = evaluate(dataset, [msa], Settings(ks=(1, 5), latency_queries=2, answers=2, max_new_tokens=4,
                                            progress=False))
    m = run.retrievers["msa"]
    info = msa.bank.info()
    assert m["index_memory_bytes"] == info["bytes"] and m["index_disk_bytes"] > info["bytes"]
    assert m["index_tokens"] == info["tokens"] and m["model_bytes"] > 0
    assert run.memory_tokens == info["tokens"] and run.token_counter == "msa tokenizer"
    for key in ("em_hybrid", "f1_hybrid", "em_latent", "f1_latent"):
        assert 0.0 <= m[key] <= 1.0
    # the batched ranking is the engine's own ranking, question by question
    expected = tiny_msa.retrieve(QUERIES[0].question, msa.bank, k=6)
    batched = msa.search([QUERIES[0].question, QUERIES[1].question], 6)[0]
    assert [d for d, _ in batched] == [h.id for h in expected] == run.rankings["msa"][0]["ranking"]
    assert [s for _, s in batched] == pytest.approx([h.score for h in expected], abs=1e-5)  # padding rounding
    cached = MSARouting(tiny_msa, cache_dir=tmp_path / "cache", show_progress=False)
    assert cached.index(dataset.corpus).cached
    assert cached.search([QUERIES[0].question], 6)[0] == [(h.id, h.score) for h in expected]


# ---- LangChain --------------------------------------------------------------------------------------


def _keyword_retriever_cls():
    from langchain_core.documents import Document as LCDocument
    from langchain_core.retrievers import BaseRetriever

    class KeywordRetriever(BaseRetriever):
        """Ranks documents by shared words; how ids come back is configurable."""

        docs: list
        k: int = 4
        id_style: str = "id"

        def _get_relevant_documents(self, query, *, run_manager):
            words = set(query.lower().split())
            ranked = sorted(self.docs, key=lambda d: -len(words & set(d.page_content.lower().split())))
            out = []
            for d in ranked[:self.k]:
                if self.id_style == "id":
                    out.append(LCDocument(page_content=d.page_content, id=d.id, metadata={"score": 1.0}))
                elif self.id_style == "metadata":
                    out.append(LCDocument(page_content=d.page_content, metadata={"id": d.id}))
                else:
                    out.append(LCDocument(page_content=d.page_content))
            return out

    return KeywordRetriever


@pytest.mark.parametrize("id_style", ["id", "metadata", "text"])
def test_any_langchain_retriever(dataset, id_style):
    pytest.importorskip("langchain_core")
    from langchain_core.documents import Document as LCDocument

    cls = _keyword_retriever_cls()
    docs = [LCDocument(page_content=d.passage, id=d.id) for d in dataset.corpus]
    lc = cls(docs=docs, id_style=id_style)
    wrapped = as_retriever(lc)
    assert isinstance(wrapped, LangChainRetriever) and wrapped.name == "KeywordRetriever"
    run = evaluate(dataset, [wrapped], FAST)
    m = run.retrievers["KeywordRetriever"]
    assert m["hit@1"] >= 0.75 and m["index_build_s"] == 0.0
    assert all(len(row["ranking"]) == 6 for row in run.rankings["KeywordRetriever"])  # k set through the field
    scores = run.rankings["KeywordRetriever"][0]["scores"]
    assert scores == ([1.0] * 6 if id_style == "id" else [-float(i) for i in range(6)])


def test_langchain_retriever_built_by_the_harness(dataset):
    pytest.importorskip("langchain_core")
    from langchain_core.vectorstores import InMemoryVectorStore

    cls = _keyword_retriever_cls()
    built = []

    def build(docs):
        built.append(docs)
        return cls(docs=docs, k=2)

    run = evaluate(dataset, [LangChainRetriever(build=build, name="kw")], FAST)
    assert built[0][0].id == "light" and built[0][0].metadata == {"id": "light", "title": "Greyhook Lighthouse"}
    assert run.retrievers["kw"]["index_build_s"] >= 0 and run.retrievers["kw"]["hit@1"] >= 0.75

    # a VectorStoreRetriever gets k through search_kwargs
    from langchain_core.embeddings import Embeddings

    class Toy(Embeddings):
        def embed_documents(self, texts):
            return ToyEmbedder().encode(texts).tolist()

        def embed_query(self, text):
            return self.embed_documents([text])[0]

    vs = LangChainRetriever(build=lambda docs: InMemoryVectorStore.from_documents(docs, Toy()).as_retriever(),
                            name="inmemory")
    run = evaluate(dataset, [vs], FAST)
    assert all(len(row["ranking"]) == 6 for row in run.rankings["inmemory"])
    with pytest.raises(InvalidInputError):
        LangChainRetriever()


def test_msa_langchain_retriever_through_the_adapter(dataset, tiny_msa):
    pytest.importorskip("langchain_core")
    from msa_integrations.langchain import MSARetriever

    wrapped = LangChainRetriever(build=lambda docs: MSARetriever.from_documents(docs, model=tiny_msa), name="msa-lc")
    direct = MSARouting(tiny_msa, show_progress=False)
    run = evaluate(dataset, [wrapped, direct], Settings(ks=(1, 5), latency_queries=1, progress=False))
    assert run.rankings["msa-lc"] == run.rankings["msa"]  # same engine, same ranking and scores


# ---- reports, plots, CLI ----------------------------------------------------------------------------


def test_report_files(dataset, tmp_path):
    pytest.importorskip("matplotlib")
    report = compare([dataset], [oracle(), RandomRanking()], FAST)
    files = write_report(report, tmp_path / "rep")
    assert sorted(p.name for p in files.values()) == ["cost.png", "rankings.jsonl", "recall_at_k.png", "report.json",
                                                      "report.md"]
    data = json.loads((tmp_path / "rep" / "report.json").read_text())
    for key in ("recall@1", "recall@5", "hit@1", "ndcg@10", "mrr", "latency_ms_p50", "latency_ms_p95",
                "index_build_s", "index_memory_bytes", "index_disk_bytes"):
        assert key in data["retrievers"]["oracle"], key
    assert data["settings"]["ks"] == [1, 2, 5] and data["environment"]["versions"]["msa"]
    assert data["retriever_settings"]["random"] == {"kind": "random", "seed": 0}
    md = (tmp_path / "rep" / "report.md").read_text()
    assert "| **oracle** | 0.875 | 1.000 | 1.000 |" in md and "*chance*" in md and "![cost](cost.png)" in md
    rows = [json.loads(line) for line in (tmp_path / "rep" / "rankings.jsonl").read_text().splitlines()]
    assert len(rows) == 8 and rows[0]["retriever"] == "oracle"
    for png in ("recall_at_k.png", "cost.png"):
        assert (tmp_path / "rep" / png).read_bytes()[:4] == b"\x89PNG"
    write_report(data, tmp_path / "again")  # a report.json re-renders
    assert (tmp_path / "again" / "report.md").read_text() == md


def _niah(tmp_path: Path, tokens: int) -> Path:
    from msa_integrations.compare.niah import NIAHSpec, generate_niah

    text = " ".join(f"Line {i} is about the {w} field." for i, w in enumerate(["red", "blue", "tall"] * 400))
    generate_niah(NIAHSpec(tokens=tokens, doc_tokens=60, queries=5), tmp_path / f"n{tokens}", haystack_text=text,
                  tokenizer="whitespace")
    return tmp_path / f"n{tokens}"


def test_memory_size_sweep(tmp_path):
    pytest.importorskip("matplotlib")
    pytest.importorskip("bm25s")
    sets = [load_dataset(_niah(tmp_path, n)) for n in (2000, 600)]
    report = compare(sets, [BM25(), RandomRanking()], FAST)
    assert [r.memory_tokens for r in report.runs] == sorted(r.memory_tokens for r in report.runs)  # by size
    data = report.to_dict()
    assert [s["memory_tokens"] for s in data["retrievers"]["bm25"]["sweep"]] == [r.memory_tokens for r in report.runs]
    assert data["retrievers"]["bm25"]["recall@1"] == report.runs[-1].retrievers["bm25"]["recall@1"]
    assert data["retrievers"]["bm25"]["recall@5"] >= 0.8  # keys are rare words: BM25 finds them
    files = write_report(report, tmp_path / "rep")
    assert {"recall_vs_memory", "latency_vs_memory"} <= set(files)
    assert "## Against memory size" in (tmp_path / "rep" / "report.md").read_text()


def test_cli_compare(data_dir, tmp_path, capsys):
    pytest.importorskip("bm25s")
    pytest.importorskip("matplotlib")
    out = tmp_path / "rep"
    code = main(["compare", "--data", str(data_dir), "--retrievers", "bm25,random", "--k", "1,5", "--out", str(out),
                 "--latency-queries", "2", "--no-progress"])
    stdout, stderr = capsys.readouterr()
    assert code == 0, stderr
    assert "| **bm25** |" in stdout and f"report written to {out}" in stderr
    data = json.loads((out / "report.json").read_text())
    assert set(data["retrievers"]) == {"bm25", "random"} and "recall@5" in data["retrievers"]["bm25"]
    assert (out / "recall_at_k.png").is_file()


def test_cli_compare_with_msa_and_a_niah_sweep(tmp_path, tiny_model_dir, capsys):
    pytest.importorskip("bm25s")
    pytest.importorskip("matplotlib")
    hay = tmp_path / "hay.txt"
    hay.write_text(" ".join(f"Line {i} is about the {w} field." for i, w in enumerate(["red", "blue"] * 300)))
    out = tmp_path / "rep"
    code = main(["compare", "--niah-sizes", "300,600", "--niah-doc-tokens", "100", "--niah-queries", "3",
                 "--haystack", str(hay), "--retrievers", "msa,bm25", "--model", str(tiny_model_dir("llama")),
                 "--out", str(out), "--latency-queries", "1", "--limit", "2", "--no-progress"])
    _, stderr = capsys.readouterr()
    assert code == 0, stderr
    data = json.loads((out / "report.json").read_text())
    assert len(data["runs"]) == 2 and data["runs"][0]["dataset"]["questions"] == 2
    assert (out / "niah" / "multikey-300" / "corpus.jsonl").is_file()
    assert (out / "latency_vs_memory.png").is_file() and (out / "recall_vs_memory.png").is_file()
    assert "--niah-sizes 300,600" in data["settings"]["command"]
    # the sets are reused on a second run, but only when they were made with the same settings
    code = main(["compare", "--niah-sizes", "300", "--niah-doc-tokens", "100", "--niah-queries", "4",
                 "--haystack", str(hay), "--retrievers", "bm25", "--out", str(out), "--no-progress"])
    assert code == 2 and "other settings" in capsys.readouterr().err


def test_cli_compare_names_missing_packages_before_any_work(data_dir, tmp_path, capsys, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "bm25s" else real(name, *a))
    assert main(["compare", "--data", str(data_dir), "--retrievers", "bm25", "--out", str(tmp_path / "r")]) == 2
    assert "pip install bm25s" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize(("argv", "message"), [
    (["compare", "--retrievers", "bm25"], "nothing to compare on"),
    (["compare", "--data", "X", "--retrievers", "bm25,faiss"], "choose among"),
    (["compare", "--data", "X", "--retrievers", "bm25,bm25"], "appears twice"),
    (["compare", "--data", "X", "--k", "1,a"], "bad --k"),
    (["compare", "--data", "X", "--k", "0,5"], "bad --k"),
    (["compare", "--data", "/nonexistent/dataset"], "no corpus.jsonl"),
])
def test_cli_compare_bad_input(argv, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_reports_name_the_running_code_version():
    """An editable install keeps the metadata version it was installed with; the report must not."""
    from msa_core import __version__
    from msa_integrations.compare.harness import environment

    assert environment()["versions"]["msa"] == __version__
