"""Does weighting the question's tokens rank better than Eq. 2's max? An inference-only probe on wiki-dev (issue 22).

Eq. 2 takes the max over question tokens of each token's best chunk of a document, so one (token, chunk) pair
decides. Issue 22 proposed weighting question tokens by IDF from the bank's own tokens. This takes every routing
query of every wiki-dev question (the held-out split `msa distill-data` writes; never ../shared/data/eval/) from
the engine's own query forward, scores each token against every passage (its best chunk; cosine, mean over
heads, as `routing.scores`), and compares token reductions on those scores: the max (Eq. 2), the max of
IDF-weighted scores, the max with an IDF bonus, IDF-weighted means (ColBERT order), the max plus a weighted mean,
and the mean of the top tokens; a choice made on one random half is measured on the other. Writes recall@5.

    python benchmarks/token_weights_probe.py --dev-set /tmp/wiki_pseudo/dev --bank-cache /tmp/wiki_dev_bank \
        --out benchmarks/results/router_training/token_weights_probe_cpu.json
"""
from __future__ import annotations

import collections
import json
import math
import random
from collections.abc import Callable
from pathlib import Path

import torch
from cpu_scoring_dev import dev_bank, dev_parser, dev_set

from msa_core import MSAModel, __version__
from msa_core.inference.generate import build_prompt, route_questions
from msa_core.inference.memory_router import MemoryRouter, scoring_keys


class KeepQueries(MemoryRouter):
    """A hook that keeps the routing queries of `route_questions` instead of scoring them."""

    def score_queries(self, queries: dict, states_dtype: torch.dtype = torch.float32) -> None:
        self.kept = queries


def question_groups(model: MSAModel, bank, question: str) -> tuple[list[torch.Tensor], int, list[int]]:
    """(per routing layer the question's cosine-normalised routing queries summed per kv group [T, Hkv, D], as
    the kernels' `group_queries` does; the number of query heads H; the T routing token ids), from the engine's
    own query forward."""
    cfg, tok = model.config.routing, model.tokenizer
    prompt = build_prompt(tok, question)
    hook = KeepQueries(bank, model.router, cfg, None)
    route_questions(model.backbone, [prompt], hook, offset=model.position_offset(cfg.top_k),
                    pad_id=tok.pad_token_id or 0)
    mask, kv = hook.routing_mask[0], bank.kr_bar.shape[2]
    groups = []
    for layer in model.layers:
        q = torch.nn.functional.normalize(hook.kept[layer][0][mask].float(), dim=-1)  # [T, H, D]
        t, h, d = q.shape
        groups.append(q.view(t, kv, h // kv, d).sum(2))
    return groups, h, [i for i, r in zip(prompt.ids, prompt.routing) if r]


def best_chunk(bank, chunk_scores: torch.Tensor) -> torch.Tensor:
    """[..., C] chunk scores -> [..., N] each passage's best chunk."""
    index = bank.chunk_doc.long().expand(*chunk_scores.shape[:-1], -1)
    return torch.full((*chunk_scores.shape[:-1], bank.num_parts), float("-inf")).scatter_reduce(
        -1, index, chunk_scores, "amax")


def token_doc_scores(model: MSAModel, bank, question: str, keys: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
    """([L, T, N] each routing token's score of each passage (its best chunk), the T routing token ids)."""
    groups, h, tokens = question_groups(model, bank, question)
    return torch.stack([best_chunk(bank, g.flatten(1) @ keys[li].flatten(1).T / h)
                        for li, g in enumerate(groups)]), tokens


def reductions() -> dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]]:
    """name -> f(scores [L, T, N], idf [T]) -> [N] (layers averaged, as retrieve does)."""
    out = {"max (Eq. 2, the default)": lambda s, w: s.amax(1).mean(0)}
    for g in (0.25, 0.5, 1.0):
        out[f"max of scores x (idf / max idf)^{g}"] = (
            lambda s, w, g=g: (s * (w / w.max()).pow(g)[:, None]).amax(1).mean(0))
    for b in (0.02, 0.05, 0.1):
        out[f"max of scores + {b} idf / max idf"] = lambda s, w, b=b: (s + b * (w / w.max())[:, None]).amax(1).mean(0)
    for g in (0.0, 1.0, 2.0):
        out[f"mean weighted by idf^{g} (ColBERT order)"] = (
            lambda s, w, g=g: ((s * w.pow(g)[:, None]).sum(1) / w.pow(g).sum()).mean(0))
    for lam in (0.25, 0.5):
        out[f"max + {lam} x idf-weighted mean"] = (
            lambda s, w, lam=lam: (s.amax(1) + lam * (s * w[:, None]).sum(1) / w.sum()).mean(0))
    for k in (2, 3):
        out[f"mean of the top {k} tokens"] = lambda s, w, k=k: s.topk(min(k, s.shape[1]), dim=1).values.mean(1).mean(0)
    return out


def main() -> None:
    out = Path(__file__).parent / "results" / "router_training" / "token_weights_probe_cpu.json"
    args = dev_parser(__doc__, out).parse_args()
    corpus, queries = dev_set(args.dev_set)
    model = MSAModel.from_pretrained("default", device="cpu")
    bank = dev_bank(model, corpus, args.bank_cache)
    n = bank.num_parts
    df = collections.Counter()  # document frequency of the model's tokens in the bank's texts
    for rec in bank.docstore:
        df.update(set(model.tokenizer(rec.text, add_special_tokens=False)["input_ids"]))
    keys = scoring_keys(bank, model.config.routing.normalization, torch.float32)
    row = {rec.id: i for i, rec in enumerate(bank.docstore)}
    gold = [[row[g] for g in q["gold_ids"]] for q in queries]
    ranked: dict[str, list[list[int]]] = collections.defaultdict(list)
    with torch.no_grad():
        for q in queries:
            scores, tokens = token_doc_scores(model, bank, q["question"], keys)
            idf = torch.tensor([math.log((n - df[t] + 0.5) / (df[t] + 0.5) + 1.0) for t in tokens])
            for name, reduce in reductions().items():
                ranked[name].append(torch.topk(reduce(scores, idf), 5).indices.tolist())

    def recall(name: str, rows: list[int]) -> float:
        return sum(len(set(ranked[name][i]) & set(gold[i])) / len(gold[i]) for i in rows) / len(rows)

    everyone = list(range(len(queries)))
    shuffled = everyone[:]
    random.Random(0).shuffle(shuffled)
    halves = [sorted(shuffled[: len(shuffled) // 2]), sorted(shuffled[len(shuffled) // 2:])]
    chosen = []
    for a, b in ((0, 1), (1, 0)):
        best = max(ranked, key=lambda name: recall(name, halves[a]))
        chosen.append({"chosen": best, "recall@5_on_its_half": recall(best, halves[a]),
                       "recall@5_on_the_other_half": recall(best, halves[b]),
                       "default_on_the_other_half": recall("max (Eq. 2, the default)", halves[b])})
    result = {"benchmark": "token_weights_probe", "msa_version": __version__, "dev_set": str(args.dev_set),
              "passages": len(corpus), "questions": len(queries),
              "recall@5": {name: recall(name, everyone) for name in ranked}, "chosen_on_one_half": chosen}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
