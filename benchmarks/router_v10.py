"""Routing v2 (issue 22): engine recall of several routers, side by side in one run, with BM25 beside them.

Each arm is NAME=ROUTER[:QUERY_REDUCE[:CHUNK_SIZE]]: a router file (or 'default' for the shipped one), the scoring
order (max: paper Eq. 2; colbert: late interaction, routing/scores.py) and the tokens pooled per key (default:
what the router file records, else 64). For every arm the script indexes each set
through the engine and ranks its questions (as `msa compare` does): the dev NIAH (256K tokens, seed 1) that the
ship rule reads, and HotpotQA-100 and NIAH 1M (seed 0), reported only. BM25 (bm25s, the harness's) runs on
the same sets. Per-question latency is timed on the device the script runs on.

    python benchmarks/router_v10.py --arm v8=default:max --arm late=r.safetensors:colbert \
        --hotpotqa ../shared/data/eval/hotpotqa100 --out benchmarks/results/router_training/v10_eval.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from msa_core.model import MSAModel  # noqa: E402
from msa_integrations.compare.dataset import load_dataset  # noqa: E402
from msa_integrations.compare.metrics import retrieval_metrics  # noqa: E402
from msa_integrations.compare.niah import NIAHSpec, generate_niah  # noqa: E402
from msa_integrations.compare.retrievers import BM25, MSARouting  # noqa: E402

KS = (1, 2, 5, 10)


def recall(retriever, data) -> dict:
    retriever.index(data.corpus)
    questions = [q.question for q in data.queries]
    times, hits = [], []
    for q in questions:
        t = time.perf_counter()
        hits.append(retriever.search([q], max(KS))[0])
        times.append((time.perf_counter() - t) * 1000)
    m = retrieval_metrics([[d for d, _ in h] for h in hits], [q.gold_ids for q in data.queries], KS)
    out = {k: round(v, 4) for k, v in m.items() if k.startswith("recall")}
    out["latency_ms_p50"] = round(statistics.median(times), 2)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arm", action="append", required=True, help="NAME=ROUTER[:QUERY_REDUCE[:CHUNK_SIZE]]")
    ap.add_argument("--hotpotqa", help="HotpotQA-100 folder (reported only)")
    ap.add_argument("--dev-set", action="append", default=[], metavar="NAME=FOLDER",
                    help="a held-out training source as a retrieval set (benchmarks/source_as_eval_set.py)")
    ap.add_argument("--skip-niah", action="store_true", help="no NIAH sets at all (CPU spot checks)")
    ap.add_argument("--niah-dir", default="niah_sets", help="where the NIAH sets are generated")
    ap.add_argument("--skip-niah1m", action="store_true")
    ap.add_argument("--dev-niah-tokens", type=int, default=256_000, help="size of the dev NIAH (smoke runs: less)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()

    sets = {}
    for name, spec in (("dev_niah_256k", NIAHSpec(tokens=args.dev_niah_tokens, task="single", queries=100, seed=1)),
                       ("niah1m_reported_only", NIAHSpec(tokens=1_000_000, task="single", queries=100, seed=0))):
        if args.skip_niah or (name.startswith("niah1m") and args.skip_niah1m):
            continue
        folder = Path(args.niah_dir) / name
        if not (folder / "queries.jsonl").is_file():
            generate_niah(spec, folder, overwrite=True)
        sets[name] = load_dataset(str(folder))
    for item in args.dev_set:
        name, _, folder = item.partition("=")
        sets[name] = load_dataset(folder)
    if args.hotpotqa:
        sets["hotpotqa100_reported_only"] = load_dataset(args.hotpotqa)

    result = {"device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu", "arms": {}, "bm25": {}}
    for name, data in sets.items():
        result["bm25"][name] = recall(BM25(), data)
        print(name, "bm25", result["bm25"][name], flush=True)
    for arm in args.arm:
        name, _, spec = arm.partition("=")
        router, _, rest = spec.partition(":")
        reduce, _, chunk = rest.partition(":")
        config = {**({"routing": {"query_reduce": reduce}} if reduce else {}),
                  **({"encode": {"chunk_size": int(chunk)}} if chunk else {})} or None
        model = MSAModel.from_pretrained("default", router=None if router == "default" else router,
                                         config=config, device=args.device)
        row = {"router": router, "query_reduce": model.config.routing.query_reduce,
               "chunk_size": model.config.encode.chunk_size}
        for set_name, data in sets.items():
            row[set_name] = recall(MSARouting(model, name=name, show_progress=False), data)
            print(name, set_name, row[set_name], flush=True)
        result["arms"][name] = row
        Path(args.out).write_text(json.dumps(result, indent=1))
    Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
