"""Bank commands: `msa index`, `add`, `delete`, `info`, `query`, `ask`."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from .common import (
    check_target,
    checked_question,
    describe_used,
    documents,
    encode_summary,
    filter_option,
    float_in,
    fusion_options,
    load_bank,
    load_model,
    load_model_and_bank,
    lock_option,
    model_options,
    model_ref,
    out,
    parse_filters,
    positive_int,
    preview,
    read_sidecar,
    router_ref,
    say,
    stream_to_stdout,
    symlinks_option,
    write_sidecar,
)


def cmd_index(args: argparse.Namespace) -> int:
    from ..config import EncodeConfig, MSAConfig
    from ..memory.corpus import read_corpus

    records = read_corpus(args.corpus, follow_symlinks=args.follow_symlinks)
    check_target(args.bank, args.overwrite)
    encode = {k: v for k, v in (("chunk_size", args.chunk_size), ("max_doc_tokens", args.max_doc_tokens),
                                ("batch_size", args.batch_size)) if v is not None}
    router = router_ref(args.router)
    model = load_model(model_ref(args.model), router, MSAConfig(encode=EncodeConfig(**encode)), args.profile)
    texts, ids, metas = documents(records)
    started = time.perf_counter()
    bank = model.index(texts, ids, metas, show_progress_bar=not args.no_progress)
    seconds = time.perf_counter() - started
    bank.save(args.bank)
    write_sidecar(args.bank, router)
    info = bank.info()
    say(encode_summary(f"indexed {len(records)} documents", info, info["tokens"], seconds) + f" -> {args.bank}")
    return 0


def cmd_add(args: argparse.Namespace) -> int:
    from ..memory.corpus import read_corpus
    from ..memory.locking import bank_lock

    # all validated before the bank is touched
    records = read_corpus(args.corpus, follow_symlinks=args.follow_symlinks)
    model, _ = load_model_and_bank(args.bank, args.model, args.router)
    texts, ids, metas = documents(records)
    # Load, add and save under the bank's write lock: another writer's documents are never saved over.
    with bank_lock(args.bank, timeout=args.lock_timeout, on_wait=say):
        bank = load_bank(args.bank)
        model.check_bank(bank)
        replaced = sum(i in bank for i in ids)
        started = time.perf_counter()
        model.add(bank, texts, ids, metas, show_progress_bar=not args.no_progress)
        seconds = time.perf_counter() - started
        bank.save(args.bank)
    tokens = sum(d["n_tokens"] for d in bank.get(ids))
    say(encode_summary(f"added {len(ids) - replaced} new and replaced {replaced} documents", bank.info(), tokens,
                       seconds))
    return 0


def cmd_delete(args: argparse.Namespace) -> int:
    from ..memory.locking import bank_lock

    load_bank(args.bank)  # a clear error for a folder that is no bank, before a lock file is made there
    with bank_lock(args.bank, timeout=args.lock_timeout, on_wait=say):
        bank = load_bank(args.bank)
        missing = [i for i in dict.fromkeys(args.ids) if i not in bank]
        deleted = bank.delete(args.ids)
        if deleted:
            bank.save(args.bank)
    if missing:
        say(f"not found (nothing deleted for them): {', '.join(missing)}")
    out(f"deleted {deleted} document{'s' * (deleted != 1)}; {len(bank)} remain")
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    bank = load_bank(args.bank)
    info = {**bank.info(), "router": read_sidecar(args.bank).get("router") or "the model's own",
            "path": str(Path(args.bank).resolve())}
    if args.json:
        out(json.dumps(info, indent=2))
    else:
        width = max(len(k) for k in info)
        for key, value in info.items():
            shown = f"{value:,}" if isinstance(value, int) and not isinstance(value, bool) else value
            out(f"{key + ':':<{width + 1}} {shown}")
    return 0


def cmd_query(args: argparse.Namespace) -> int:
    text = checked_question(args.question)
    filt = parse_filters(args.filter)
    model, bank = load_model_and_bank(args.bank, args.model, args.router)
    hits = model.retrieve(text, bank, k=args.k, filter=filt, fusion=args.fusion, alpha=args.alpha)
    if args.json:
        out(json.dumps([h.to_dict() for h in hits], indent=2, ensure_ascii=False))
        return 0
    if not hits:
        say("no document matches" + (" the filter" if filt else ": the bank is empty"))
    for rank, hit in enumerate(hits, 1):
        title = hit.metadata.get("title")
        sides = "" if hit.latent_score is None else f" (routing {hit.latent_score:+.4f}, BM25 {hit.lexical_score:.3f})"
        out(f"{rank:>2}. {hit.score:+.4f}{sides}  {hit.id}" + (f"  {title}" if title else ""))
        out(f"    {preview(hit.text)}")
    return 0


def cmd_ask(args: argparse.Namespace) -> int:
    text = checked_question(args.question)
    filt = parse_filters(args.filter)
    model, bank = load_model_and_bank(args.bank, args.model, args.router)
    if len(bank) == 0:
        say("the bank is empty: answering without documents")
    extra = ({"max_rounds": args.max_rounds, "bidirectional_injection": args.bidirectional_injection}
             if args.mode == "interleave" else {})
    stream = model.stream_answer(text, bank, mode=args.mode, k=args.k, filter=filt,
                                 max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                                 top_p=args.top_p, seed=args.seed, fusion=args.fusion, alpha=args.alpha, **extra)
    if args.json:
        out(json.dumps(stream.collect().to_dict(), ensure_ascii=False))
        return 0
    answer = stream_to_stdout(stream)
    if args.mode == "interleave":
        say(f"documents injected per round ({len(answer.rounds or [])} rounds, at most {args.max_rounds}):")
        for n, docs in enumerate(answer.rounds or [], 1):
            print(f"  round {n}: {', '.join(docs) if docs else '(none known)'}", file=sys.stderr)
        return 0
    what = "attended to" if args.mode == "latent" else "put in the prompt"
    fused = f", fused with BM25 at alpha {answer.fusion['alpha']:g}" if answer.fusion else ""
    say(f"documents {what} ({args.mode} mode{fused}), best first:")
    for line in describe_used(bank, answer) or ["  (none)"]:
        print(line, file=sys.stderr)
    return 0


def register(command: Any) -> None:
    """Add the bank commands' parsers; `command(name, func, help)` returns a subparser."""
    p = command("index", cmd_index, "Encode a corpus (JSONL file or folder of .txt/.md) into a new bank.")
    p.add_argument("corpus", help="a .jsonl file (text, id, title, metadata per line) or a folder")
    p.add_argument("--bank", required=True, metavar="DIR", help="folder to write the bank to")
    model_options(p, new=True)
    p.add_argument("--chunk-size", type=positive_int, default=None,
                   help="tokens per pooled chunk (default: 64; an MSA checkpoint's pooling_kernel_size)")
    p.add_argument("--profile", choices=("default", "reference"), default=None,
                   help="reference: the released MSA code's prompts and document rendering (the default for "
                        "MSA-format checkpoints); recorded with the bank")
    p.add_argument("--max-doc-tokens", type=positive_int, help="split longer documents into parts "
                   "(default: 2048)")
    p.add_argument("--batch-size", type=positive_int, help="documents per forward pass (default: 16)")
    p.add_argument("--overwrite", action="store_true", help="replace a bank already in DIR")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    symlinks_option(p)

    p = command("add", cmd_add, "Add documents to a bank; a document whose id is present is replaced.")
    p.add_argument("bank", metavar="DIR")
    p.add_argument("corpus", help="a .jsonl file or a folder of .txt/.md files")
    model_options(p, new=False)
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    lock_option(p)
    symlinks_option(p)

    p = command("delete", cmd_delete, "Delete documents from a bank by id.")
    p.add_argument("bank", metavar="DIR")
    p.add_argument("ids", nargs="+", metavar="ID")
    lock_option(p)

    p = command("info", cmd_info, "Show a bank's size and provenance (no model load).")
    p.add_argument("bank", metavar="DIR")
    p.add_argument("--json", action="store_true", help="print one JSON object")

    p = command("query", cmd_query, "Rank the bank's documents for a question (routing scores).")
    p.add_argument("bank", metavar="DIR")
    p.add_argument("question")
    p.add_argument("-k", type=positive_int, default=5, help="documents to return (default: 5)")
    filter_option(p)
    p.add_argument("--json", action="store_true", help="print a JSON list of {id, score, title, text, metadata}")
    fusion_options(p, "rank (scores: fused, then each side)")
    model_options(p, new=False)

    p = command("ask", cmd_ask, "Answer a question from the bank, streaming the answer.")
    p.add_argument("bank", metavar="DIR")
    p.add_argument("question")
    p.add_argument("--mode", choices=("latent", "hybrid", "interleave"), default="latent",
                   help="latent (default): attend to the documents' memory; hybrid: put the top-k documents "
                        "in the prompt; interleave (reference profile): the model names documents, their texts "
                        "are injected and it routes again, then answers")
    p.add_argument("--max-rounds", type=int, default=4, help="interleave: most document injections (default: 4)")
    p.add_argument("--bidirectional-injection", action="store_true",
                   help="interleave: feed the re-prompt without a causal mask, as the reference code does")
    p.add_argument("-k", type=positive_int, default=None, help="documents per routing layer (latent) or in the "
                   "prompt (hybrid); default: the bank's routing top_k (16)")
    p.add_argument("--max-new-tokens", type=positive_int, default=128, help="default: 128")
    p.add_argument("--temperature", type=float_in(0.0, 100.0), default=0.0, help="default: 0 (greedy)")
    p.add_argument("--top-p", type=float_in(0.0, 1.0, low_open=True), default=1.0, help="default: 1")
    p.add_argument("--seed", type=int, default=None, help="sampling seed")
    filter_option(p)
    fusion_options(p, "latent and hybrid modes pick the top-k (one selection for every routing layer)")
    p.add_argument("--json", action="store_true", help="print one JSON object {answer, mode, doc_ids, scores, ...}")
    model_options(p, new=False)
