"""The `msa` command line: index a corpus into a memory bank, query it, answer from it, run the demo.

    msa index corpus.jsonl --bank ./bank          # encode documents into a new bank
    msa add ./bank more.jsonl                     # add or replace (same id) documents
    msa delete ./bank doc-1 doc-2
    msa info ./bank [--json]
    msa query ./bank "question" -k 5 --filter year>=1900 [--json]
    msa ask ./bank "question" --mode latent|hybrid|interleave [--json]
    msa demo                                      # the README's tour on the shipped demo corpus
    msa niah --tokens 64K --out ./niah-64k        # generate a needle-in-a-haystack retrieval set
    msa compare --data DIR --retrievers msa,minilm,bm25 --out ./report   # the A/B harness
    msa train-router train/*.jsonl --out router.safetensors      # train router projectors

A bank remembers the model that built it (its manifest's `model_name`) and, when it was not the
native one, the router (in a small `msa-cli.json` next to the bank's versions), so later commands
need no --model; --model/--router override them. Results go to stdout; messages and progress to
stderr. Exit codes: 0 ok, 2 bad input or usage, 1 internal error (MSA_DEBUG=1 shows the traceback).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

from .. import __version__
from ..errors import BankError, InvalidInputError, MSAError

SIDECAR = "msa-cli.json"  # the router a CLI bank was built with (MemoryBank has no field for it)
_NATIVE = "native"
_FILTER_OPS = ((">=", "$gte"), ("<=", "$lte"), ("!=", "$ne"), (">", "$gt"), ("<", "$lt"), ("=", "$eq"))
_DEMO_ANSWERED = 2  # demo questions answered in both modes
_DEMO_NEW_TOKENS = 48
_DEMO_HYBRID_K = 3


# ---- small helpers -----------------------------------------------------------------------------


def _say(message: str) -> None:
    print(f"[msa] {message}", file=sys.stderr, flush=True)


def _out(text: str = "") -> None:
    print(text, flush=True)


def _model_ref(name: str) -> str:
    """What the bank records: 'default', an absolute local folder, or a hub id as typed."""
    if name == "default":
        return name
    path = Path(name).expanduser()
    return str(path.resolve()) if path.exists() else name


def _router_ref(router: str | None) -> str | None:
    """None for the model's own router (the trained one for the default model), 'native', 'random',
    or an absolute path (a missing file fails at load)."""
    if router is None:
        return None
    if router in (_NATIVE, "random"):
        return router
    return str(Path(router).expanduser().resolve())


def _question(text: str) -> str:
    if not text.strip():
        raise InvalidInputError('the question is empty; pass some text, e.g. msa query ./bank "Who built the bridge?"')
    return text


def _json_value(text: str) -> Any:
    """A JSON scalar/list when `text` parses as one (numbers, true/false, null, "quoted"), else the string."""
    def no_constants(name: str) -> Any:
        raise ValueError(name)  # NaN / Infinity stay strings

    try:
        return json.loads(text, parse_constant=no_constants)
    except ValueError:
        return text


def _parse_filters(specs: list[str] | None) -> dict[str, Any] | None:
    """`key=value`, `key!=v`, `key>=v`, `key<=v`, `key>v`, `key<v`, `key=in:a,b,c` -> a filter dict (ANDed)."""
    from ..memory.filters import compile_filter

    clauses = [_parse_filter(spec) for spec in specs or []]
    if not clauses:
        return None
    spec = clauses[0] if len(clauses) == 1 else {"$and": clauses}
    compile_filter(spec)  # fail now, before the model loads
    return spec


def _parse_filter(spec: str) -> dict[str, Any]:
    starts = [i for i, ch in enumerate(spec) if ch in "=<>!"]
    if not starts or starts[0] == 0:
        raise InvalidInputError(
            f"bad --filter {spec!r}: expected key=value, key!=value, key>=value, key<=value, key>value, "
            "key<value or key=in:a,b,c"
        )
    at = starts[0]
    key, rest = spec[:at], spec[at:]
    for symbol, op in _FILTER_OPS:
        if rest.startswith(symbol):
            value = rest[len(symbol):]
            break
    else:
        raise InvalidInputError(f"bad --filter {spec!r}: unknown operator at {rest!r}")
    if op in ("$eq", "$ne") and value.startswith("in:"):
        op = "$in" if op == "$eq" else "$nin"
        return {key: {op: [_json_value(v) for v in value[3:].split(",")]}}
    return {key: {op: _json_value(value)}}


def _documents(records: list[Any]) -> tuple[list[str], list[str], list[dict[str, Any]]]:
    """texts, ids, metadatas of corpus records; the title goes into metadata['title']."""
    metas = [{**r.metadata, "title": r.title} if r.title else dict(r.metadata) for r in records]
    return [r.text for r in records], [r.id for r in records], metas


def _preview(text: str, width: int = 100) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= width else flat[: width - 1] + "…"


# ---- banks, sidecar and model loading ----------------------------------------------------------


def _load_bank(bank_dir: str | Path):
    from ..memory.bank import MemoryBank

    return MemoryBank.load(bank_dir)


def _read_sidecar(bank_dir: str | Path) -> dict[str, Any]:
    path = Path(bank_dir) / SIDECAR
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise BankError(f"{path} is unreadable ({exc}); delete it and pass --router if the bank used one") from exc
    if not isinstance(data, dict):
        raise BankError(f"{path} is not a JSON object; delete it and pass --router if the bank used one")
    return data


def _write_sidecar(bank_dir: str | Path, router: str | None) -> None:
    """Record the router next to the bank (after a save: the folder then holds CURRENT)."""
    path = Path(bank_dir) / SIDECAR
    if router is None:
        path.unlink(missing_ok=True)
        return
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps({"router": router}, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def _check_target(bank_dir: str | Path, overwrite: bool) -> None:
    """Refuse, before any work, to write a new bank over an existing one or into a foreign folder."""
    from ..memory.persist import CURRENT

    root = Path(bank_dir)
    if root.exists() and not root.is_dir():
        raise InvalidInputError(f"{root} exists and is not a folder; pick a new folder for the bank")
    if (root / CURRENT).exists():
        if not overwrite:
            raise InvalidInputError(
                f"{root} already holds a memory bank; pass --overwrite to replace it, or use "
                f"`msa add {root} CORPUS` to add documents to it")
    elif root.is_dir() and any(root.iterdir()):
        raise InvalidInputError(
            f"{root} is not empty and holds no complete msa bank (no {CURRENT} file); "
            "pick an empty or new folder")


def _load_model(model_name: str, router: str | None, config: Any, profile: str | None = None):
    from ..model import MSAModel

    _say(f"loading model {model_name}" + (f" with router {router}" if router else ""))
    started = time.perf_counter()
    model = MSAModel.from_pretrained(model_name, router=router, config=config, profile=profile)
    _say(f"model ready in {time.perf_counter() - started:.1f} s")
    return model


def _load(bank_dir: str, model_override: str | None = None, router_override: str | None = None):
    """(model, bank): the bank, and the model and router that built it (or the overrides)."""
    bank = _load_bank(bank_dir)
    model_name = _model_ref(model_override) if model_override else bank.model_name
    if not model_name:
        raise InvalidInputError(f"the bank {bank_dir} does not record which model built it; pass --model")
    router = _router_ref(router_override) if router_override else _read_sidecar(bank_dir).get("router")
    model = _load_model(model_name, router, bank.config)
    model.check_bank(bank)
    return model, bank


def _encode_summary(done: str, info: dict[str, Any], tokens: int, seconds: float) -> str:
    rate = tokens / seconds if seconds > 0 else float("inf")
    return (f"{done} in {seconds:.1f} s ({tokens:,} tokens, {rate:,.0f} tokens/s); the bank holds "
            f"{info['documents']} documents, {info['parts']} parts, {info['tokens']:,} tokens, "
            f"{info['chunks']:,} chunks")


def _stream_to_stdout(stream: Any) -> Any:
    """Print an AnswerStream's pieces as they come; return its Answer."""
    for piece in stream:
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    sys.stdout.flush()
    return stream.result


def _describe_used(bank: Any, answer: Any, limit: int = 10) -> list[str]:
    titles = {d["id"]: d["metadata"].get("title") for d in bank.get(answer.doc_ids[:limit])}
    lines = [f"  {i}. {s:+.4f}  {d}" + (f"  {titles[d]}" if titles.get(d) else "")
             for i, (d, s) in enumerate(zip(answer.doc_ids[:limit], answer.scores[:limit]), 1)]
    if len(answer.doc_ids) > limit:
        lines.append(f"  ... and {len(answer.doc_ids) - limit} more")
    return lines


# ---- commands ----------------------------------------------------------------------------------


def cmd_index(args: argparse.Namespace) -> int:
    from ..config import EncodeConfig, MSAConfig
    from ..memory.corpus import read_corpus

    records = read_corpus(args.corpus)
    _check_target(args.bank, args.overwrite)
    encode = {k: v for k, v in (("chunk_size", args.chunk_size), ("max_doc_tokens", args.max_doc_tokens),
                                ("batch_size", args.batch_size)) if v is not None}
    router = _router_ref(args.router)
    model = _load_model(_model_ref(args.model), router, MSAConfig(encode=EncodeConfig(**encode)), args.profile)
    texts, ids, metas = _documents(records)
    started = time.perf_counter()
    bank = model.index(texts, ids, metas, show_progress_bar=not args.no_progress)
    seconds = time.perf_counter() - started
    bank.save(args.bank)
    _write_sidecar(args.bank, router)
    info = bank.info()
    _say(_encode_summary(f"indexed {len(records)} documents", info, info["tokens"], seconds) + f" -> {args.bank}")
    return 0


def cmd_add(args: argparse.Namespace) -> int:
    from ..memory.corpus import read_corpus

    records = read_corpus(args.corpus)  # all validated before the bank is touched
    model, bank = _load(args.bank, args.model, args.router)
    texts, ids, metas = _documents(records)
    replaced = sum(i in bank for i in ids)
    started = time.perf_counter()
    model.add(bank, texts, ids, metas, show_progress_bar=not args.no_progress)
    seconds = time.perf_counter() - started
    bank.save(args.bank)
    tokens = sum(d["n_tokens"] for d in bank.get(ids))
    _say(_encode_summary(f"added {len(ids) - replaced} new and replaced {replaced} documents", bank.info(), tokens,
                         seconds))
    return 0


def cmd_delete(args: argparse.Namespace) -> int:
    bank = _load_bank(args.bank)
    missing = [i for i in dict.fromkeys(args.ids) if i not in bank]
    deleted = bank.delete(args.ids)
    if deleted:
        bank.save(args.bank)
    if missing:
        _say(f"not found (nothing deleted for them): {', '.join(missing)}")
    _out(f"deleted {deleted} document{'s' * (deleted != 1)}; {len(bank)} remain")
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    bank = _load_bank(args.bank)
    info = {**bank.info(), "router": _read_sidecar(args.bank).get("router") or "the model's own",
            "path": str(Path(args.bank).resolve())}
    if args.json:
        _out(json.dumps(info, indent=2))
    else:
        width = max(len(k) for k in info)
        for key, value in info.items():
            shown = f"{value:,}" if isinstance(value, int) and not isinstance(value, bool) else value
            _out(f"{key + ':':<{width + 1}} {shown}")
    return 0


def cmd_query(args: argparse.Namespace) -> int:
    question = _question(args.question)
    filt = _parse_filters(args.filter)
    model, bank = _load(args.bank, args.model, args.router)
    hits = model.retrieve(question, bank, k=args.k, filter=filt, fusion=args.fusion, alpha=args.alpha)
    if args.json:
        _out(json.dumps([h.to_dict() for h in hits], indent=2, ensure_ascii=False))
        return 0
    if not hits:
        _say("no document matches" + (" the filter" if filt else ": the bank is empty"))
    for rank, hit in enumerate(hits, 1):
        title = hit.metadata.get("title")
        sides = "" if hit.latent_score is None else f" (routing {hit.latent_score:+.4f}, BM25 {hit.lexical_score:.3f})"
        _out(f"{rank:>2}. {hit.score:+.4f}{sides}  {hit.id}" + (f"  {title}" if title else ""))
        _out(f"    {_preview(hit.text)}")
    return 0


def cmd_ask(args: argparse.Namespace) -> int:
    question = _question(args.question)
    filt = _parse_filters(args.filter)
    model, bank = _load(args.bank, args.model, args.router)
    if len(bank) == 0:
        _say("the bank is empty: answering without documents")
    extra = ({"max_rounds": args.max_rounds, "bidirectional_injection": args.bidirectional_injection}
             if args.mode == "interleave" else {})
    stream = model.stream_answer(question, bank, mode=args.mode, k=args.k, filter=filt,
                                 max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                                 top_p=args.top_p, seed=args.seed, **extra)
    if args.json:
        _out(json.dumps(stream.collect().to_dict(), ensure_ascii=False))
        return 0
    answer = _stream_to_stdout(stream)
    if args.mode == "interleave":
        _say(f"documents injected per round ({len(answer.rounds or [])} rounds, at most {args.max_rounds}):")
        for n, docs in enumerate(answer.rounds or [], 1):
            print(f"  round {n}: {', '.join(docs) if docs else '(none known)'}", file=sys.stderr)
        return 0
    what = "attended to" if args.mode == "latent" else "put in the prompt"
    _say(f"documents {what} ({args.mode} mode), best first:")
    for line in _describe_used(bank, answer) or ["  (none)"]:
        print(line, file=sys.stderr)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from ..memory.corpus import DEMO_CORPUS_PATH, DEMO_QUESTIONS_PATH, read_corpus

    started = time.perf_counter()
    records = read_corpus(DEMO_CORPUS_PATH)
    questions = json.loads(DEMO_QUESTIONS_PATH.read_text(encoding="utf-8"))
    if args.keep:
        _check_target(args.keep, args.overwrite)
    tmp = None if args.keep else tempfile.mkdtemp(prefix="msa-demo-")
    bank_dir = Path(args.keep) if args.keep else Path(tmp) / "bank"
    try:
        model = _load_model(_model_ref(args.model), None, None)
        encode_s = _demo_index(model, records, bank_dir)
        _out("\n== 2. msa info " + str(bank_dir))
        cmd_info(argparse.Namespace(bank=str(bank_dir), json=False))
        bank = _load_bank(bank_dir)
        hits = _demo_retrieval(model, bank, questions)
        _demo_answers(model, bank, questions[:_DEMO_ANSWERED])
        _demo_summary(args, len(records), encode_s, hits, len(questions), time.perf_counter() - started,
                      bank_dir)
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    return 0


def _demo_index(model: Any, records: list[Any], bank_dir: Path) -> float:
    _out(f"== 1. msa index: {len(records)} documents about the invented island of Velmora")
    texts, ids, metas = _documents(records)
    started = time.perf_counter()
    bank = model.index(texts, ids, metas, show_progress_bar=False)
    seconds = time.perf_counter() - started
    bank.save(bank_dir)
    info = bank.info()
    _out(_encode_summary(f"indexed {len(records)} documents", info, info["tokens"], seconds))
    return seconds


def _demo_retrieval(model: Any, bank: Any, questions: list[dict[str, Any]]) -> int:
    _out("\n== 3. msa query: top-3 documents per question (routing scores of the memory router)")
    results = model.retrieve([q["question"] for q in questions], bank, k=3)
    hits = 0
    for q, docs in zip(questions, results):
        rank = next((i for i, d in enumerate(docs, 1) if d.id == q["gold_id"]), None)
        hits += rank is not None
        mark = f"gold found at rank {rank}" if rank else "gold NOT in the top 3"
        _out(f"Q: {q['question']}\n   [{mark}] gold = {q['gold_id']}")
        for i, d in enumerate(docs, 1):
            _out(f"   {i}. {d.score:+.4f}  {d.id}" + ("  <- gold" if d.id == q["gold_id"] else ""))
    return hits


def _demo_answers(model: Any, bank: Any, questions: list[dict[str, Any]]) -> None:
    _out(f"\n== 4. msa ask: {len(questions)} questions, latent and hybrid modes "
         f"(at most {_DEMO_NEW_TOKENS} new tokens)")
    for q in questions:
        _out(f"Q: {q['question']}   (expected: {q['answer']})")
        for mode, k in (("latent", None), ("hybrid", _DEMO_HYBRID_K)):
            sys.stdout.write(f"  [{mode}] ")
            answer = _stream_to_stdout(model.stream_answer(q["question"], bank, mode=mode, k=k,
                                                           max_new_tokens=_DEMO_NEW_TOKENS))
            if mode == "latent":
                used = (f"attended to {len(answer.doc_ids)} of {len(bank)} documents (top "
                        f"{model.config.routing.top_k} in each of {len(model.layers)} routing layers)")
            else:
                used = f"top {len(answer.doc_ids)} documents given as text"
            gold = "includes" if q["gold_id"] in answer.doc_ids else "misses"
            _out(f"           {used}; {gold} the gold document")


def _demo_summary(args: argparse.Namespace, n_docs: int, encode_s: float, hits: int, n_questions: int,
                  total_s: float, bank_dir: Path) -> None:
    _out("\n== Summary")
    _out(f"- indexed {n_docs} documents in {encode_s:.1f} s; whole demo {total_s:.1f} s")
    _out(f"- retrieval hits@3: {hits}/{n_questions} demo questions found their gold document in the top 3")
    _out(f"- answered {_DEMO_ANSWERED} questions in latent mode (memory K/V in the routing layers) and hybrid "
         f"mode (top {_DEMO_HYBRID_K} documents as prompt text)")
    _out(f"- bank kept at {bank_dir}" if args.keep else "- the bank was written to a temporary folder, now removed "
         "(pass --keep DIR to keep it)")
    if args.model == "default":
        _out("\nNote: the default model's router was trained together with adapters of its upper layers (model "
             "card: msa_core/data/routers/). It finds needles in a 1M-token haystack, but on multi-hop questions "
             "it still retrieves worse than an embedding model or BM25 (README, Training routers).")
        _out("The default backbone is SmolLM2-135M-Instruct: a 135M model gives short, often wrong answers; hybrid "
             "answers use its base weights, latent ones the adapted layers and are often repetitive. Try --model "
             "PATH with a larger Llama/Qwen2/Qwen3 checkpoint.")
    else:
        _out("\nNote: this model routes with the untrained `native` router (copies of each routing layer's "
             "W_Q/W_K) unless it ships its own; train one with `msa train-router`.")


def cmd_compare(args: argparse.Namespace) -> int:
    try:
        from msa_integrations.compare.cli import run_compare
    except ImportError as exc:
        raise InvalidInputError(f"msa compare needs the compare extra ({exc.name} is missing): "
                                "pip install 'msa[compare]'") from exc
    return run_compare(args)


def cmd_train_router(args: argparse.Namespace) -> int:
    import torch

    from ..training.trainer import TrainConfig, train_router

    fields = {"steps": args.steps, "batch_size": args.batch_size, "lr": args.lr,
              "warmup_steps": args.warmup_steps, "tau": args.tau,
              "hard_negatives": args.hard_negatives, "bm25_depth": args.bm25_depth, "eval_every": args.eval_every,
              "heldout_fraction": args.heldout, "seed": args.seed, "max_layers": args.max_layers,
              "max_per_source": args.max_per_source, "precision": args.precision, "needles": args.needles,
              "precondition": args.precondition, "span_pairs": args.span_pairs,
              "pair_questions": args.pair_questions,
              "tune_from_layer": args.tune_from_layer, "lora_rank": args.lora_rank, "adapter_lr": args.adapter_lr,
              "lm_weight": args.lm_weight, "recompute": args.recompute or None,
              "checkpoint_every": args.checkpoint_every,
              "heldout_sources": args.heldout_sources.split(",") if args.heldout_sources else None}
    try:
        config = TrainConfig(**{k: v for k, v in fields.items() if v is not None})
    except ValueError as exc:
        raise InvalidInputError(f"bad training setting: {exc}") from exc
    overrides: dict[str, Any] = {}
    if args.layers:
        overrides["routing"] = {"layers": [int(x) for x in args.layers.split(",")]}
    from ..model import MSAModel

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise InvalidInputError("--device cuda, but torch sees no CUDA device")
    torch.backends.cuda.matmul.allow_tf32 = True  # the cached states need no more than TF32's precision
    # float32 weights, so the states (and the backbone fingerprint the router records) equal the CPU model's
    model = MSAModel.from_pretrained(args.model, router=args.router or "native", config=overrides or None, device=device,
                                     dtype=torch.float32)
    _say(f"training the router of {args.model} on {device}: layers {model.layers}")
    report = train_router(model, args.data, args.out, config, checkpoint_dir=args.checkpoint_dir,
                          resume=args.resume, log=_say, show_progress_bar=not args.no_progress)
    final = report.final
    if final:
        _say(f"held-out recall@1/5/10: {final['recall@1']:.3f} / {final['recall@5']:.3f} / {final['recall@10']:.3f}")
    _say(f"router written to {args.out} (model card {Path(args.out).with_suffix('.md')}) in {report.seconds} s")
    if args.report:
        Path(args.report).write_text(json.dumps(report.to_dict(), indent=1))
    return 0


def cmd_niah(args: argparse.Namespace) -> int:
    from msa_integrations.compare.cli import run_niah

    return run_niah(args)


# ---- argument parsing --------------------------------------------------------------------------


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {value}")
    return value


def _float_in(low: float, high: float, low_open: bool = False):
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None
        if not math.isfinite(value) or value < low or value > high or (low_open and value == low):
            bracket = "(" if low_open else "["
            raise argparse.ArgumentTypeError(f"must be in {bracket}{low}, {high}], got {text}")
        return value

    return parse


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="msa", description="Memory Sparse Attention: index documents into a memory bank, retrieve, answer.",
        epilog="Exit codes: 0 ok, 2 bad input or usage, 1 internal error (MSA_DEBUG=1 shows the traceback).")
    parser.add_argument("--version", action="version", version=f"msa {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    def command(name: str, func: Any, help_text: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(func=func)
        return p

    def model_options(p: argparse.ArgumentParser, *, new: bool) -> None:
        if new:
            p.add_argument("--model", default="default", help="'default' (the embedded SmolLM2-135M-Instruct, "
                           "the default), a local Llama/Qwen2/Qwen3 folder or a hub id")
            p.add_argument("--router", default=None, help="the model's own router by default (the default model "
                           "ships a trained one), native (copies of W_Q/W_K), random, or a router .safetensors "
                           "file; recorded with the bank")
        else:
            p.add_argument("--model", default=None, help="override the model recorded in the bank")
            p.add_argument("--router", default=None, help="override the router recorded with the bank")

    def filter_option(p: argparse.ArgumentParser) -> None:
        p.add_argument("--filter", action="append", metavar="KEY=VALUE",
                       help="metadata filter, repeatable (ANDed): key=v, key!=v, key>=v, key<=v, key>v, key<v, "
                            "key=in:a,b,c; v is read as JSON when it parses (numbers, true/false), else as text")

    p = command("index", cmd_index, "Encode a corpus (JSONL file or folder of .txt/.md) into a new bank.")
    p.add_argument("corpus", help="a .jsonl file (text, id, title, metadata per line) or a folder")
    p.add_argument("--bank", required=True, metavar="DIR", help="folder to write the bank to")
    model_options(p, new=True)
    p.add_argument("--chunk-size", type=_positive_int, default=None,
                   help="tokens per pooled chunk (default: 64; an MSA checkpoint's pooling_kernel_size)")
    p.add_argument("--profile", choices=("default", "reference"), default=None,
                   help="reference: the released MSA code's prompts and document rendering (the default for "
                        "MSA-format checkpoints); recorded with the bank")
    p.add_argument("--max-doc-tokens", type=_positive_int, help="split longer documents into parts "
                   "(default: 2048)")
    p.add_argument("--batch-size", type=_positive_int, help="documents per forward pass (default: 16)")
    p.add_argument("--overwrite", action="store_true", help="replace a bank already in DIR")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")

    p = command("add", cmd_add, "Add documents to a bank; a document whose id is present is replaced.")
    p.add_argument("bank", metavar="DIR")
    p.add_argument("corpus", help="a .jsonl file or a folder of .txt/.md files")
    model_options(p, new=False)
    p.add_argument("--no-progress", action="store_true", help="no progress bar")

    p = command("delete", cmd_delete, "Delete documents from a bank by id.")
    p.add_argument("bank", metavar="DIR")
    p.add_argument("ids", nargs="+", metavar="ID")

    p = command("info", cmd_info, "Show a bank's size and provenance (no model load).")
    p.add_argument("bank", metavar="DIR")
    p.add_argument("--json", action="store_true", help="print one JSON object")

    p = command("query", cmd_query, "Rank the bank's documents for a question (routing scores).")
    p.add_argument("bank", metavar="DIR")
    p.add_argument("question")
    p.add_argument("-k", type=_positive_int, default=5, help="documents to return (default: 5)")
    filter_option(p)
    p.add_argument("--fusion", choices=("bm25",), default=None,
                   help="bm25: rank by routing fused with the bank's BM25 index (scores: fused, then each side)")
    p.add_argument("--alpha", type=float, default=None, help="with --fusion: weight of routing, 1 routing only, 0 "
                   "BM25 only (default: the model's routing.fusion_alpha)")
    p.add_argument("--json", action="store_true", help="print a JSON list of {id, score, title, text, metadata}")
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
    p.add_argument("-k", type=_positive_int, default=None, help="documents per routing layer (latent) or in the "
                   "prompt (hybrid); default: the bank's routing top_k (16)")
    p.add_argument("--max-new-tokens", type=_positive_int, default=128, help="default: 128")
    p.add_argument("--temperature", type=_float_in(0.0, 100.0), default=0.0, help="default: 0 (greedy)")
    p.add_argument("--top-p", type=_float_in(0.0, 1.0, low_open=True), default=1.0, help="default: 1")
    p.add_argument("--seed", type=int, default=None, help="sampling seed")
    filter_option(p)
    p.add_argument("--json", action="store_true", help="print one JSON object {answer, mode, doc_ids, scores, ...}")
    model_options(p, new=False)

    p = command("demo", cmd_demo, "Index the shipped demo corpus, query it and answer from it.")
    p.add_argument("--model", default="default", help="'default' or a local Llama/Qwen2/Qwen3 folder")
    p.add_argument("--keep", metavar="DIR", help="save the demo bank in DIR (default: a temporary folder)")
    p.add_argument("--overwrite", action="store_true", help="replace a bank already in --keep DIR")
    _add_compare_commands(command)
    _add_train_command(command)
    return parser


def _add_train_command(command: Any) -> None:
    p = command("train-router", cmd_train_router, "Train router projectors (W_QR, W_KR) on (query, positive) "
                "pairs with the backbone frozen (decoupled InfoNCE, paper Eq. 5); writes a router .safetensors "
                "and a model card beside it.")
    p.add_argument("data", nargs="+", help="JSONL files: query, positive, optional negatives (list), title, source")
    p.add_argument("--out", required=True, metavar="FILE", help="router file to write (.safetensors)")
    p.add_argument("--model", default="default", help="'default' or a local Llama/Qwen2/Qwen3 folder")
    p.add_argument("--router", default=None, help="starting router: native (default), random, or a .safetensors file")
    p.add_argument("--layers", help="routing layers to train, comma-separated (default: the upper half)")
    p.add_argument("--max-layers", type=_positive_int, help="keep the best N layers, chosen on held-out data")
    p.add_argument("--steps", type=_positive_int, help="optimizer steps (default: 1500)")
    p.add_argument("--batch-size", type=_positive_int, help="questions per step (default: 256)")
    p.add_argument("--lr", type=_float_in(0.0, 1.0, low_open=True), help="peak learning rate (default: 5e-4)")
    p.add_argument("--warmup-steps", type=int, help="steps of linear learning-rate warm-up (default: 100)")
    p.add_argument("--tau", type=_float_in(0.0, 0.5, low_open=True), help="InfoNCE temperature (default: 0.1)")
    p.add_argument("--hard-negatives", type=int, help="mined negatives per question per step (default: 3)")
    p.add_argument("--bm25-depth", type=int, help="BM25 hits kept as hard negatives, 0 for none (default: 30)")
    p.add_argument("--heldout", type=_float_in(0.0, 0.99), help="share of documents held out (default: 0.02)")
    p.add_argument("--heldout-sources", metavar="S1,S2", help="hold these sources out whole (their 'source' "
                   "field or file name): a domain the router never sees")
    p.add_argument("--eval-every", type=_positive_int, help="held-out evaluation interval in steps (default: 250)")
    p.add_argument("--max-per-source", type=_positive_int, help="cap on questions per source (data mix)")
    p.add_argument("--precision", choices=("auto", "fp32", "bf16"), help="default: auto (bf16 autocast on GPU)")
    p.add_argument("--needles", type=int, help="add N synthetic needle-lookup questions built from the training "
                   "documents (default: 0)")
    p.add_argument("--span-pairs", type=int, help="add N self-supervised questions: a few words cut from a "
                   "training document, answered by it (default: 0)")
    p.add_argument("--pair-questions", type=int, help="add N self-supervised two-document questions: the words "
                   "around a name in each of two training documents, answered by both (default: 0)")
    p.add_argument("--tune-from-layer", type=_positive_int, metavar="F", help="also train the backbone's layers from "
                   "F up, as LoRA adapters saved in the router file and merged at load (default: frozen backbone)")
    p.add_argument("--lora-rank", type=_positive_int, help="rank of those adapters (default: 32)")
    p.add_argument("--adapter-lr", type=float, help="peak learning rate of the adapters (default: 5e-4)")
    p.add_argument("--lm-weight", type=float, help="weight of the next-token loss that keeps the tuned backbone a "
                   "language model (default: 0.1)")
    p.add_argument("--recompute", action="store_true", help="with --tune-from-layer: recompute the tuned layers' "
                   "activations in the backward pass (about a third slower, far less memory)")
    p.add_argument("--precondition", choices=("none", "standardize", "whiten"),
                   help="train on conditioned states and fold the map into the saved router (default: standardize)")
    p.add_argument("--seed", type=int, help="default: 0")
    p.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda when available")
    p.add_argument("--checkpoint-dir", metavar="DIR", help="write checkpoints here (step-N/ and LATEST)")
    p.add_argument("--checkpoint-every", type=_positive_int, help="steps between checkpoints (default: 500, and "
                   "always the last step)")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --checkpoint-dir")
    p.add_argument("--report", metavar="FILE", help="also write the training report (history, metrics) as JSON")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def _add_compare_commands(command: Any) -> None:
    from msa_integrations.compare.niah import ITEM_TYPES, TASKS

    p = command("compare", cmd_compare, "Compare retrievers (MSA, MiniLM+FAISS, BM25) on evaluation sets: "
                "recall@k, hit@k, nDCG@10, MRR, build time, index size, latency; writes report.json, report.md "
                "and PNG plots.")
    p.add_argument("--data", action="append", metavar="DIR", help="a folder with corpus.jsonl and queries.jsonl "
                   "(the format of ../shared/data/eval/); repeat it for several memory sizes")
    p.add_argument("--retrievers", default="msa,minilm,bm25", help="comma-separated: msa, msa+bm25, minilm, "
                   "minilm+bm25, bm25, random (default: msa,minilm,bm25)")
    p.add_argument("--k", default="1,2,5,10", help="cut-offs for recall@k and hit@k (default: 1,2,5,10)")
    p.add_argument("--out", default="compare-report", metavar="DIR", help="report folder (default: compare-report)")
    p.add_argument("--limit", type=_positive_int, help="only the first N questions, and the corpus cut to the "
                   "shortest prefix holding their gold documents (or --corpus-limit)")
    p.add_argument("--corpus-limit", type=_positive_int, help="keep the first N corpus documents")
    p.add_argument("--niah-sizes", metavar="SIZES", help="also generate NIAH sets of these memory sizes in tokens "
                   "(e.g. 16K,64K,256K) and compare on each")
    p.add_argument("--niah-task", choices=TASKS, default="multikey", help="NIAH task (default: multikey)")
    p.add_argument("--niah-queries", type=_positive_int, default=50, help="NIAH questions per set (default: 50)")
    p.add_argument("--niah-doc-tokens", type=_positive_int, default=512, help="NIAH document size (default: 512)")
    p.add_argument("--niah-seed", type=int, default=0, help="NIAH seed (default: 0)")
    p.add_argument("--niah-dir", metavar="DIR", help="where NIAH sets go (default: OUT/niah); existing sets "
                   "are reused")
    p.add_argument("--haystack", metavar="PATH", help="NIAH haystack (default: "
                   "$MSA_SHARED_DATA/haystack/paul_graham_essays.json)")
    p.add_argument("--latency-queries", type=int, default=50, help="single-question searches timed (default: 50)")
    p.add_argument("--batch-size", type=_positive_int, default=16, help="questions per search call (default: 16)")
    p.add_argument("--answers", type=int, default=0, metavar="N", help="also answer the first N questions: hybrid "
                   "for every retriever, latent for msa; EM and F1 (default: 0)")
    p.add_argument("--answer-k", type=_positive_int, default=5, help="passages in the hybrid prompt (default: 5)")
    p.add_argument("--max-new-tokens", type=_positive_int, default=32, help="answer length (default: 32)")
    p.add_argument("--model", default="default", help="msa: 'default' or a Llama/Qwen2/Qwen3 folder")
    p.add_argument("--router", default=None, help="msa: the model's own router (default; the default model ships "
                   "a trained one), native, random, or a router .safetensors file")
    p.add_argument("--cache", metavar="DIR", help="keep MSA banks and MiniLM embeddings here and reuse them "
                   "(the report then gives the first build's time)")
    p.add_argument("--note", help="free text put in the report (e.g. what else ran on the machine)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")

    p = command("niah", cmd_niah, "Generate a needle-in-a-haystack retrieval set (RULER-style) in the eval format: "
                "corpus.jsonl, queries.jsonl, dataset.json.")
    p.add_argument("--tokens", required=True, help="memory size in tokens: 16000, 16K, 1M, ...")
    p.add_argument("--out", required=True, metavar="DIR", help="folder to write the set to")
    p.add_argument("--task", choices=TASKS, default="multikey", help="single: needles only in the asked documents; "
                   "multikey: every document holds a needle with its own key; multivalue: several documents per "
                   "key (default: multikey)")
    p.add_argument("--key-type", choices=ITEM_TYPES, default="words", help="default: words")
    p.add_argument("--value-type", choices=ITEM_TYPES, default="numbers", help="default: numbers")
    p.add_argument("--doc-tokens", type=_positive_int, default=512, help="tokens per document (default: 512)")
    p.add_argument("--queries", type=_positive_int, default=50, help="questions (default: 50)")
    p.add_argument("--values", type=_positive_int, default=4, help="multivalue: values per key (default: 4)")
    p.add_argument("--seed", type=int, default=0, help="default: 0")
    p.add_argument("--haystack", metavar="PATH", help="a .json/.txt/.md file, a .jsonl corpus or a folder (default: "
                   "$MSA_SHARED_DATA/haystack/paul_graham_essays.json, else ../shared/data beside the repository)")
    p.add_argument("--tokenizer", default="default", help="'default' (the embedded model's), 'whitespace', or a "
                   "tokenizer folder")
    p.add_argument("--overwrite", action="store_true", help="replace a set already in DIR")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


# ---- entry point -------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    debug = os.environ.get("MSA_DEBUG", "").strip() not in ("", "0")
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        if args.command is None:
            parser.print_help(sys.stderr)
            return 2
        return int(args.func(args) or 0)
    except SystemExit as exc:  # argparse: --help/--version (0) and usage errors (2)
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 2)
    except (MSAError, PermissionError) as exc:
        if debug:
            traceback.print_exc()
        print(f"msa: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("msa: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # e.g. `msa query ... | head`: stop quietly
        try:
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        except (OSError, ValueError):
            pass
        return 1
    except Exception as exc:
        if debug:
            traceback.print_exc()
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        print(f"msa: internal error: {type(exc).__name__}" + (f": {first}" if first else ""), file=sys.stderr)
        if not debug:
            print("run with MSA_DEBUG=1 for the traceback", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
