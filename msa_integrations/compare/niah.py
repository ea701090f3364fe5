"""Needle-in-a-haystack retrieval sets, modelled on RULER's niah tasks (NVIDIA/RULER,
scripts/data/synthetic/niah.py), written in the evaluation format of ../shared/data/eval/:

    corpus.jsonl    {"id", "title", "text"}                       one haystack document per line
    queries.jsonl   {"id", "question", "answer", "gold_ids", ...}  one question per line
    dataset.json    the settings, the haystack's sha256, the real token count

    spec = NIAHSpec(tokens=64_000, task="multikey", key_type="words", value_type="numbers", seed=0)
    info = generate_niah(spec, "niah-64k")          # or: msa niah --tokens 64K --out niah-64k

The needle is RULER's: "One of the special magic {numbers|words|uuids} for {key} is: {value}.", and so
is the question ("What is the special magic numbers for {key} mentioned in the provided text?"). The
haystack (Paul Graham's essays by default, or any text or corpus) is cut into documents of about
`doc_tokens` tokens; each needle goes into its own document, at a random sentence boundary, so a
question's gold documents are exactly the ones holding its needles. Tasks:

* ``single``     one needle per queried key; the other documents hold no needle (RULER niah_single).
* ``multikey``   every document holds a needle with its own key; the question names one key, so the
                 retriever must match the key, not just the phrase "special magic" (RULER niah_multikey).
* ``multivalue`` each queried key has `values` needles in as many documents; the question asks for
                 all of them and every one is a gold document (RULER niah_multivalue).

Keys and values are words (adjective-noun pairs, as RULER draws from wonderwords), 7-digit numbers
or UUIDs. Everything is driven by one `random.Random(seed)`: the same spec, haystack and tokenizer
give byte-identical files. `score_answer` is RULER's string_match_all (share of the expected values
found in the prediction, case-insensitive).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import re
import uuid
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

from msa_core.errors import InvalidInputError
from msa_core.training.data import NEEDLE, QUESTION

__all__ = ["NIAHSpec", "default_haystack_path", "generate_niah", "load_haystack", "parse_tokens",
           "score_answer", "score_answers", "shared_data_dir"]

Task = Literal["single", "multikey", "multivalue"]
ItemType = Literal["words", "numbers", "uuids"]
TASKS: tuple[str, ...] = ("single", "multikey", "multivalue")
ITEM_TYPES: tuple[str, ...] = ("words", "numbers", "uuids")

QUESTION_ALL = "What are all the special magic {type} for {key} mentioned in the provided text?"

_ADJECTIVES = (
    "able", "acid", "agile", "amber", "ancient", "angry", "arctic", "ashen", "awake", "bald", "bitter", "blank",
    "bold", "brave", "brief", "bright", "brisk", "broken", "bronze", "busy", "calm", "candid", "careful", "cheap",
    "chilly", "civil", "clever", "cloudy", "coarse", "cold", "cosmic", "crisp", "crooked", "cruel", "curly",
    "damp", "daring", "dark", "dear", "deep", "dense", "dizzy", "dry", "dusty", "eager", "early", "earthy",
    "elder", "empty", "equal", "exotic", "faint", "fancy", "fast", "fierce", "flat", "fluffy", "fond", "fragile",
    "free", "fresh", "frozen", "funny", "gentle", "giant", "glad", "gloomy", "golden", "grand", "greasy", "green",
    "grumpy", "hairy", "happy", "hasty", "heavy", "hidden", "hollow", "honest", "humble", "hungry", "icy", "idle",
    "jolly", "keen", "kind", "large", "lazy", "little", "lively", "lonely", "loud", "lucky", "mellow", "merry",
    "mighty", "misty", "modern", "muddy", "narrow", "nimble", "noisy", "odd", "orange", "pale", "patient",
    "plain", "polite", "proud", "purple", "quick", "quiet", "rapid", "rare", "rigid", "rough", "royal", "rusty",
    "sandy", "savage", "scarlet", "shaggy", "sharp", "shiny", "silent", "silky", "sleepy", "slim", "smooth",
    "snowy", "soft", "solid", "sour", "spicy", "steady", "steep", "stormy", "sturdy", "sunny", "swift", "tame",
    "tender", "thick", "tidy", "tiny", "tired", "vast", "velvet", "violet", "warm", "wary", "wet", "wicked",
    "wild", "wise", "witty", "wooden", "young", "zealous",
)
_NOUNS = (
    "acorn", "anchor", "antler", "apple", "arrow", "badger", "bagel", "banjo", "barrel", "basket", "beacon",
    "beetle", "bell", "bison", "blanket", "bottle", "bridge", "bucket", "button", "cabin", "cactus", "camel",
    "candle", "canoe", "carpet", "castle", "cherry", "chimney", "cloud", "clover", "comet", "compass", "copper",
    "cottage", "crayon", "cricket", "crown", "dagger", "dolphin", "donkey", "dragon", "drum", "eagle", "easel",
    "falcon", "feather", "fiddle", "forest", "fossil", "fountain", "garden", "garlic", "glacier", "goblet",
    "gopher", "hammer", "harbor", "harp", "hazel", "helmet", "heron", "hornet", "island", "jacket", "jaguar",
    "kettle", "kitten", "ladder", "lagoon", "lantern", "lemon", "lizard", "llama", "lobster", "magnet", "mango",
    "marble", "meadow", "mitten", "monkey", "mosaic", "needle", "nutmeg", "oasis", "otter", "oyster", "paddle",
    "parrot", "peanut", "pebble", "pepper", "piano", "pillow", "pirate", "planet", "pocket", "puffin", "pumpkin",
    "quartz", "rabbit", "raccoon", "radish", "ribbon", "river", "rocket", "saddle", "salmon", "scarf", "shovel",
    "silver", "sparrow", "spider", "spoon", "squirrel", "statue", "teapot", "thistle", "tiger", "tomato",
    "trumpet", "tulip", "turtle", "umbrella", "valley", "violin", "wagon", "walnut", "walrus", "whistle",
    "willow", "window", "wizard", "zebra",
)
_SENTENCE_END = re.compile(r"(?<=[.!?])[\"')\]]*\s+")
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kKmMgG]?)\s*$")
_ENV_DATA = "MSA_SHARED_DATA"


# ---- sizes and paths ---------------------------------------------------------------------------


def parse_tokens(text: str | int) -> int:
    """'16K' -> 16000, '1M' -> 1000000, '1.5M' -> 1500000, '4096' -> 4096 (decimal multiples)."""
    if isinstance(text, int):
        value = text
    else:
        match = _SIZE.match(str(text))
        if not match:
            raise InvalidInputError(f"bad token count {text!r}: use an integer or a size such as 16K, 128K or 1M")
        value = round(float(match.group(1)) * {"": 1, "k": 10**3, "m": 10**6, "g": 10**9}[match.group(2).lower()])
    if value < 1:
        raise InvalidInputError(f"the token count must be >= 1, got {text!r}")
    return value


def shared_data_dir() -> Path:
    """`$MSA_SHARED_DATA`, else the `shared/data` folder beside the repository (../shared/data)."""
    env = os.environ.get(_ENV_DATA)
    return Path(env).expanduser() if env else Path(__file__).resolve().parents[3] / "shared" / "data"


def default_haystack_path() -> Path:
    return shared_data_dir() / "haystack" / "paul_graham_essays.json"


def load_haystack(path: str | os.PathLike[str] | None = None) -> str:
    """One text from: a .json file ({"text": ...}, a list of strings or of {"text": ...}), a .jsonl or
    folder corpus (msa_core.memory.corpus formats; documents joined by blank lines) or a .txt/.md file."""
    source = Path(path).expanduser() if path is not None else default_haystack_path()
    if not source.exists():
        hint = (f" (set {_ENV_DATA} to the shared data folder, or pass --haystack PATH)" if path is None else "")
        raise InvalidInputError(f"haystack {source} does not exist{hint}")
    if source.is_dir() or source.suffix.lower() == ".jsonl":
        from msa_core.memory.corpus import read_corpus

        return "\n\n".join(r.text for r in read_corpus(source))
    try:
        raw = source.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidInputError(f"haystack {source} is not UTF-8 text ({exc})") from exc
    if source.suffix.lower() != ".json":
        text = raw
    else:
        try:
            data = json.loads(raw)
        except ValueError as exc:
            raise InvalidInputError(f"haystack {source} is not valid JSON: {exc}") from exc
        if isinstance(data, dict) and isinstance(data.get("text"), str):
            text = data["text"]
        elif isinstance(data, list) and all(isinstance(x, str) for x in data):
            text = "\n\n".join(data)
        elif isinstance(data, list) and all(isinstance(x, dict) and isinstance(x.get("text"), str) for x in data):
            text = "\n\n".join(x["text"] for x in data)
        else:
            raise InvalidInputError(f"haystack {source}: expected {{\"text\": ...}}, a list of strings or a list "
                                    "of {\"text\": ...} objects")
    if not text.strip():
        raise InvalidInputError(f"haystack {source} holds no text")
    return text


# ---- tokenizers ----------------------------------------------------------------------------------


class _Tokens:
    """Token start offsets of a text and a token counter, from a HF tokenizer or whitespace words."""

    def __init__(self, tokenizer: Any) -> None:
        self.name = "whitespace" if tokenizer == "whitespace" else getattr(tokenizer, "name_or_path", "tokenizer")
        self._tok = None if tokenizer == "whitespace" else tokenizer

    def starts(self, text: str) -> list[int]:
        if self._tok is None:
            return [m.start() for m in re.finditer(r"\S+", text)]
        enc = self._tok(text, add_special_tokens=False, return_offsets_mapping=True)
        return [a for a, b in enc["offset_mapping"] if b > a] or [0]

    def count(self, text: str) -> int:
        if self._tok is None:
            return len(text.split())
        return len(self._tok(text, add_special_tokens=False)["input_ids"])


def resolve_tokenizer(tokenizer: Any = "default") -> Any:
    """'default' (the embedded model's tokenizer), 'whitespace', a folder / hub id, or a tokenizer object."""
    if not isinstance(tokenizer, str) or tokenizer == "whitespace":
        return tokenizer
    from transformers import AutoTokenizer

    from msa_core.checkpoints.defaults import resolve_model_path

    return AutoTokenizer.from_pretrained(str(resolve_model_path(tokenizer)))


# ---- the generator -------------------------------------------------------------------------------


@dataclass
class NIAHSpec:
    tokens: int  # memory size: total tokens of the corpus (reached or exceeded by at most one document)
    task: Task = "multikey"
    key_type: ItemType = "words"
    value_type: ItemType = "numbers"
    doc_tokens: int = 512  # tokens per document, needle included
    queries: int = 50  # questions (fewer when the corpus is too small for them)
    values: int = 4  # multivalue: needles (documents) per key
    seed: int = 0

    def check(self) -> None:
        if self.task not in TASKS:
            raise InvalidInputError(f"task must be one of {', '.join(TASKS)}, got {self.task!r}")
        for what in ("key_type", "value_type"):
            if getattr(self, what) not in ITEM_TYPES:
                raise InvalidInputError(f"{what} must be one of {', '.join(ITEM_TYPES)}, got {getattr(self, what)!r}")
        for what, low in (("tokens", 1), ("doc_tokens", 32), ("queries", 1), ("values", 1)):
            if not isinstance(getattr(self, what), int) or getattr(self, what) < low:
                raise InvalidInputError(f"{what} must be an integer >= {low}, got {getattr(self, what)!r}")


def generate_niah(spec: NIAHSpec, out_dir: str | os.PathLike[str] | None = None, *,
                  haystack: str | os.PathLike[str] | None = None, haystack_text: str | None = None,
                  tokenizer: Any = "default", overwrite: bool = False,
                  progress: Callable[[int, int], None] | None = None) -> dict[str, Any]:
    """Build the corpus and questions of `spec`; write them to `out_dir` when given.

    Returns {"corpus": [...], "queries": [...], "info": {...}} (info = dataset.json's content).
    haystack: a path (see load_haystack; default: Paul Graham's essays) or haystack_text directly.
    tokenizer: 'default', 'whitespace', a folder, or a tokenizer object (sizes are counted with it).
    """
    spec.check()
    if out_dir is not None:
        _check_out_dir(Path(out_dir), overwrite)
    text = haystack_text if haystack_text is not None else load_haystack(haystack)
    source = "<text>" if haystack_text is not None else str(Path(haystack) if haystack else default_haystack_path())
    tok = _Tokens(resolve_tokenizer(tokenizer))
    rng = random.Random(spec.seed)
    n_docs = max(1, math.ceil(spec.tokens / spec.doc_tokens))
    starts = _haystack_starts(tok, text, n_docs * spec.doc_tokens)
    plan = _plan_needles(spec, n_docs, rng)
    corpus, total, repeats = [], 0, 0
    cursor = 0
    for d in range(n_docs):
        needle = plan["needles"].get(d)
        needle_text = NEEDLE.format(type=spec.value_type, key=needle[0], value=needle[1]) if needle else ""
        want = spec.doc_tokens - (tok.count(needle_text) + 1 if needle else 0)
        want = max(8, min(want, spec.tokens - total))
        piece, cursor, wrapped = _take(text, starts, cursor, want)
        repeats += wrapped
        body, depth = _insert(piece, needle_text, rng) if needle else (piece, None)
        if needle:
            plan["depths"][d] = depth
        corpus.append({"id": f"d{d:06d}", "title": "", "text": body})
        total += tok.count(body)
        if progress is not None:
            progress(d + 1, n_docs)
    queries = _questions(spec, plan, corpus)
    info = {"generator": "msa_core.niah", "format": "eval-jsonl", "spec": asdict(spec), "documents": len(corpus),
            "questions": len(queries), "tokens": total, "tokenizer": tok.name,
            "haystack": source, "haystack_sha256": hashlib.sha256(text.encode("utf-8")).hexdigest(),
            "haystack_tokens_read": len(starts), "haystack_passes": 1 + repeats,
            "needle_template": NEEDLE, "question_template": QUESTION_ALL if spec.task == "multivalue" else QUESTION}
    if out_dir is not None:
        _write(Path(out_dir), corpus, queries, info)
    return {"corpus": corpus, "queries": queries, "info": info}


def _check_out_dir(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise InvalidInputError(f"{out} exists and is not a folder")
    if (out / "corpus.jsonl").exists() and not overwrite:
        raise InvalidInputError(f"{out} already holds a dataset (corpus.jsonl); pass --overwrite to replace it")


def _plan_needles(spec: NIAHSpec, n_docs: int, rng: random.Random) -> dict[str, Any]:
    """Which document holds which (key, value), and the questions' keys."""
    if spec.task == "multikey":
        hosts = list(range(n_docs))
        keys = _draw(spec.key_type, n_docs, rng, set())
        asked = sorted(rng.sample(range(n_docs), min(spec.queries, n_docs)))
        values = _draw(spec.value_type, n_docs, rng, set(keys))
        needles = {d: (keys[d], values[d]) for d in hosts}
        groups = [(keys[d], [d]) for d in asked]
    else:
        per_key = spec.values if spec.task == "multivalue" else 1
        n_keys = min(spec.queries, n_docs // per_key)
        if n_keys < 1:
            raise InvalidInputError(f"{spec.tokens} tokens make {n_docs} documents of ~{spec.doc_tokens} tokens, too "
                                    f"few for {per_key} needles per key; raise --tokens or lower --values")
        hosts = rng.sample(range(n_docs), n_keys * per_key)
        keys = _draw(spec.key_type, n_keys, rng, set())
        values = _draw(spec.value_type, n_keys * per_key, rng, set(keys))
        needles, groups = {}, []
        for i, key in enumerate(keys):
            docs = sorted(hosts[i * per_key:(i + 1) * per_key])
            for j, d in enumerate(docs):
                needles[d] = (key, values[i * per_key + j])
            groups.append((key, docs))
    return {"needles": needles, "groups": groups, "depths": {}}


def _draw(kind: str, n: int, rng: random.Random, avoid: set[str]) -> list[str]:
    """n distinct keys or values of one kind, none in `avoid`."""
    if kind == "words":
        space = len(_ADJECTIVES) * len(_NOUNS)
        if n + len(avoid) > space:
            raise InvalidInputError(f"{n} distinct word keys/values asked but only {space} adjective-noun pairs exist; "
                                    "use numbers or uuids for a corpus this large")
        out: list[str] = []
        seen = set(avoid)
        for i in rng.sample(range(space), min(space, n + len(avoid))):
            word = f"{_ADJECTIVES[i // len(_NOUNS)]}-{_NOUNS[i % len(_NOUNS)]}"
            if word not in seen:
                seen.add(word), out.append(word)
            if len(out) == n:
                return out
        raise AssertionError("unreachable: the sample is large enough")
    out, seen = [], set(avoid)
    while len(out) < n:
        item = (str(rng.randint(1_000_000, 9_999_999)) if kind == "numbers"
                else str(uuid.UUID(int=rng.getrandbits(128), version=4)))
        if item not in seen:
            seen.add(item), out.append(item)
    return out


def _haystack_starts(tok: _Tokens, text: str, needed: int) -> list[int]:
    """Token starts of as much of the haystack as `needed` tokens take (all of it when it is shorter):
    tokenizing 3 MB of essays for a 16K-token set would cost more than the rest of the work."""
    chars = needed * 8
    while chars < len(text):
        cut = text.rfind(" ", 0, chars)
        starts = tok.starts(text[:cut if cut > 0 else chars])[:-1]  # the last token may be cut short
        if len(starts) > needed:
            return starts
        chars *= 2
    return tok.starts(text)


def _take(text: str, starts: list[int], cursor: int, n: int) -> tuple[str, int, int]:
    """`n` tokens of the haystack from token `cursor` (wrapping around at its end); the new cursor and
    the number of wraps."""
    pieces, wraps = [], 0
    while n > 0:
        end = min(cursor + n, len(starts))
        stop = starts[end] if end < len(starts) else len(text)
        pieces.append(text[starts[cursor]:stop])
        n -= end - cursor
        cursor = end
        if cursor >= len(starts):
            cursor, wraps = 0, wraps + 1
    return " ".join(p.strip() for p in pieces if p.strip()), cursor, wraps


def _insert(piece: str, needle: str, rng: random.Random) -> tuple[str, float]:
    """The needle put at the sentence boundary nearest a random depth; the depth actually used."""
    bounds = [0] + [m.end() for m in _SENTENCE_END.finditer(piece)] + [len(piece)]
    target = rng.random() * len(piece)
    at = bounds[min(range(len(bounds)), key=lambda i: abs(bounds[i] - target))]
    before, after = piece[:at].rstrip(), piece[at:].lstrip()
    body = " ".join(p for p in (before, needle, after) if p)
    return body, round(at / max(1, len(piece)), 4)


def _questions(spec: NIAHSpec, plan: dict[str, Any], corpus: list[dict[str, Any]]) -> list[dict[str, Any]]:
    template = QUESTION_ALL if spec.task == "multivalue" else QUESTION
    out = []
    for i, (key, docs) in enumerate(plan["groups"]):
        values = [plan["needles"][d][1] for d in docs]
        out.append({"id": f"q{i:05d}", "question": template.format(type=spec.value_type, key=key),
                    "answer": ", ".join(values), "gold_ids": [corpus[d]["id"] for d in docs], "answers": values,
                    "key": key, "task": spec.task, "depths": [plan["depths"][d] for d in docs]})
    return out


def _write(out: Path, corpus: list[dict[str, Any]], queries: list[dict[str, Any]], info: dict[str, Any]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for name, rows in (("corpus.jsonl", corpus), ("queries.jsonl", queries)):
        tmp = out / f".{name}.tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
        os.replace(tmp, out / name)
    (out / "dataset.json").write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")


# ---- scoring ---------------------------------------------------------------------------------------


def score_answer(prediction: str, values: Sequence[str] | str) -> float:
    """RULER's string_match_all: the share of expected values found in the prediction (case-insensitive)."""
    expected = [values] if isinstance(values, str) else list(values)
    if not expected:
        raise InvalidInputError("no expected values to score against")
    found = prediction.lower()
    return sum(v.lower() in found for v in expected) / len(expected)


def score_answers(predictions: Sequence[str], queries: Sequence[dict[str, Any]]) -> float:
    """Mean `score_answer` over questions (each query's "answers", else its "answer")."""
    if len(predictions) != len(queries):
        raise InvalidInputError(f"{len(predictions)} predictions for {len(queries)} questions")
    if not queries:
        return 0.0
    return sum(score_answer(p, q.get("answers") or q["answer"]) for p, q in zip(predictions, queries)) / len(queries)

