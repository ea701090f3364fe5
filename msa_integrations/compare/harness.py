"""The A/B harness: every retriever indexes the same corpus and answers the same questions.

    from msa_integrations.compare import compare, load_dataset, write_report
    report = compare([load_dataset("../shared/data/eval/hotpotqa100")], ["msa", "minilm", "bm25"])
    write_report(report, "report-dir")          # report.json, report.md, PNG plots

For each dataset and retriever: index (timed; sizes in memory and on disk), rank every question at
depth max(k, 10) in batches (timed: batched throughput), then time single-question searches (one
warm-up query first, not counted) for the latency percentiles, and score recall@k, hit@k, nDCG@10
and MRR, each with a 95% bootstrap interval; every pair of retrievers is compared question by
question (randomisation test, Holm-corrected: stats.py). With `answers=N` the first N questions are also answered: in hybrid mode by every retriever
(its top `answer_k` passages in MSAModel's hybrid prompt, one shared generator: the MSA backbone
without memory unless another is given) and in latent mode by MSA; exact match and token F1 (SQuAD
normalisation), plus RULER's string match on NIAH sets.
"""

from __future__ import annotations

import datetime as _dt
import os
import platform
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from msa_core.errors import InvalidInputError

from .dataset import Dataset
from .metrics import chance_metrics, exact_match, latency_summary, per_question_metrics, token_f1
from .retrievers import Hits, IndexStats, Retriever, TextGenerator, as_retriever
from .stats import summarize

NDCG_K = 10


@dataclass
class Settings:
    ks: tuple[int, ...] = (1, 2, 5, 10)
    batch_size: int = 16  # questions per search() call when ranking every question
    latency_queries: int = 50  # single-question searches timed (after one warm-up)
    answers: int = 0  # questions answered (0: retrieval only)
    answer_k: int = 5  # passages in the hybrid prompt
    max_new_tokens: int = 32
    progress: bool = True

    @property
    def depth(self) -> int:
        return max(max(self.ks), NDCG_K)

    def check(self) -> None:
        if not self.ks or any((not isinstance(k, int)) or k < 1 for k in self.ks):
            raise InvalidInputError(f"ks must be integers >= 1, got {self.ks}")
        for name in ("batch_size", "answer_k", "max_new_tokens"):
            if getattr(self, name) < 1:
                raise InvalidInputError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("latency_queries", "answers"):
            if getattr(self, name) < 0:
                raise InvalidInputError(f"{name} must be >= 0, got {getattr(self, name)}")


@dataclass
class RunResult:
    """One dataset: its summary, each retriever's metrics and rankings."""

    dataset: dict[str, Any]
    memory_tokens: int | None
    token_counter: str
    retrievers: dict[str, dict[str, Any]] = field(default_factory=dict)
    chance: dict[str, float] = field(default_factory=dict)
    rankings: dict[str, list[dict[str, Any]]] = field(default_factory=dict)  # per retriever, per question
    per_question: dict[str, dict[str, list[float]]] = field(default_factory=dict)  # retriever -> metric -> values
    comparisons: dict[str, list[dict[str, Any]]] = field(default_factory=dict)  # metric -> paired tests
    statistics: dict[str, Any] = field(default_factory=dict)  # how the intervals and tests were made


@dataclass
class Report:
    runs: list[RunResult]
    settings: dict[str, Any]
    environment: dict[str, Any]
    retriever_settings: dict[str, dict[str, Any]]
    created_at: str

    def to_dict(self) -> dict[str, Any]:
        """The report.json content. "retrievers" is the last (largest) run's; "runs" holds every run."""
        last = self.runs[-1]
        retrievers = {name: dict(m) for name, m in last.retrievers.items()}
        if len(self.runs) > 1:
            for name, m in retrievers.items():
                m["sweep"] = [{"memory_tokens": r.memory_tokens, "dataset": r.dataset["name"], **r.retrievers[name]}
                              for r in self.runs if name in r.retrievers]
        return {"retrievers": retrievers, "dataset": last.dataset, "memory_tokens": last.memory_tokens,
                "chance": last.chance, "comparisons": last.comparisons, "statistics": last.statistics,
                "runs": [{"dataset": r.dataset, "memory_tokens": r.memory_tokens, "token_counter": r.token_counter,
                          "retrievers": r.retrievers, "chance": r.chance, "comparisons": r.comparisons}
                         for r in self.runs],
                "settings": self.settings, "retriever_settings": self.retriever_settings,
                "environment": self.environment, "created_at": self.created_at}


def _bar(total: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, disable=not enabled, file=sys.stderr, leave=False, dynamic_ncols=True)


def _say(message: str) -> None:
    print(f"[msa compare] {message}", file=sys.stderr, flush=True)


def rank_all(retriever: Retriever, questions: Sequence[str], depth: int, batch_size: int,
             progress: bool = True) -> tuple[Hits, float]:
    """Every question's ranking, searched in batches; and the seconds it took."""
    hits: Hits = []
    started = time.perf_counter()
    with _bar(len(questions), f"{retriever.name}: ranking", progress) as bar:
        for i in range(0, len(questions), batch_size):
            batch = list(questions[i:i + batch_size])
            got = retriever.search(batch, depth)
            if len(got) != len(batch):
                raise InvalidInputError(f"{retriever.name}.search returned {len(got)} rankings for {len(batch)} "
                                        "questions")
            hits.extend(got)
            bar.update(len(batch))
    return hits, time.perf_counter() - started


def time_queries(retriever: Retriever, questions: Sequence[str], depth: int, n: int,
                 progress: bool = True) -> list[float]:
    """Seconds of single-question searches over the first n questions, after one uncounted warm-up."""
    if n == 0 or not questions:
        return []
    retriever.search([questions[0]], depth)  # warm-up: lazy allocations, caches
    times = []
    picked = list(questions[:n])
    with _bar(len(picked), f"{retriever.name}: latency", progress) as bar:
        for q in picked:
            started = time.perf_counter()
            retriever.search([q], depth)
            times.append(time.perf_counter() - started)
            bar.update(1)
    return times


def evaluate(dataset: Dataset, retrievers: Sequence[Any], settings: Settings | None = None, *,
             generator: TextGenerator | None = None,
             token_counter: Callable[[Sequence[str]], int] | None = None) -> RunResult:
    """Index, rank, time and score every retriever on one dataset."""
    settings = settings or Settings()
    settings.check()
    rets = _unique([as_retriever(r) for r in retrievers])
    questions = [q.question for q in dataset.queries]
    golds = [q.gold_ids for q in dataset.queries]
    tokens, counter = _memory_tokens(dataset, rets, token_counter)
    result = RunResult(dataset.summary(), tokens, counter,
                       chance=chance_metrics(len(dataset.corpus), [len(g) for g in golds], settings.ks))
    for r in rets:
        _say(f"{r.name}: indexing {len(dataset.corpus)} documents of {dataset.name}")
        started = time.perf_counter()
        stats = r.index(dataset.corpus)
        wall = time.perf_counter() - started
        stats = stats if isinstance(stats, IndexStats) else IndexStats(len(dataset.corpus))
        build_s = stats.build_s if stats.build_s is not None else wall
        sizes = r.size_bytes()
        hits, rank_s = rank_all(r, questions, settings.depth, settings.batch_size, settings.progress)
        times = time_queries(r, questions, settings.depth, settings.latency_queries, settings.progress)
        rankings = [[doc for doc, _ in row] for row in hits]
        result.per_question[r.name] = per_question_metrics(rankings, golds, settings.ks, NDCG_K)
        metrics: dict[str, Any] = {m: sum(v) / len(v) for m, v in result.per_question[r.name].items()}
        if times:
            metrics.update(latency_summary(times))
        metrics.update({
            "latency_queries": len(times), "batch_qps": len(questions) / rank_s if rank_s > 0 else None,
            "index_build_s": build_s, "index_cached": stats.cached,
            "index_memory_bytes": sizes.get("memory"), "index_disk_bytes": sizes.get("disk"),
            "model_bytes": _model_bytes(r), "documents": stats.documents, "questions": len(questions)})
        metrics.update({f"index_{k}": v for k, v in stats.extra.items()})
        if stats.tokens is not None:
            metrics["index_tokens"] = stats.tokens
            metrics["encode_tokens_per_s"] = stats.tokens / build_s if build_s else None
        result.retrievers[r.name] = metrics
        result.rankings[r.name] = [{"id": q.id, "gold_ids": list(q.gold_ids),
                                    "ranking": [d for d, _ in row[:settings.depth]],
                                    "scores": [round(float(s), 6) for _, s in row[:settings.depth]]}
                                   for q, row in zip(dataset.queries, hits)]
        _say(f"{r.name}: " + ", ".join(f"recall@{k} {metrics[f'recall@{k}']:.3f}" for k in settings.ks)
             + (f"; latency p50 {metrics['latency_ms_p50']:.1f} ms" if times else ""))
    stats = summarize(result.per_question)
    for name, intervals in stats["ci95"].items():
        result.retrievers[name]["ci95"] = intervals
    result.comparisons, result.statistics = stats["comparisons"], stats["method"]
    if settings.answers:
        _score_answers(dataset, rets, result, settings, generator)
    return result


def compare(datasets: Sequence[Dataset] | Dataset, retrievers: Sequence[Any], settings: Settings | None = None, *,
            generator: TextGenerator | None = None,
            token_counter: Callable[[Sequence[str]], int] | None = None,
            note: str | None = None, command: str | None = None) -> Report:
    """`evaluate` on each dataset (e.g. one per memory size; sorted by size when sizes are known).

    note: free text for the report (e.g. what else ran on the machine); command: how it was run."""
    settings = settings or Settings()
    datasets = [datasets] if isinstance(datasets, Dataset) else list(datasets)
    if not datasets:
        raise InvalidInputError("no dataset to compare on")
    rets = _unique([as_retriever(r) for r in retrievers])
    if not rets:
        raise InvalidInputError("no retriever to compare")
    runs = [evaluate(ds, rets, settings, generator=generator, token_counter=token_counter) for ds in datasets]
    if len(runs) > 1 and all(r.memory_tokens is not None for r in runs):
        runs.sort(key=lambda r: r.memory_tokens)
    extra = {k: v for k, v in (("note", note), ("command", command)) if v}
    return Report(runs, {**asdict(settings), "depth": settings.depth, "ndcg_k": NDCG_K, **extra},
                  environment(), {r.name: _describe(r) for r in rets},
                  _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"))


# ---- answers ---------------------------------------------------------------------------------------


def hybrid_prompt(question: str, passages: Sequence[str]) -> str:
    """MSAModel's hybrid prompt, so every retriever's passages reach the generator the same way."""
    from msa_core.inference.generate import HYBRID_INSTRUCTION

    documents = "\n\n".join(f"Document [{i + 1}]: {p}" for i, p in enumerate(passages))
    return HYBRID_INSTRUCTION.format(documents=documents, question=question)


def _score_answers(dataset: Dataset, rets: list[Retriever], result: RunResult, settings: Settings,
                   generator: TextGenerator | None) -> None:
    queries = [q for q in dataset.queries[:settings.answers] if q.answers]
    if not queries:
        _say("no question has an expected answer: answer metrics skipped")
        return
    generator = generator or _default_generator(rets, settings.max_new_tokens)
    passages = {d.id: d.passage for d in dataset.corpus}
    for r in rets:
        modes = ["hybrid"] + (["latent"] if "latent" in getattr(r, "answer_modes", ()) else [])
        rows = {row["id"]: row for row in result.rankings[r.name]}
        m = result.retrievers[r.name]
        for mode in modes:
            preds = []
            with _bar(len(queries), f"{r.name}: {mode} answers", settings.progress) as bar:
                for q in queries:
                    if hasattr(r, "answer"):
                        pred = r.answer(q.question, mode, k=settings.answer_k, generator=generator,
                                        max_new_tokens=settings.max_new_tokens)
                    else:
                        top = [passages[d] for d in rows[q.id]["ranking"][:settings.answer_k]]
                        pred = generator(hybrid_prompt(q.question, top))
                    preds.append(pred)
                    rows[q.id][f"answer_{mode}"] = pred
                    bar.update(1)
            m[f"em_{mode}"] = sum(exact_match(p, q.answers) for p, q in zip(preds, queries)) / len(queries)
            m[f"f1_{mode}"] = sum(token_f1(p, q.answers) for p, q in zip(preds, queries)) / len(queries)
            if dataset.generated_by_niah:
                from msa_integrations.compare.niah import score_answer

                m[f"niah_{mode}"] = sum(score_answer(p, q.answers) for p, q in zip(preds, queries)) / len(queries)
        m["answered_questions"] = len(queries)


def _default_generator(rets: list[Retriever], max_new_tokens: int) -> TextGenerator:
    for r in rets:
        if hasattr(r, "generator"):
            return r.generator(max_new_tokens)
    from .retrievers import MSARouting

    _say("answers asked: loading the default MSA model as the shared generator")
    return MSARouting().generator(max_new_tokens)


# ---- helpers ---------------------------------------------------------------------------------------


def _unique(rets: list[Retriever]) -> list[Retriever]:
    names = [r.name for r in rets]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise InvalidInputError(f"two retrievers are named {dup[0]!r}; give each a distinct name")
    return rets


def _memory_tokens(dataset: Dataset, rets: list[Retriever],
                   counter: Callable[[Sequence[str]], int] | None) -> tuple[int | None, str]:
    """The corpus size in tokens: the generator's count (dataset.json), else `counter`, else the MSA
    retriever's tokenizer, else whitespace words."""
    if dataset.info.get("tokens"):
        return int(dataset.info["tokens"]), str(dataset.info.get("tokenizer", "dataset.json"))
    texts = [d.passage for d in dataset.corpus]
    if counter is not None:
        return int(counter(texts)), getattr(counter, "__name__", "counter")
    for r in rets:
        if hasattr(r, "count_tokens"):
            return int(r.count_tokens(texts)), f"{r.name} tokenizer"
    return sum(len(t.split()) for t in texts), "whitespace words"


def _model_bytes(r: Retriever) -> int | None:
    fn = getattr(r, "model_bytes", None)
    value = fn() if callable(fn) else None
    return None if value is None else int(value)


def _describe(r: Retriever) -> dict[str, Any]:
    fn = getattr(r, "describe", None)
    try:
        return fn() if callable(fn) else {"kind": type(r).__name__}
    except Exception as exc:  # noqa: BLE001 - a description is informative, never fatal
        return {"kind": type(r).__name__, "describe_error": str(exc)}


def environment() -> dict[str, Any]:
    """Device, thread count and package versions, for the report."""
    import importlib.metadata as md

    env: dict[str, Any] = {"python": platform.python_version(), "platform": platform.platform(),
                           "processor": platform.processor() or platform.machine(), "cpu_count": os.cpu_count()}
    try:
        import torch

        env["torch_threads"] = torch.get_num_threads()
        env["device"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    except ImportError:
        env["device"] = "cpu"
    from msa_core import __version__

    # The code's own version: an editable install keeps the metadata of the day it was installed.
    versions = {"msa": __version__}
    for pkg in ("torch", "transformers", "sentence-transformers", "faiss-cpu", "bm25s", "PyStemmer",
                "langchain-core", "numpy"):
        try:
            versions[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    env["versions"] = versions
    return env
