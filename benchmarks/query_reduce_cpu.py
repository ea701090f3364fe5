"""Routers trained under each query reduction of the MSA format (max, mean over the question's routing tokens),
on the CPU slice of precondition_cpu.py (never eval; NQ and SelQA held out whole). router_knobs.py switched
the reduction of a router trained for max at inference time; this trains a router for each.
Writes benchmarks/results/router_training/query_reduce_cpu.json.

    python benchmarks/query_reduce_cpu.py [--cache /tmp/precondition_cache.pt]
"""
import argparse
import json
import platform
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from precondition_cpu import ROOT, build_cache, run  # noqa: E402

from msa_core.config import RoutingConfig  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", default="12,24,28")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--cache", default="/tmp/precondition_cache.pt")
    args = ap.parse_args()
    torch.set_num_threads(2)
    path = Path(args.cache)
    c = torch.load(path, weights_only=False) if path.is_file() else build_cache(path)
    layers = [int(x) for x in args.layers.split(",")]
    runs = []
    for reduce in ("max", "mean"):
        row = run(c, "standardize", layers, args.steps, 5e-4, routing=RoutingConfig(query_reduce=reduce))
        runs.append({"query_reduce": reduce, **row})
        print(json.dumps(runs[-1]), flush=True)
    result = {"layers": layers, "train_questions": len(c["train"]), "heldout_questions": len(c["held"]),
              "heldout_documents": len(c["held"].documents), "runs": runs, "device": "cpu",
              "threads": torch.get_num_threads(), "python": platform.python_version(), "torch": torch.__version__}
    out = ROOT / "results/router_training/query_reduce_cpu.json"
    out.write_text(json.dumps(result, indent=1))
    print("wrote", out)


if __name__ == "__main__":
    main()
