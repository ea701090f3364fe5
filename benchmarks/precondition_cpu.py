"""Router training with and without preconditioning, on a CPU-sized slice of the training data (never eval).

Training: at most 120 questions per source of ../shared/data/train with NQ and SelQA held out whole (2,160
training questions over 2,302 documents; 240 held-out questions over 234 documents). The default backbone's
states are cached once (about 20 minutes on 2 cores; kept in --cache and reused), then each mode trains a
random-start router for 300 steps of 128 questions and reports held-out recall. One more row trains a
router 3x wider on the key side (9 kv heads instead of the attention's 3; the MSA format and the bank
tie the router to the attention's layout, so this row only measures whether width would pay).
Writes benchmarks/results/router_training/precondition_cpu.json.

    python benchmarks/precondition_cpu.py [--layers 12,24,28] [--cache /tmp/precondition_cache.pt]
"""
import argparse
import glob
import json
import platform
import time
from pathlib import Path

import torch

from msa_core.config import RoutingConfig
from msa_core.routing.projectors import RouterProjectors
from msa_core.training.cache import RaggedStates
from msa_core.training.precondition import condition
from msa_core.training.trainer import RouterTrainer, TrainConfig, evaluate

ROOT = Path(__file__).resolve().parent
CACHED_LAYERS = [2, 4, 7, 12, 16, 24, 28]


def build_cache(path: Path) -> dict:
    from msa_core.model import MSAModel
    from msa_core.training.cache import cache_documents, cache_queries
    from msa_core.training.data import load_pairs

    m = MSAModel.from_pretrained("default", device="cpu")
    files = sorted(glob.glob(str(ROOT.parents[1] / "shared/data/train/*.jsonl")))
    train, held = load_pairs(files, max_per_source=120).split(0.0, ["nq_qed_dev", "selqa"])
    train.mine_bm25_negatives(30)
    offset = m.position_offset(m.config.routing.top_k)
    out = {"layers": CACHED_LAYERS, "train": train, "held": held}
    for name, ts in (("held", held), ("train", train)):
        out[name + "_docs"] = cache_documents(m.backbone, m.tokenizer, ts.documents, CACHED_LAYERS, batch_size=16,
                                              max_tokens_per_batch=4096, dtype=torch.float32)
        out[name + "_qs"] = cache_queries(m.backbone, m.tokenizer, ts.queries, CACHED_LAYERS, position_offset=offset,
                                          dtype=torch.float32)
    torch.save(out, path)
    return out


def run(c: dict, mode: str, layers: list[int], steps: int, lr: float, kv_heads: int = 3,
        routing: RoutingConfig | None = None) -> dict:
    routing = routing or RoutingConfig()
    cols = [c["layers"].index(layer) for layer in layers]
    tq, td, hq, hd = (RaggedStates(c[k].x[:, cols].clone(), c[k].offsets)
                      for k in ("train_qs", "train_docs", "held_qs", "held_docs"))
    router = RouterProjectors.random(layers, tq.x.shape[-1], 9, kv_heads, 64)
    condition(router, layers, mode, [tq, hq], [td, hd])
    cfg = TrainConfig(steps=steps, batch_size=128, lr=lr, warmup_steps=30, eval_every=10**6, mine_at=[0.5],
                      precondition=mode)
    t = time.perf_counter()
    trainer = RouterTrainer(router, layers, c["train"], tq, td, c["held"], hq, hd, cfg, routing)
    trainer.run()
    res = evaluate(router, layers, hq, hd, c["held"].positives, routing)
    return {"mode": mode, "kv_heads": kv_heads, "lr": lr, "steps": steps, "final_train_loss": round(trainer.history[-1]["loss"], 3),
            "seconds": round(time.perf_counter() - t, 1),
            **{k: round(v, 4) for k, v in res.items() if k.startswith("recall")},
            "per_layer_recall@5": res["per_layer_recall@5"]}


def slice_arguments(ap: argparse.ArgumentParser) -> tuple[argparse.Namespace, dict]:
    """Add the options every CPU-slice benchmark shares (--layers, --steps, --cache), parse them, use 2 threads
    and load the cached slice (building it the first time)."""
    ap.add_argument("--layers", default="12,24,28")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--cache", default="/tmp/precondition_cache.pt")
    args = ap.parse_args()
    args.layers = [int(x) for x in args.layers.split(",")]
    torch.set_num_threads(2)
    path = Path(args.cache)
    return args, (torch.load(path, weights_only=False) if path.is_file() else build_cache(path))


def write_result(name: str, c: dict, layers: list[int], runs: list[dict]) -> None:
    """results/router_training/<name>.json: the slice's size, the runs and the machine."""
    result = {"layers": layers, "train_questions": len(c["train"]), "train_documents": len(c["train"].documents),
              "heldout_questions": len(c["held"]), "heldout_documents": len(c["held"].documents), "runs": runs,
              "device": "cpu", "threads": torch.get_num_threads(), "python": platform.python_version(),
              "torch": torch.__version__}
    out = ROOT / f"results/router_training/{name}.json"
    out.write_text(json.dumps(result, indent=1))
    print("wrote", out)


def main() -> None:
    args, c = slice_arguments(argparse.ArgumentParser())
    layers, runs = args.layers, []
    for mode in ("none", "standardize", "whiten"):
        runs.append(run(c, mode, layers, args.steps, 5e-4))
        print(json.dumps(runs[-1]), flush=True)
    runs.append(run(c, "standardize", layers, args.steps, 5e-4, kv_heads=9))
    print(json.dumps(runs[-1]), flush=True)
    write_result("precondition_cpu", c, layers, runs)


if __name__ == "__main__":
    main()
