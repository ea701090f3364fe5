"""CPU benchmark of the embedded default model: encode throughput and query latency at 100K and 1M tokens.

    python benchmarks/cpu_default.py [--sizes 100000,1000000] [--out benchmarks/results/cpu_default.json]

Memory comes from the distractor corpus (2WikiMultiHopQA passages) and the Paul Graham essays of
../shared/data (cut into ~512-token documents), never from the evaluation sets. The bank grows
size by size: the 1M bank is the 100K bank plus more documents, so one run encodes 1M tokens once.
Baselines measured in the same run: the plain backbone forward over the same token batches (what
encoding costs without capture and pooling) and plain generation without memory.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from msa_core import MSAModel, __version__  # noqa: E402

DATA = Path(os.environ.get("MSA_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))


def load_documents(tokenizer, needed_tokens: int) -> tuple[list[str], list[str], list[int]]:
    """(ids, texts, token counts) until needed_tokens is reached."""
    ids, texts, counts, total = [], [], [], 0

    def take(doc_id: str, text: str) -> bool:
        nonlocal total
        n = len(tokenizer(text, add_special_tokens=False)["input_ids"])
        ids.append(doc_id), texts.append(text), counts.append(n)
        total += n
        return total >= needed_tokens

    with open(DATA / "distractors" / "2wiki_corpus.jsonl", encoding="utf-8") as f:
        for line in f:
            rec = json.loads(line)
            if take(rec["id"], f"{rec['title']}\n{rec['text']}"):
                return ids, texts, counts
    essays = json.loads((DATA / "haystack" / "paul_graham_essays.json").read_text(encoding="utf-8"))["text"]
    tokens = tokenizer(essays, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    for n, start in enumerate(range(0, len(tokens), 512)):
        end = min(start + 512, len(tokens))
        char_end = tokens[end][0] if end < len(tokens) else len(essays)
        if take(f"pg{n:05d}", essays[tokens[start][0]:char_end]):
            return ids, texts, counts
    raise SystemExit(f"only {total} tokens of benchmark text available, {needed_tokens} asked")


def questions(n: int) -> list[str]:
    out = []
    with open(DATA / "train" / "squad_dev.jsonl", encoding="utf-8") as f:
        for line in f:
            out.append(json.loads(line)["query"])
            if len(out) == n:
                return out
    return out


def timed(fn, repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return times


def summary(times: list[float]) -> dict[str, float]:
    s = sorted(times)
    return {"median_s": statistics.median(s), "p95_s": s[min(len(s) - 1, int(0.95 * len(s)))],
            "min_s": s[0], "n": len(s)}


def baseline_forward_tps(model: MSAModel, texts: list[str], budget_tokens: int = 16384) -> float:
    """Tokens/s of the bare backbone over right-padded batches like encoding uses (no capture, no pooling)."""
    from msa_core.inference.encode import plan_batches

    tok = [model.tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    tok = [t[: model.config.encode.max_doc_tokens] for t in tok]
    chosen, total = [], 0
    for t in tok:
        chosen.append(t)
        total += len(t)
        if total >= budget_tokens:
            break
    enc = model.config.encode
    start = time.perf_counter()
    with torch.no_grad():
        for batch in plan_batches([len(t) for t in chosen], enc.batch_size, enc.max_tokens_per_batch):
            width = len(chosen[batch[0]])
            ids = torch.zeros(len(batch), width, dtype=torch.long)
            for row, i in enumerate(batch):
                ids[row, : len(chosen[i])] = torch.tensor(chosen[i])
            model.backbone(ids, torch.arange(width).expand_as(ids), last_layer=max(model.layers))
    return total / (time.perf_counter() - start)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="100000,1000000", help="bank sizes in tokens, ascending")
    ap.add_argument("--queries", type=int, default=20, help="questions timed per size for retrieval")
    ap.add_argument("--asks", type=int, default=3, help="latent answers (32 new tokens) timed per size")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "cpu_default.json"))
    args = ap.parse_args()
    sizes = sorted(int(s) for s in args.sizes.split(","))

    t0 = time.perf_counter()
    model = MSAModel.from_pretrained("default", device="cpu")
    load_s = time.perf_counter() - t0
    ids, texts, counts = load_documents(model.tokenizer, sizes[-1])
    qs = questions(args.queries)
    result = {
        "benchmark": "cpu_default", "msa_version": __version__, "torch": torch.__version__,
        "device": {"kind": "cpu", "processor": _cpu_name(),
                   "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads()},
        "model": "SmolLM2-135M-Instruct (default, native router)", "model_load_s": load_s,
        "config": model.config.model_dump(), "sizes": [],
    }
    print(f"model loaded in {load_s:.1f} s; {len(texts)} documents, {sum(counts)} tokens", file=sys.stderr)

    bank = model.new_bank()
    done, cumulative = 0, 0
    for size in sizes:
        upto = done
        while upto < len(texts) and cumulative < size:
            cumulative += counts[upto]
            upto += 1
        # The baseline runs on the first ~16K tokens of this size's new documents, just before them.
        forward_tps = baseline_forward_tps(model, texts[done:upto])
        load_before = os.getloadavg()[0]
        t = time.perf_counter()
        model.add(bank, texts[done:upto], ids=ids[done:upto], show_progress_bar=True)
        encode_s = time.perf_counter() - t
        new_tokens = sum(counts[done:upto])
        done = upto
        model.retrieve(qs[0], bank, k=5)  # warm-up
        retrieve = [timed(lambda q=q: model.retrieve(q, bank, k=5), 1)[0] for q in qs]
        ask = timed(lambda: model.answer(qs[1], bank, mode="latent", max_new_tokens=32), args.asks)
        plain = timed(lambda: model.answer(qs[1], None, max_new_tokens=32), args.asks)
        entry = {
            "bank_tokens": bank.info()["tokens"], "documents": len(bank), "chunks": bank.num_chunks,
            "bank_bytes": bank.info()["bytes"], "bytes_per_token": bank.info()["bytes"] / bank.info()["tokens"],
            "encoded_tokens": new_tokens, "encode_s": encode_s, "encode_tokens_per_s": new_tokens / encode_s,
            "baseline_bare_forward_tokens_per_s": forward_tps,
            "encode_vs_bare_forward": (new_tokens / encode_s) / forward_tps,
            "retrieve_k5": summary(retrieve), "ask_latent_32_tokens": summary(ask),
            "ask_plain_no_memory_32_tokens": summary(plain),
            "ask_latent_vs_plain": statistics.median(ask) / statistics.median(plain),
            # other work on the machine slows every number; a load near the core count means none ran
            "load_average_1min": {"before_encode": load_before, "after_queries": os.getloadavg()[0]},
        }
        result["sizes"].append(entry)
        print(json.dumps(entry, indent=1), file=sys.stderr)
        _write(result, Path(args.out))  # after every size, so a long run keeps what it measured
    print(f"wrote {args.out}", file=sys.stderr)


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _write(result: dict, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=2))
    tmp.replace(out)


if __name__ == "__main__":
    main()
