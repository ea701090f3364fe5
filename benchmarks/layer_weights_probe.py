"""Does weighting the routing layers rank better than their mean? An inference-only probe on wiki-dev (issue 22).

`retrieve` ranks by the mean of the routing layers' document scores (`routing.layer_aggregate="mean"`). This
scores every wiki-dev passage (the held-out split `msa distill-data` writes; never ../shared/data/eval/) in every
routing layer of the default model once, then compares, on the same scores: each layer alone, the mean, the max,
the mean of every subset of layers, per-question z-scores, and weights chosen by grid search on one random half
of the questions and measured on the other (both ways), so the gain of choosing is not read on the questions it
was chosen on. Writes recall@5 of each to JSON.

    python benchmarks/layer_weights_probe.py --dev-set /tmp/wiki_pseudo/dev --bank-cache /tmp/wiki_dev_bank \
        --out benchmarks/results/router_training/layer_weights_probe_cpu.json
"""
from __future__ import annotations

import itertools
import json
import random
from pathlib import Path

import torch
from cpu_scoring_dev import dev_bank, dev_parser, dev_set

from msa_core import MSAModel, __version__

GRID = (0.0, 0.5, 1.0, 1.5, 2.0)  # per-layer weights searched on a half


def recall_at(total: torch.Tensor, gold: list[list[int]], rows: list[int], k: int = 5) -> float:
    """Mean over questions `rows` of the share of their gold passages in the top k of total [Q, N]."""
    top = torch.topk(total[rows], k, dim=1).indices.tolist()
    return sum(len(set(t) & set(gold[q])) / len(gold[q]) for t, q in zip(top, rows)) / len(rows)


def layer_scores(model: MSAModel, bank, questions: list[str]) -> torch.Tensor:
    """[L, Q, N] every routing layer's score of every bank row (bank row order), as retrieve computes them."""
    allowed = bank.row_mask(None)
    with torch.no_grad():
        return torch.cat([model._route_scores(questions[i:i + 16], bank, allowed).float()
                          for i in range(0, len(questions), 16)], dim=1)


def main() -> None:
    out = Path(__file__).parent / "results" / "router_training" / "layer_weights_probe_cpu.json"
    args = dev_parser(__doc__, out).parse_args()
    corpus, queries = dev_set(args.dev_set)
    model = MSAModel.from_pretrained("default", device="cpu")
    bank = dev_bank(model, corpus, args.bank_cache)
    row = {rec.id: i for i, rec in enumerate(bank.docstore)}
    gold = [[row[g] for g in q["gold_ids"]] for q in queries]
    scores = layer_scores(model, bank, [q["question"] for q in queries])  # [L, Q, N]
    layers, everyone = model.layers, list(range(len(queries)))
    result: dict = {"benchmark": "layer_weights_probe", "msa_version": __version__, "dev_set": str(args.dev_set),
                    "passages": len(corpus), "questions": len(queries), "layers": layers, "recall@5": {}}
    r = result["recall@5"]
    for i, layer in enumerate(layers):
        r[f"layer {layer} alone"] = recall_at(scores[i], gold, everyone)
    r["mean (the default)"] = recall_at(scores.mean(0), gold, everyone)
    r["max"] = recall_at(scores.amax(0), gold, everyone)
    z = (scores - scores.mean(2, keepdim=True)) / scores.std(2, keepdim=True)
    r["mean of per-question z-scores"] = recall_at(z.mean(0), gold, everyone)
    for size in range(2, len(layers)):
        for subset in itertools.combinations(range(len(layers)), size):
            r[f"mean of layers {[layers[i] for i in subset]}"] = recall_at(scores[list(subset)].mean(0), gold, everyone)
    shuffled = everyone[:]
    random.Random(0).shuffle(shuffled)
    halves = [sorted(shuffled[: len(shuffled) // 2]), sorted(shuffled[len(shuffled) // 2:])]
    result["weights_chosen_on_one_half"] = []
    for chosen_on, measured_on in ((0, 1), (1, 0)):
        best = max((w for w in itertools.product(GRID, repeat=len(layers)) if sum(w) > 0),
                   key=lambda w: recall_at((scores * torch.tensor(w).view(-1, 1, 1)).sum(0), gold, halves[chosen_on]))
        weighted = (scores * torch.tensor(best).view(-1, 1, 1)).sum(0)
        result["weights_chosen_on_one_half"].append({
            "weights": dict(zip(map(str, layers), best)),
            "recall@5_on_the_half_it_was_chosen_on": recall_at(weighted, gold, halves[chosen_on]),
            "recall@5_on_the_other_half": recall_at(weighted, gold, halves[measured_on]),
            "mean_on_the_other_half": recall_at(scores.mean(0), gold, halves[measured_on])})
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
