"""What int8 routing keys cost in ranking quality, decided on a dev split of training data (issue 23).

`routing.score_keys="int8"` scores against the bank's routing keys quantised once per bank state to int8 with a
float32 scale per chunk and kv head (`routing.scores.quantized_keys`): half the bytes of bfloat16 keys, which is
what a GPU streams per question from a large bank (the scoring step of a 100M-token MSA-4B bank reads 57.6 GB of
bfloat16 K̄_R). This script measures the ranking on wiki-dev (the held-out split `msa distill-data` writes from
Wikipedia passages the router never trained on; never ../shared/data/eval/) with the default model on CPU, where
the PyTorch path scores the dequantised int8 keys (the numbers the GPU kernel computes, to its bf16 query
rounding): float32 keys (exact_scores), the default bfloat16 keys, and int8 keys. Writes recall@5, how many
top-5 sets changed against the float32 keys, and the largest per-layer score difference, to JSON.

    python benchmarks/int8_keys_dev.py --dev-set /tmp/wiki_pseudo/dev --bank-cache /tmp/wiki_dev_bank \
        --out benchmarks/results/int8_keys_dev.json
"""
from __future__ import annotations

import json
import platform
import statistics
import time
from pathlib import Path

import torch
from cpu_scoring_dev import dev_bank, dev_parser, dev_set
from token_weights_probe import best_chunk, question_groups

from msa_core import MSAModel, __version__
from msa_core.inference.memory_router import scoring_keys

ARMS = {  # name -> (exact_scores, score_keys)
    "fp32_keys": (True, "bank"),
    "bf16_keys": (False, "bank"),
    "int8_keys": (False, "int8"),
}


def int8_group_sums(g: torch.Tensor) -> torch.Tensor:
    """Each query group sum [..., D] rounded to steps of its largest |entry| / 127 (group_queries' int8 pieces)."""
    step = g.abs().amax(-1, keepdim=True) / 127
    return torch.round(g / torch.where(step > 0, step, 1.0)) * step


def kernel_top(model: MSAModel, bank, question: str, k: int) -> dict[str, list[str]]:
    """The top k ids as the GPU kernel scores int8 keys, per query format: the normalised queries summed per kv
    group (`group_queries`), then rounded to bfloat16 (the default) or to int8 steps (INT8_QUERY_DOTS), times the
    dequantised keys; each passage's best chunk, layers averaged."""
    keys = scoring_keys(bank, model.config.routing.normalization, int8=True)  # dequantised, once per bank state
    groups, h, _ = question_groups(model, bank, question)
    totals = {"bf16_queries": 0.0, "int8_queries": 0.0}
    for li, group in enumerate(groups):
        for name, g in (("bf16_queries", group.bfloat16().float()), ("int8_queries", int8_group_sums(group))):
            docs = best_chunk(bank, (g.flatten(1) @ keys[li].flatten(1).T / h).amax(0))
            totals[name] = totals[name] + docs / len(groups)
    return {name: [bank.docstore[i].id for i in torch.topk(v, k).indices.tolist()] for name, v in totals.items()}


def main() -> None:
    ap = dev_parser(__doc__, Path(__file__).parent / "results" / "int8_keys_dev.json")
    ap.add_argument("--k", type=int, default=5)
    args = ap.parse_args()
    corpus, queries = dev_set(args.dev_set)
    model = MSAModel.from_pretrained("default", device="cpu")
    bank = dev_bank(model, corpus, args.bank_cache)
    rc = model.config.routing
    start = time.perf_counter()
    top: dict[str, list[list[str]]] = {arm: [] for arm in ARMS}
    layer_scores: dict[str, list[dict]] = {arm: [] for arm in ARMS}
    for q in queries:
        for arm, (exact, keys) in ARMS.items():
            rc.score_keys = "bank"  # assignments are validated one by one: never int8 with exact scores
            rc.exact_scores, rc.score_keys = exact, keys
            hits = model.retrieve(q["question"], bank, k=args.k, layer_scores=True)
            top[arm].append([h.id for h in hits])
            layer_scores[arm].append({h.id: h.layer_scores for h in hits})
        for name, ids in kernel_top(model, bank, q["question"], args.k).items():
            top.setdefault(f"int8_keys_{name}_as_the_kernel", []).append(ids)

    def recall(arm: str) -> float:
        return statistics.mean(len(set(q["gold_ids"]) & set(got)) / len(q["gold_ids"])
                               for q, got in zip(queries, top[arm]))

    def largest_difference(arm: str) -> float:
        """Largest |score - fp32 keys' score| over the layers of the documents both arms returned."""
        diffs = [abs(scores[doc][layer] - ref[doc][layer])
                 for scores, ref in zip(layer_scores[arm], layer_scores["fp32_keys"])
                 for doc in scores.keys() & ref.keys() for layer in ref[doc]]
        return max(diffs)

    a = model.backbone.args
    per_token = {"bf16": 2 * a.kv_heads * a.head_dim, "int8": a.kv_heads * a.head_dim + 4 * a.kv_heads}
    result = {
        "benchmark": "int8_keys_dev", "msa_version": __version__, "torch": torch.__version__,
        "machine": platform.machine(), "dev_set": str(args.dev_set), "passages": len(corpus),
        "bank_tokens": bank.info()["tokens"], "questions": len(queries), "k": args.k,
        "arms": {"fp32_keys": "float32 unit keys (routing.exact_scores=True)",
                 "bf16_keys": "bfloat16 unit keys (the CPU default for the bf16 model)",
                 "int8_keys": "int8 keys with a float32 scale per chunk and kv head (routing.score_keys='int8')"},
        "recall@5": {arm: recall(arm) for arm in top},
        "kernel_arms": "the two *_as_the_kernel arms score as the GPU kernel does with int8 keys (the query group "
                       "sums rounded to bf16, the default, or to int8 steps: routing_triton.INT8_QUERY_DOTS)",
        "top5_set_changed_vs_fp32_keys": {arm: sum(set(x) != set(y) for x, y in zip(top[arm], top["fp32_keys"]))
                                          for arm in top if arm != "fp32_keys"},
        "top5_order_changed_vs_fp32_keys": {arm: sum(x != y for x, y in zip(top[arm], top["fp32_keys"]))
                                            for arm in top if arm != "fp32_keys"},
        "largest_layer_score_difference_vs_fp32_keys": {arm: largest_difference(arm)
                                                        for arm in ARMS if arm != "fp32_keys"},
        "routing_key_bytes_per_chunk_and_layer": per_token,
        "seconds": round(time.perf_counter() - start, 1),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(json.dumps({k: result[k] for k in ("recall@5", "top5_set_changed_vs_fp32_keys",
                                             "top5_order_changed_vs_fp32_keys",
                                             "largest_layer_score_difference_vs_fp32_keys")}, indent=1))


if __name__ == "__main__":
    main()
