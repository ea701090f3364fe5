"""PNG plots of a comparison report (matplotlib, Agg backend: no display needed).

    recall_at_k.png          recall@k and hit@k per retriever (last run), 95% intervals shaded, chance level
    cost.png                 query latency p50/p95, index build time and index memory per retriever
    recall_vs_memory.png     recall@k against memory size in tokens (several runs only)
    latency_vs_memory.png    latency p50/p95 against memory size (several runs only)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

_COLORS = {"msa": "#d62728", "minilm": "#1f77b4", "bm25": "#2ca02c", "random": "#7f7f7f"}
_OTHER = ["#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf", "#bcbd22"]


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    plt.rcParams.update({"font.size": 11, "axes.titlesize": 12, "axes.grid": True, "grid.alpha": 0.3,
                         "savefig.dpi": 120, "figure.dpi": 120})
    return plt


def colors(names: list[str]) -> dict[str, str]:
    out, spare = {}, iter(_OTHER * 4)
    for n in names:
        out[n] = _COLORS.get(n) or next(spare)
    return out


def _fmt_tokens(n: float) -> str:
    for unit, div in (("M", 1e6), ("K", 1e3)):
        if n >= div:
            v = n / div
            return f"{v:.0f}{unit}" if v >= 10 or abs(v - round(v)) < 0.05 else f"{v:.1f}{unit}"
    return f"{n:.0f}"


def plot_recall(report: dict[str, Any], path: Path) -> Path:
    plt = _plt()
    run = report["runs"][-1]
    ks = list(report["settings"]["ks"])
    names = list(run["retrievers"])
    col = colors(names)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.4), sharey=True)
    for ax, metric, title in ((axes[0], "recall", "recall@k (share of gold documents in the top k)"),
                              (axes[1], "hit", "hit@k (a gold document in the top k)")):
        for n in names:
            m = run["retrievers"][n]
            ys = [m[f"{metric}@{k}"] for k in ks]
            label = f"{n}  ({metric}@{ks[-1]} = {ys[-1]:.2f})"
            ax.plot(range(len(ks)), ys, marker="o", lw=2, ms=6, color=col[n], label=label)
            ci = m.get("ci95", {})
            if all(f"{metric}@{k}" in ci for k in ks):  # 95% bootstrap intervals as a band
                ax.fill_between(range(len(ks)), [ci[f"{metric}@{k}"][0] for k in ks],
                                [ci[f"{metric}@{k}"][1] for k in ks], color=col[n], alpha=0.15, lw=0)
        chance = [run["chance"][f"{metric}@{k}"] for k in ks]
        ax.plot(range(len(ks)), chance, ls="--", color="#555555", lw=1.2, label="chance")
        ax.set_xticks(range(len(ks)), [str(k) for k in ks])
        ax.set_xlim(-0.2, len(ks) - 0.8)
        ax.legend(loc="best", fontsize=9)
        ax.set_xlabel("k")
        ax.set_ylim(0, 1.02)
        ax.set_title(title)
    axes[0].set_ylabel("share of questions (averaged)")
    ds = run["dataset"]
    fig.suptitle(f"{ds['name']}: {ds['questions']} questions, {ds['documents']} documents"
                 + (f", {_fmt_tokens(run['memory_tokens'])} tokens" if run.get("memory_tokens") else ""))
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def _short(v: float) -> str:
    return f"{v:.3g}" if v < 1000 else f"{v:,.0f}"


def plot_cost(report: dict[str, Any], path: Path) -> Path:
    plt = _plt()
    run = report["runs"][-1]
    names = list(run["retrievers"])
    col = colors(names)
    fig, axes = plt.subplots(1, 3, figsize=(13, 0.55 * len(names) + 2.4))
    ys = list(range(len(names)))[::-1]
    panels = [("latency_ms_p50", "query latency (ms): bar p50, tick p95 (p50 / p95)", 1.0),
              ("index_build_s", "index build (s)", 1.0),
              ("index_memory_bytes", "index in memory (MB)", 1e-6)]
    for ax, (key, title, scale) in zip(axes, panels):
        vals = [run["retrievers"][n].get(key) for n in names]
        shown = [(v or 0) * scale for v in vals]
        ax.barh(ys, shown, color=[col[n] for n in names], height=0.6)
        if key == "latency_ms_p50":
            p95 = [(run["retrievers"][n].get("latency_ms_p95") or 0) for n in names]
            ax.scatter(p95, ys, marker="|", s=400, color="black", zorder=3)
            shown = [max(a, b) for a, b in zip(shown, p95)]
        positive = [v for v in shown if v > 0]
        if positive and max(positive) / min(positive) > 50:
            ax.set_xscale("log")
        for i, (y, v, raw) in enumerate(zip(ys, shown, vals)):
            label = "n/a" if raw is None else _short(raw * scale)
            if key == "latency_ms_p50" and raw is not None:
                label = f"{label} / {_short(p95[i])}"
            ax.annotate(label, (v if v > 0 else 0, y), textcoords="offset points", xytext=(4, -4), fontsize=9)
        ax.set_yticks(ys, names)
        ax.set_title(title)
        ax.margins(x=0.25)
    fig.suptitle(f"cost on {run['dataset']['name']} ({report['environment'].get('device', 'cpu')}, "
                 f"{report['environment'].get('torch_threads', '?')} threads)")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def _sweep(report: dict[str, Any]) -> tuple[list[str], dict[str, list[tuple[int, dict[str, Any]]]]]:
    names: list[str] = []
    series: dict[str, list[tuple[int, dict[str, Any]]]] = {}
    for run in report["runs"]:
        for n, m in run["retrievers"].items():
            if n not in names:
                names.append(n)
            series.setdefault(n, []).append((run["memory_tokens"], m))
    return names, series


def plot_recall_vs_memory(report: dict[str, Any], path: Path) -> Path:
    plt = _plt()
    ks = list(report["settings"]["ks"])[:4]
    names, series = _sweep(report)
    col = colors(names)
    fig, axes = plt.subplots(1, len(ks), figsize=(3.6 * len(ks) + 1, 4), sharey=True, squeeze=False)
    for ax, k in zip(axes[0], ks):
        for n in names:
            pts = sorted(series[n], key=lambda p: p[0])
            ax.plot([p[0] for p in pts], [p[1][f"recall@{k}"] for p in pts], marker="o", lw=2, color=col[n], label=n)
        chance = sorted((r["memory_tokens"], r["chance"][f"recall@{k}"]) for r in report["runs"])
        ax.plot([c[0] for c in chance], [c[1] for c in chance], ls="--", color="#555555", lw=1.2, label="chance")
        ax.set_xscale("log")
        ax.set_ylim(0, 1.02)
        ax.set_title(f"recall@{k}")
        ax.set_xlabel("memory size (tokens)")
        ticks = sorted({r["memory_tokens"] for r in report["runs"]})
        ax.set_xticks(ticks, [_fmt_tokens(t) for t in ticks])
        ax.minorticks_off()
    axes[0][0].set_ylabel("recall (averaged over questions)")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="center right", fontsize=10)
    fig.suptitle("recall against memory size")
    fig.tight_layout(rect=(0, 0, 1 - 1.3 / fig.get_figwidth(), 1))
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_latency_vs_memory(report: dict[str, Any], path: Path) -> Path:
    plt = _plt()
    names, series = _sweep(report)
    col = colors(names)
    fig, ax = plt.subplots(figsize=(7.5, 4.6))
    for n in names:
        pts = sorted((p for p in series[n] if p[1].get("latency_ms_p50") is not None), key=lambda p: p[0])
        if not pts:
            continue
        xs = [p[0] for p in pts]
        ax.plot(xs, [p[1]["latency_ms_p50"] for p in pts], marker="o", lw=2, color=col[n], label=f"{n} p50")
        ax.plot(xs, [p[1]["latency_ms_p95"] for p in pts], marker="x", lw=1.2, ls="--", color=col[n],
                label=f"{n} p95")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ticks = sorted({r["memory_tokens"] for r in report["runs"]})
    ax.set_xticks(ticks, [_fmt_tokens(t) for t in ticks])
    ax.minorticks_off()
    ax.set_xlabel("memory size (tokens)")
    ax.set_ylabel("single-question latency (ms)")
    ax.set_title(f"query latency against memory size ({report['environment'].get('device', 'cpu')})")
    ax.legend(fontsize=9, ncol=2)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def write_plots(report: dict[str, Any], out_dir: Path) -> list[Path]:
    out = [plot_recall(report, out_dir / "recall_at_k.png"), plot_cost(report, out_dir / "cost.png")]
    if len(report["runs"]) > 1 and all(r.get("memory_tokens") for r in report["runs"]):
        out += [plot_recall_vs_memory(report, out_dir / "recall_vs_memory.png"),
                plot_latency_vs_memory(report, out_dir / "latency_vs_memory.png")]
    return out
