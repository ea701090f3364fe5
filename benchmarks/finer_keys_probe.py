"""Routing v2 candidate (d), an inference-only probe (issue 22): does pooling the routing keys over fewer
tokens than P = 64 help the shipped router find its documents? The same router (trained with 64-token
chunks) ranks a dev retrieval set with the bank pooled over each chunk size; recall@k and the bank's bytes
per token side by side, BM25 beside them. A router trained for the finer keys is the real test; this says
whether the blur of 64-token keys is what costs recall. Never run on an evaluation set.

    python benchmarks/finer_keys_probe.py --dev-set wiki-dev=WIKI_PSEUDO/dev --sizes 64,32,16 \
        --out benchmarks/results/router_training/finer_keys_probe_cpu.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]

from router_v10 import recall  # noqa: E402

from msa_core.model import MSAModel  # noqa: E402
from msa_integrations.compare.dataset import load_dataset  # noqa: E402
from msa_integrations.compare.retrievers import BM25, MSARouting  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dev-set", required=True, metavar="NAME=FOLDER", help="a dev retrieval set (not evaluation)")
    ap.add_argument("--sizes", default="64,32,16", help="chunk sizes (tokens pooled per key)")
    ap.add_argument("--router", default="default")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    name, _, folder = args.dev_set.partition("=")
    data = load_dataset(folder)
    out = {"set": name, "questions": len(data.queries), "documents": len(data.corpus), "router": args.router,
           "bm25": recall(BM25(), data), "chunk_sizes": {}}
    print("bm25", out["bm25"], flush=True)
    for size in (int(s) for s in args.sizes.split(",")):
        model = MSAModel.from_pretrained("default", router=None if args.router == "default" else args.router,
                                         config={"encode": {"chunk_size": size}})
        retriever = MSARouting(model, name=f"p{size}", show_progress=False)
        t = time.perf_counter()
        row = recall(retriever, data)
        row["seconds"] = round(time.perf_counter() - t, 1)
        bank = retriever.bank
        tokens = bank.info()["tokens"]
        row["bank_bytes_per_token"] = round(bank.info()["bytes"] / tokens, 1)  # everything pooled at this size
        row["routing_key_bytes_per_token"] = round(bank.kr_bar.numel() * bank.kr_bar.element_size() / tokens, 1)
        out["chunk_sizes"][str(size)] = row
        print(size, row, flush=True)
        Path(args.out).write_text(json.dumps(out, indent=1))
    Path(args.out).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
