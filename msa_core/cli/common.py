"""What every `msa` command shares: messages, banks and their sidecar, model loading, argument types."""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

from ..errors import BankError, InvalidInputError

SIDECAR = "msa-cli.json"  # the router a CLI bank was built with (MemoryBank has no field for it)


NATIVE = "native"


FILTER_OPS = ((">=", "$gte"), ("<=", "$lte"), ("!=", "$ne"), (">", "$gt"), ("<", "$lt"), ("=", "$eq"))


def say(message: str) -> None:
    print(f"[msa] {message}", file=sys.stderr, flush=True)


def out(text: str = "") -> None:
    print(text, flush=True)


def model_ref(name: str) -> str:
    """What the bank records: 'default', an absolute local folder, or a hub id as typed."""
    if name == "default":
        return name
    path = Path(name).expanduser()
    return str(path.resolve()) if path.exists() else name


def router_ref(router: str | None) -> str | None:
    """None for the model's own router (the trained one for the default model), 'native', 'random',
    or an absolute path (a missing file fails at load)."""
    if router is None:
        return None
    if router in (NATIVE, "random"):
        return router
    return str(Path(router).expanduser().resolve())


def checked_question(text: str) -> str:
    if not text.strip():
        raise InvalidInputError('the question is empty; pass some text, e.g. msa query ./bank "Who built the bridge?"')
    return text


def json_value(text: str) -> Any:
    """A JSON scalar/list when `text` parses as one (numbers, true/false, null, "quoted"), else the string."""
    def no_constants(name: str) -> Any:
        raise ValueError(name)  # NaN / Infinity stay strings

    try:
        return json.loads(text, parse_constant=no_constants)
    except ValueError:
        return text


def parse_filters(specs: list[str] | None) -> dict[str, Any] | None:
    """`key=value`, `key!=v`, `key>=v`, `key<=v`, `key>v`, `key<v`, `key=in:a,b,c` -> a filter dict (ANDed)."""
    from ..memory.filters import compile_filter

    clauses = [parse_filter(spec) for spec in specs or []]
    if not clauses:
        return None
    spec = clauses[0] if len(clauses) == 1 else {"$and": clauses}
    compile_filter(spec)  # fail now, before the model loads
    return spec


def parse_filter(spec: str) -> dict[str, Any]:
    starts = [i for i, ch in enumerate(spec) if ch in "=<>!"]
    if not starts or starts[0] == 0:
        raise InvalidInputError(
            f"bad --filter {spec!r}: expected key=value, key!=value, key>=value, key<=value, key>value, "
            "key<value or key=in:a,b,c"
        )
    at = starts[0]
    key, rest = spec[:at], spec[at:]
    for symbol, op in FILTER_OPS:
        if rest.startswith(symbol):
            value = rest[len(symbol):]
            break
    else:
        raise InvalidInputError(f"bad --filter {spec!r}: unknown operator at {rest!r}")
    if op in ("$eq", "$ne") and value.startswith("in:"):
        op = "$in" if op == "$eq" else "$nin"
        return {key: {op: [json_value(v) for v in value[3:].split(",")]}}
    return {key: {op: json_value(value)}}


def documents(records: list[Any]) -> tuple[list[str], list[str], list[dict[str, Any]]]:
    """texts, ids, metadatas of corpus records; the title goes into metadata['title']."""
    metas = [{**r.metadata, "title": r.title} if r.title else dict(r.metadata) for r in records]
    return [r.text for r in records], [r.id for r in records], metas


def preview(text: str, width: int = 100) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= width else flat[: width - 1] + "…"


def load_bank(bank_dir: str | Path):
    from ..memory.bank import MemoryBank

    return MemoryBank.load(bank_dir)


def read_sidecar(bank_dir: str | Path) -> dict[str, Any]:
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


def write_sidecar(bank_dir: str | Path, router: str | None) -> None:
    """Record the router next to the bank (after a save: the folder then holds CURRENT)."""
    path = Path(bank_dir) / SIDECAR
    if router is None:
        path.unlink(missing_ok=True)
        return
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps({"router": router}, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def check_target(bank_dir: str | Path, overwrite: bool) -> None:
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
    elif root.is_dir() and any(e.name != ".msa-lock" for e in root.iterdir()):
        raise InvalidInputError(
            f"{root} is not empty and holds no complete msa bank (no {CURRENT} file); "
            "pick an empty or new folder")


def load_model(model_name: str, router: str | None, config: Any, profile: str | None = None):
    from ..model import MSAModel

    say(f"loading model {model_name}" + (f" with router {router}" if router else ""))
    started = time.perf_counter()
    model = MSAModel.from_pretrained(model_name, router=router, config=config, profile=profile)
    say(f"model ready in {time.perf_counter() - started:.1f} s")
    return model


def load_model_and_bank(bank_dir: str, model_override: str | None = None, router_override: str | None = None):
    """(model, bank): the bank, and the model and router that built it (or the overrides)."""
    bank = load_bank(bank_dir)
    model_name = model_ref(model_override) if model_override else bank.model_name
    if not model_name:
        raise InvalidInputError(f"the bank {bank_dir} does not record which model built it; pass --model")
    router = router_ref(router_override) if router_override else read_sidecar(bank_dir).get("router")
    model = load_model(model_name, router, bank.config)
    model.check_bank(bank)
    return model, bank


def encode_summary(done: str, info: dict[str, Any], tokens: int, seconds: float) -> str:
    rate = tokens / seconds if seconds > 0 else float("inf")
    return (f"{done} in {seconds:.1f} s ({tokens:,} tokens, {rate:,.0f} tokens/s); the bank holds "
            f"{info['documents']} documents, {info['parts']} parts, {info['tokens']:,} tokens, "
            f"{info['chunks']:,} chunks")


def stream_to_stdout(stream: Any) -> Any:
    """Print an AnswerStream's pieces as they come; return its Answer."""
    for piece in stream:
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    sys.stdout.flush()
    return stream.result


def describe_used(bank: Any, answer: Any, limit: int = 10) -> list[str]:
    titles = {d["id"]: d["metadata"].get("title") for d in bank.get(answer.doc_ids[:limit])}
    lines = [f"  {i}. {s:+.4f}  {d}" + (f"  {titles[d]}" if titles.get(d) else "")
             for i, (d, s) in enumerate(zip(answer.doc_ids[:limit], answer.scores[:limit]), 1)]
    if len(answer.doc_ids) > limit:
        lines.append(f"  ... and {len(answer.doc_ids) - limit} more")
    return lines


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {value}")
    return value


def float_in(low: float, high: float, low_open: bool = False):
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


def fusion_options(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--fusion", choices=("bm25",), default=None,
                   help=f"bm25: {what} by routing fused with the bank's BM25 index")
    p.add_argument("--alpha", type=float, default=None, help="with --fusion: weight of routing, 1 routing only, 0 "
                   "BM25 only (default: the model's routing.fusion_alpha)")


def lock_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--lock-timeout", type=float_in(0.0, 1e9), default=None, metavar="SECONDS",
                   help="wait at most this long for another process writing the bank (default: "
                        "$MSA_LOCK_TIMEOUT or 300)")


def symlinks_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--follow-symlinks", action="store_true",
                   help="in a corpus folder, also read symbolic links leading outside it (skipped by default)")
