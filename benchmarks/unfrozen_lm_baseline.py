"""The LM loss of the untouched default model on the held-out documents unfrozen_router.py measures drift on.

unfrozen_router.py reports "heldout_lm_loss" (next-token loss over the first 256 held-out documents, at most
512 tokens each) before and after training; a run with --skip-before has no "before". This script gives
that number for the base model (or, with --router, for a tuned router's backbone) with the same split and
code. Writes benchmarks/results/router_training/unfrozen_lm_baseline_cpu.json, or --out (about 10 minutes
on 2 cores).

    python benchmarks/unfrozen_lm_baseline.py [--data '../shared/data/train/*.jsonl'] [--router FILE --out F]
"""
import argparse
import glob
import json
import platform
from pathlib import Path

import torch

from msa_core.model import MSAModel
from msa_core.training.data import load_pairs
from msa_core.training.tuned import TRAIN_DOC_TOKENS, lm_loss, lower_documents

ROOT = Path(__file__).resolve().parent


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default=str(ROOT.parents[1] / "shared/data/train/*.jsonl"))
    ap.add_argument("--first-trainable", type=int, default=12)
    ap.add_argument("--router", default="native", help="a router file whose backbone delta is measured (native: "
                    "the base model)")
    ap.add_argument("--out", default=str(ROOT / "results/router_training/unfrozen_lm_baseline_cpu.json"))
    args = ap.parse_args()
    torch.set_num_threads(2)
    m = MSAModel.from_pretrained("default", device="cpu", dtype=torch.float32, router=args.router)
    _, held = load_pairs(sorted(glob.glob(args.data)), title_rate=0.5).split(0.01, ["nq_qed_dev", "selqa"])
    docs = list(range(min(256, len(held.documents))))
    lower = lower_documents(m.backbone, m.tokenizer, [held.documents[i] for i in docs], args.first_trainable,
                            2048, torch.float32)
    with torch.no_grad():
        loss = sum(lm_loss(m.backbone, lower, docs[i:i + 32], args.first_trainable, TRAIN_DOC_TOKENS).item()
                   * len(docs[i:i + 32]) for i in range(0, len(docs), 32)) / len(docs)
    result = {"heldout_lm_loss": round(loss, 4), "router": Path(args.router).name, "documents": len(docs),
              "device": "cpu", "dtype": "float32",
              "python": platform.python_version(), "torch": torch.__version__}
    out = Path(args.out)
    out.write_text(json.dumps(result, indent=1))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
