"""bfloat16 routing keys for a bfloat16 model on the CPU, decided on a dev split of training data (issue 27).

The default model's states are bfloat16, so its routing queries already carry bfloat16 rounding; scoring them
against bfloat16 keys (`memory_router.key_dtype`, the default unless `routing.exact_scores`) halves what each
question reads from the bank. This script measures what that costs on wiki-dev (the held-out split that
`msa distill-data` writes from Wikipedia passages the router never trained on; never ../shared/data/eval/):
the default model with float32 keys (exact_scores=True) and with bfloat16 keys, alternated per question, and
the exact fp32 model beside them (all on the default model's bank). Writes recall@5, how many top-5 sets
changed and retrieve p50 to JSON.

    python benchmarks/cpu_scoring_dev.py --dev-set /tmp/wiki_pseudo/dev \
        --out benchmarks/results/cpu_scoring_dev.json
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from msa_core import MSAModel, __version__


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.open(encoding="utf-8")]


def dev_parser(doc: str, out: Path) -> argparse.ArgumentParser:
    """The arguments every wiki-dev script takes: --dev-set, --bank-cache, --out (default `out`)."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dev-set", type=Path, required=True, help="a folder with corpus.jsonl and queries.jsonl")
    ap.add_argument("--bank-cache", type=Path, help="save the default model's bank here, or load it if saved")
    ap.add_argument("--out", type=Path, default=out)
    return ap


def dev_set(folder: Path) -> tuple[list[dict], list[dict]]:
    """(corpus, queries) of a dev retrieval set; refuses the evaluation sets."""
    if "eval" in folder.resolve().parts:
        raise SystemExit("choose on a dev split of training data, never on ../shared/data/eval/")
    return read_jsonl(folder / "corpus.jsonl"), read_jsonl(folder / "queries.jsonl")


def dev_bank(model: MSAModel, corpus: list[dict], cache: Path | None):
    """The model's bank of the dev corpus (titled passages), loaded from `cache` when saved there, else built
    (and saved there)."""
    if cache and cache.exists():
        return model.load_bank(cache)
    bank = model.index([f"{r['title']}\n{r['text']}" for r in corpus], [r["id"] for r in corpus])
    if cache:
        bank.save(cache)
    return bank


def main() -> None:
    ap = dev_parser(__doc__, Path(__file__).parent / "results" / "cpu_scoring_dev.json")
    ap.add_argument("--k", type=int, default=5)
    args = ap.parse_args()
    corpus, queries = dev_set(args.dev_set)
    default = MSAModel.from_pretrained("default", device="cpu")
    fp32 = MSAModel.from_pretrained("default", device="cpu", dtype=torch.float32)
    bank = dev_bank(default, corpus, args.bank_cache)
    # one bank, the default model's (wiki-dev passages are long: the fp32 model would index them for ~25 min);
    # a bank built in one precision serves the other (cpu_default.py's cross-precision check)
    arms = {"bf16_keys": (default, False), "fp32_keys": (default, True), "fp32_model": (fp32, True)}

    def run(arm: str, question: str) -> tuple[list[str], float]:
        model, exact = arms[arm]
        model.config.routing.exact_scores = exact
        start = time.perf_counter()
        hits = model.retrieve(question, bank, k=args.k)
        return [h.id for h in hits], (time.perf_counter() - start) * 1000

    for q in queries[:5]:  # warm-up: keys prepared, caches filled
        for arm in arms:
            run(arm, q["question"])
    top: dict[str, list[list[str]]] = {arm: [] for arm in arms}
    ms: dict[str, list[float]] = {arm: [] for arm in arms}
    for n, q in enumerate(queries):
        order = list(arms) if n % 2 == 0 else list(reversed(arms))  # alternate who goes first
        for arm in order:
            got, t = run(arm, q["question"])
            top[arm].append(got)
            ms[arm].append(t)

    def recall(arm: str) -> float:
        return statistics.mean(len(set(q["gold_ids"]) & set(got)) / len(q["gold_ids"])
                               for q, got in zip(queries, top[arm]))

    result = {
        "benchmark": "cpu_scoring_dev", "msa_version": __version__, "torch": torch.__version__,
        "machine": platform.machine(), "torch_threads": torch.get_num_threads(),
        "dev_set": str(args.dev_set), "passages": len(corpus), "bank_tokens": bank.info()["tokens"],
        "questions": len(queries), "k": args.k,
        "arms": {"bf16_keys": "default (bf16) model, bfloat16 keys: the new default",
                 "fp32_keys": "default (bf16) model, float32 keys (routing.exact_scores=True): the old default",
                 "fp32_model": "the exact fp32 path (dtype=torch.float32)"},
        "recall@5": {arm: recall(arm) for arm in arms},
        "retrieve_p50_ms": {arm: statistics.median(ms[arm]) for arm in arms},
        "top5_set_changed_vs_fp32_keys": sum(set(a) != set(b) for a, b in zip(top["bf16_keys"], top["fp32_keys"])),
        "top5_order_changed_vs_fp32_keys": sum(a != b for a, b in zip(top["bf16_keys"], top["fp32_keys"])),
        "top5_set_changed_fp32_keys_vs_fp32_model": sum(
            set(a) != set(b) for a, b in zip(top["fp32_keys"], top["fp32_model"])),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(json.dumps({k: result[k] for k in ("recall@5", "retrieve_p50_ms", "top5_set_changed_vs_fp32_keys",
                                             "top5_order_changed_vs_fp32_keys",
                                             "top5_set_changed_fp32_keys_vs_fp32_model")}, indent=1))


if __name__ == "__main__":
    main()
