"""`msa distill-data`: router training data distilled from an offline teacher (msa_integrations/distill).
Registered in the `msa` parser through the entry point group `msa_core.commands`."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from msa_core.cli.common import positive_int


def run_distill(args: argparse.Namespace) -> int:
    from .teacher import build_distill_set

    bar = None
    if not args.no_progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=0, desc="teacher", unit="question", file=sys.stderr, leave=False)

    def progress(done: int, total: int) -> None:
        if bar is not None:
            bar.total = total
            bar.update(done - bar.n)

    try:
        summary = build_distill_set(args.corpus, args.out, exclude=args.exclude or [], dev_fraction=args.dev_fraction,
                                    keep_top=args.keep_top, negatives=args.negatives, depth=args.depth,
                                    seed=args.seed, progress=progress)
    finally:
        if bar is not None:
            bar.close()
    print(json.dumps(summary, indent=2), flush=True)
    print(f"train with: msa train-router ... {args.out}/train.jsonl; measure on: {args.out}/dev", flush=True)
    return 0


def register(command: Any) -> None:
    p = command("distill-data", run_distill, "Write router training data distilled from a teacher (MiniLM + BM25): "
                "template pseudo-questions over unlabelled titled passages, kept when the teacher finds their "
                "passages, with negatives it ranks below them; plus a dev retrieval set of held-out passages.")
    p.add_argument("corpus", help="passages, one JSON object per line: id, title, text")
    p.add_argument("--out", required=True, metavar="DIR", help="writes DIR/train.jsonl, DIR/dev/, DIR/summary.json")
    p.add_argument("--exclude", action="append", metavar="CORPUS", help="drop passages whose text occurs in this "
                   "corpus.jsonl (an evaluation set's); repeatable")
    p.add_argument("--dev-fraction", type=float, default=0.05, help="share of passages held out as the dev set")
    p.add_argument("--keep-top", type=positive_int, default=10, help="keep a question when the teacher ranks all "
                   "its passages in this top (default 10)")
    p.add_argument("--negatives", type=int, default=3, help="teacher negatives per question (default 3)")
    p.add_argument("--depth", type=positive_int, default=30, help="teacher hits read per question (default 30)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true")
