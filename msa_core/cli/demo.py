"""`msa demo`: the README's tour on the shipped demo corpus (index, info, query, answer in two modes)."""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from .bank_commands import cmd_info
from .common import check_target, documents, encode_summary, load_bank, load_model, model_ref, out, stream_to_stdout

_DEMO_ANSWERED = 2  # demo questions answered in both modes


_DEMO_NEW_TOKENS = 48


_DEMO_HYBRID_K = 3


def cmd_demo(args: argparse.Namespace) -> int:
    from ..memory.corpus import DEMO_CORPUS_PATH, DEMO_QUESTIONS_PATH, read_corpus

    started = time.perf_counter()
    records = read_corpus(DEMO_CORPUS_PATH)
    questions = json.loads(DEMO_QUESTIONS_PATH.read_text(encoding="utf-8"))
    if args.keep:
        check_target(args.keep, args.overwrite)
    tmp = None if args.keep else tempfile.mkdtemp(prefix="msa-demo-")
    bank_dir = Path(args.keep) if args.keep else Path(tmp) / "bank"
    try:
        model = load_model(model_ref(args.model), None, None)
        encode_s = _demo_index(model, records, bank_dir)
        out("\n== 2. msa info " + str(bank_dir))
        cmd_info(argparse.Namespace(bank=str(bank_dir), json=False))
        bank = load_bank(bank_dir)
        hits = _demo_retrieval(model, bank, questions)
        _demo_answers(model, bank, questions[:_DEMO_ANSWERED])
        _demo_summary(args, len(records), encode_s, hits, len(questions), time.perf_counter() - started,
                      bank_dir)
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    return 0


def _demo_index(model: Any, records: list[Any], bank_dir: Path) -> float:
    out(f"== 1. msa index: {len(records)} documents about the invented island of Velmora")
    texts, ids, metas = documents(records)
    started = time.perf_counter()
    bank = model.index(texts, ids, metas, show_progress_bar=False)
    seconds = time.perf_counter() - started
    bank.save(bank_dir)
    info = bank.info()
    out(encode_summary(f"indexed {len(records)} documents", info, info["tokens"], seconds))
    return seconds


def _demo_retrieval(model: Any, bank: Any, questions: list[dict[str, Any]]) -> int:
    out("\n== 3. msa query: top-3 documents per question (routing scores of the memory router)")
    results = model.retrieve([q["question"] for q in questions], bank, k=3)
    hits = 0
    for q, docs in zip(questions, results):
        rank = next((i for i, d in enumerate(docs, 1) if d.id == q["gold_id"]), None)
        hits += rank is not None
        mark = f"gold found at rank {rank}" if rank else "gold NOT in the top 3"
        out(f"Q: {q['question']}\n   [{mark}] gold = {q['gold_id']}")
        for i, d in enumerate(docs, 1):
            out(f"   {i}. {d.score:+.4f}  {d.id}" + ("  <- gold" if d.id == q["gold_id"] else ""))
    return hits


def _demo_answers(model: Any, bank: Any, questions: list[dict[str, Any]]) -> None:
    out(f"\n== 4. msa ask: {len(questions)} questions, latent and hybrid modes "
         f"(at most {_DEMO_NEW_TOKENS} new tokens)")
    for q in questions:
        out(f"Q: {q['question']}   (expected: {q['answer']})")
        for mode, k in (("latent", None), ("hybrid", _DEMO_HYBRID_K)):
            sys.stdout.write(f"  [{mode}] ")
            answer = stream_to_stdout(model.stream_answer(q["question"], bank, mode=mode, k=k,
                                                           max_new_tokens=_DEMO_NEW_TOKENS))
            if mode == "latent":
                used = (f"attended to {len(answer.doc_ids)} of {len(bank)} documents (top "
                        f"{model.config.routing.top_k} in each of {len(model.layers)} routing layers)")
            else:
                used = f"top {len(answer.doc_ids)} documents given as text"
            gold = "includes" if q["gold_id"] in answer.doc_ids else "misses"
            out(f"           {used}; {gold} the gold document")


def _demo_summary(args: argparse.Namespace, n_docs: int, encode_s: float, hits: int, n_questions: int,
                  total_s: float, bank_dir: Path) -> None:
    out("\n== Summary")
    out(f"- indexed {n_docs} documents in {encode_s:.1f} s; whole demo {total_s:.1f} s")
    out(f"- retrieval hits@3: {hits}/{n_questions} demo questions found their gold document in the top 3")
    out(f"- answered {_DEMO_ANSWERED} questions in latent mode (memory K/V in the routing layers) and hybrid "
         f"mode (top {_DEMO_HYBRID_K} documents as prompt text)")
    out(f"- bank kept at {bank_dir}" if args.keep else "- the bank was written to a temporary folder, now removed "
         "(pass --keep DIR to keep it)")
    if args.model == "default":
        out("\nNote: the default model's router was trained together with adapters of its upper layers (model "
             "card: msa_core/data/routers/). It finds needles in a 1M-token haystack, but on multi-hop questions "
             "it still retrieves worse than an embedding model or BM25 (README, Training routers).")
        out("The default backbone is SmolLM2-135M-Instruct: a 135M model gives short, often wrong answers; hybrid "
             "answers use its base weights, latent ones the adapted layers and are often repetitive. Try --model "
             "PATH with a larger Llama/Qwen2/Qwen3 checkpoint.")
    else:
        out("\nNote: this model routes with the untrained `native` router (copies of each routing layer's "
             "W_Q/W_K) unless it ships its own; train one with `msa train-router`.")


def register(command: Any) -> None:
    p = command("demo", cmd_demo, "Index the shipped demo corpus, query it and answer from it.")
    p.add_argument("--model", default="default", help="'default' or a local Llama/Qwen2/Qwen3 folder")
    p.add_argument("--keep", metavar="DIR", help="save the demo bank in DIR (default: a temporary folder)")
    p.add_argument("--overwrite", action="store_true", help="replace a bank already in --keep DIR")
