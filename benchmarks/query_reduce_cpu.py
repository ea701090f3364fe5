"""Routers trained under each query reduction of the MSA format (max, mean over the question's routing tokens),
on the CPU slice of precondition_cpu.py (never eval; NQ and SelQA held out whole). router_knobs.py switched
the reduction of a router trained for max at inference time; this trains a router for each.
Writes benchmarks/results/router_training/query_reduce_cpu.json.

    python benchmarks/query_reduce_cpu.py [--cache /tmp/precondition_cache.pt]
"""
import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from precondition_cpu import run, slice_arguments, write_result  # noqa: E402

from msa_core.config import RoutingConfig  # noqa: E402


def main() -> None:
    args, c = slice_arguments(argparse.ArgumentParser(description=__doc__.splitlines()[0]))
    layers, runs = args.layers, []
    for reduce in ("max", "mean"):
        row = run(c, "standardize", layers, args.steps, 5e-4, routing=RoutingConfig(query_reduce=reduce))
        runs.append({"query_reduce": reduce, **row})
        print(json.dumps(runs[-1]), flush=True)
    write_result("query_reduce_cpu", c, layers, runs)


if __name__ == "__main__":
    main()
