"""Self-supervised span questions (train_data.add_span_pairs) on the CPU slice of precondition_cpu.py.

Same slice, held-out split, layers (12/24/28), `standardize` and 300 steps of 128 questions as
precondition_cpu.py; each row adds N span questions cut from the slice's training documents (the
documents, hence their cached states, are unchanged; only the new questions are encoded, about 70 ms
each on 2 cores, kept in --cache-dir). Writes benchmarks/results/router_training/span_pairs_cpu.json.

    python benchmarks/span_pairs_cpu.py [--spans 0,2160,6480] [--cache /tmp/precondition_cache.pt]
"""
import argparse
import copy
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from precondition_cpu import run, slice_arguments, write_result  # noqa: E402

from msa_core.training.cache import RaggedStates, cache_queries
from msa_core.training.data import add_span_pairs


def with_spans(c: dict, n: int, cache_dir: Path) -> dict:
    """The cache with n span questions added to its training split (their states cached once)."""
    path = cache_dir / f"spans_{n}.pt"
    if path.is_file():
        return {**c, **torch.load(path, weights_only=False)}
    from msa_core.model import MSAModel

    m = MSAModel.from_pretrained("default", device="cpu")
    train = copy.deepcopy(c["train"])
    n0 = len(train)
    add_span_pairs(train, n, seed=1)
    train.mine_bm25_negatives(30)
    new = cache_queries(m.backbone, m.tokenizer, train.queries[n0:], c["layers"],
                        position_offset=m.position_offset(m.config.routing.top_k), dtype=torch.float32)
    old = c["train_qs"]
    added = {"train": train, "train_qs": RaggedStates(torch.cat([old.x, new.x]),
                                                      torch.cat([old.offsets, new.offsets[1:] + old.offsets[-1]]))}
    torch.save(added, path)
    return {**c, **added}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--spans", default="0,2160,6480")
    ap.add_argument("--cache-dir", default="/tmp")
    args, c = slice_arguments(ap)
    runs = []
    for n in (int(x) for x in args.spans.split(",")):
        runs.append({"span_pairs": n, **run(with_spans(c, n, Path(args.cache_dir)) if n else c, "standardize",
                                            args.layers, args.steps, 5e-4)})
        print(json.dumps(runs[-1]), flush=True)
    write_result("span_pairs_cpu", c, args.layers, runs)


if __name__ == "__main__":
    main()
