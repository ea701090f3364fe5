"""Writing a comparison report: report.json, report.md (tables), rankings.jsonl and PNG plots.

report.json holds {"retrievers": {NAME: {"recall@K", "hit@K", "ndcg@10", "mrr", "ci95": {metric: [low,
high]}, "latency_ms_p50", "latency_ms_p95", "index_build_s", "index_memory_bytes", "index_disk_bytes", ...}},
"comparisons": {metric: [{"a", "b", "diff", "diff_ci", "p_value", "p_ttest", "p_holm", "significant"}]},
"statistics" (how), "runs": [...], "chance", "settings", "retriever_settings", "environment"}; with several
datasets (memory sizes) "retrievers" is the largest run's and each retriever also carries its "sweep".
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from .harness import Report


def write_report(report: Report | dict[str, Any], out_dir: str | os.PathLike[str], *,
                 plots: bool = True) -> dict[str, Path]:
    """Write the report files into out_dir (created; our files in it are replaced); a report.json dict
    re-renders report.md and the plots (no rankings.jsonl). Returns the paths written."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    data = report.to_dict() if isinstance(report, Report) else report
    files: dict[str, Path] = {}
    images: list[Path] = []
    if plots:
        from .plots import write_plots

        images = write_plots(data, out)
        files.update({p.stem: p for p in images})
    files["json"] = _atomic_text(out / "report.json", json.dumps(data, indent=2, ensure_ascii=False) + "\n")
    files["md"] = _atomic_text(out / "report.md", render_markdown(data, [p.name for p in images]))
    if isinstance(report, Report):
        lines = []
        for run in report.runs:
            for name, rows in run.rankings.items():
                lines += [json.dumps({"dataset": run.dataset["name"], "retriever": name, **row}, ensure_ascii=False)
                          for row in rows]
        files["rankings"] = _atomic_text(out / "rankings.jsonl", "\n".join(lines) + "\n")
    return files


def _atomic_text(path: Path, text: str) -> Path:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
    return path


# ---- markdown ------------------------------------------------------------------------------------


def _num(v: Any, digits: int = 3) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, int):
        return f"{v:,}"
    return f"{v:.{digits}f}"


def _bytes(v: Any) -> str:
    if v is None:
        return "n/a"
    for unit, div in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if v >= div:
            return f"{v / div:.1f} {unit}"
    return f"{v} B"


def _ms(v: Any) -> str:
    return "n/a" if v is None else (f"{v:.2f}" if v < 10 else f"{v:,.1f}")


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" if i == 0 else "---:" for i in range(len(header)))
           + "|"]
    return out + ["| " + " | ".join(r) + " |" for r in rows]


def quality_table(run: dict[str, Any], ks: list[int], ndcg_k: int = 10, chance: bool = True) -> list[str]:
    header = ["retriever", *[f"recall@{k}" for k in ks], *[f"hit@{k}" for k in ks], f"nDCG@{ndcg_k}", "MRR"]
    rows = [[f"**{n}**", *[_num(m[f"recall@{k}"]) for k in ks], *[_num(m[f"hit@{k}"]) for k in ks],
             _num(m[f"ndcg@{ndcg_k}"]), _num(m["mrr"])] for n, m in run["retrievers"].items()]
    if chance and run.get("chance"):
        c = run["chance"]
        rows.append(["*chance*", *[_num(c[f"recall@{k}"]) for k in ks], *[_num(c[f"hit@{k}"]) for k in ks], "", ""])
    return _table(header, rows)


def _ci(m: dict[str, Any], metric: str) -> str:
    low_high = m.get("ci95", {}).get(metric)
    return _num(m[metric]) + (f" [{low_high[0]:.3f}, {low_high[1]:.3f}]" if low_high else "")


def interval_table(run: dict[str, Any], ks: list[int], ndcg_k: int = 10) -> list[str]:
    """Means with their 95% bootstrap intervals (empty for reports written before intervals existed)."""
    if not any("ci95" in m for m in run["retrievers"].values()):
        return []
    metrics = [*[f"recall@{k}" for k in ks], f"ndcg@{ndcg_k}", "mrr"]
    rows = [[f"**{n}**", *[_ci(m, x) for x in metrics]] for n, m in run["retrievers"].items()]
    return _table(["retriever", *metrics], rows)


def comparison_table(run: dict[str, Any], ks: list[int], ndcg_k: int = 10) -> list[str]:
    """Paired differences a - b with interval, randomisation and t-test p-values, Holm-corrected p."""
    comparisons = run.get("comparisons") or {}
    rows = []
    for metric in [*[f"recall@{k}" for k in ks], f"ndcg@{ndcg_k}", "mrr"]:
        for c in comparisons.get(metric, []):
            rows.append([metric, f"{c['a']} − {c['b']}", f"{c['diff']:+.3f} [{c['diff_ci'][0]:+.3f}, "
                         f"{c['diff_ci'][1]:+.3f}]", _p(c["p_value"]), _p(c["p_ttest"]), _p(c["p_holm"]),
                         "**yes**" if c["significant"] else "no"])
    if not rows:
        return []
    return _table(["metric", "pair", "difference [95% CI]", "p (randomisation)", "p (t-test)", "p (Holm)",
                   "significant"], rows)


def _p(v: float) -> str:
    return "< 0.0001" if v < 1e-4 else f"{v:.4f}"


def cost_table(run: dict[str, Any]) -> list[str]:
    header = ["retriever", "index build (s)", "tokens/s", "index memory", "index on disk", "model weights",
              "latency p50 (ms)", "latency p95 (ms)", "batched questions/s"]
    rows = []
    for n, m in run["retrievers"].items():
        build = ("prebuilt" if m.get("index_prebuilt") else
                 _num(m["index_build_s"], 2) + (" (cached)" if m.get("index_cached") else ""))
        rows.append([f"**{n}**", build, _num(m.get("encode_tokens_per_s"), 0), _bytes(m.get("index_memory_bytes")),
                     _bytes(m.get("index_disk_bytes")), _bytes(m.get("model_bytes")), _ms(m.get("latency_ms_p50")),
                     _ms(m.get("latency_ms_p95")), _num(m.get("batch_qps"), 1)])
    return _table(header, rows)


def answer_table(run: dict[str, Any]) -> list[str]:
    cols = [c for c in ("em_hybrid", "f1_hybrid", "niah_hybrid", "em_latent", "f1_latent", "niah_latent")
            if any(c in m for m in run["retrievers"].values())]
    if not cols:
        return []
    names = {"em": "EM", "f1": "F1", "niah": "NIAH string match"}
    header = ["retriever", *[f"{names[c.split('_')[0]]} {c.split('_')[1]}" for c in cols]]
    rows = [[f"**{n}**", *[_num(m.get(c)) if c in m else "—" for c in cols]] for n, m in run["retrievers"].items()]
    return _table(header, rows)


def sweep_table(data: dict[str, Any], ks: list[int]) -> list[str]:
    header = ["memory (tokens)", "documents", "retriever", *[f"recall@{k}" for k in ks], "latency p50 (ms)",
              "latency p95 (ms)", "index build (s)", "index memory"]
    rows = []
    for run in data["runs"]:
        for n, m in run["retrievers"].items():
            rows.append([_num(run.get("memory_tokens")), _num(run["dataset"]["documents"]), n,
                         *[_num(m[f"recall@{k}"]) for k in ks], _ms(m.get("latency_ms_p50")),
                         _ms(m.get("latency_ms_p95")), _num(m["index_build_s"], 2),
                         _bytes(m.get("index_memory_bytes"))])
    return _table(header, rows)


def render_markdown(data: dict[str, Any], images: list[str] | None = None) -> str:
    s, env = data["settings"], data["environment"]
    ks = list(s["ks"])
    runs = data["runs"]
    last = runs[-1]
    ds = last["dataset"]
    title = ds["name"] if len(runs) == 1 else f"{len(runs)} memory sizes ({runs[0]['dataset']['name']} … {ds['name']})"
    lines = [f"# Retrieval A/B comparison: {title}", ""]
    for run in runs:
        d = run["dataset"]
        cut = d.get("cut")
        cut_note = (f" (cut: first {cut['questions']} of {cut['of_questions']} questions, first {cut['documents']} of "
                    f"{cut['of_documents']} documents)" if cut else "")
        tokens = (f", {run['memory_tokens']:,} tokens ({run.get('token_counter', '?')})"
                  if run.get("memory_tokens") else "")
        lines.append(f"- **{d['name']}**: {d['questions']} questions, {d['documents']} documents{tokens}, "
                     f"{d.get('gold_per_question', 0):.2f} gold documents per question{cut_note}")
    versions = ", ".join(f"{k} {v}" for k, v in env.get("versions", {}).items())
    lines += [f"- created {data['created_at']} on {env.get('device', 'cpu')} ({env.get('processor', '')}, "
              f"{env.get('cpu_count')} CPUs, {env.get('torch_threads', '?')} torch threads); {versions}"]
    if s.get("command"):
        lines.append(f"- command: `{s['command']}`")
    if s.get("note"):
        lines.append(f"- note: {s['note']}")
    lines.append("")
    for run in runs:
        heading = "" if len(runs) == 1 else f" — {run['dataset']['name']}"
        lines += [f"## Retrieval quality{heading}", "", *quality_table(run, ks, s.get("ndcg_k", 10)), ""]
        intervals = interval_table(run, ks, s.get("ndcg_k", 10))
        if intervals:
            lines += [f"### 95% confidence intervals{heading}", "", *intervals, ""]
        paired = comparison_table(run, ks, s.get("ndcg_k", 10))
        if paired:
            lines += [f"### Paired comparisons{heading}", "", *paired, ""]
        lines += [f"## Cost{heading}", "", *cost_table(run), ""]
        answers = answer_table(run)
        if answers:
            n = max((m.get("answered_questions", 0) for m in run["retrievers"].values()), default=0)
            lines += [f"## Answers{heading} (first {n} questions)", "", *answers, ""]
    if len(runs) > 1:
        lines += ["## Against memory size", "", *sweep_table(data, ks), ""]
    if images:
        lines += ["## Plots", ""] + [f"![{Path(p).stem}]({p})" for p in images] + [""]
    lines += ["## How this was measured", "",
              f"- Rankings at depth {s['depth']} for every question, `search()` called with {s['batch_size']} "
              "questions at a time (batched questions/s is that pass's throughput).",
              f"- Latency: wall time of `search()` on one question, over the first {s['latency_queries']} "
              "questions after one uncounted warm-up query; p50/p95 interpolate linearly.",
              "- recall@k: share of a question's gold documents in its top k, averaged over questions; hit@k: share "
              "of questions with a gold document in the top k; nDCG@10 with binary relevance; MRR over the "
              f"top {s['depth']}. *chance* is the expectation under a uniformly random ranking.",
              "- Index memory counts the structures searched (MSA: pooled K̄, V̄, K̄_R and chunk maps; FAISS: the "
              "vectors; BM25: the sparse score matrix and vocabulary), not the raw text; model weights are listed "
              "apart. On disk: the saved index folder or file.",
              "- Every retriever indexes the same passages (title on its own line, then the text)."]
    if data.get("statistics"):
        st = data["statistics"]
        lines.append(f"- Intervals: {st['ci']}. Paired comparisons: {st['test']}; {st['correction']}; "
                     f"significant: Holm-corrected p < {st['alpha']}. One dataset's questions are the sample: the "
                     "intervals say how much the numbers would move with other questions like these, not with "
                     "other kinds of questions.")
    if s.get("answers"):
        lines.append(f"- Answers: hybrid = the top {s['answer_k']} passages in MSAModel's hybrid prompt for one "
                     f"shared generator (greedy, {s['max_new_tokens']} new tokens); latent = MSAModel.answer with "
                     "routed memory. EM and F1 use SQuAD's normalisation.")
    lines += ["", "### Retriever settings", ""]
    for name, desc in data.get("retriever_settings", {}).items():
        lines.append(f"- **{name}**: " + ", ".join(f"{k}={v}" for k, v in desc.items()))
    return "\n".join(lines) + "\n"
