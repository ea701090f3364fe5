"""Would a title-only routing key help? An inference-only probe on wiki-dev (issue 22).

HotpotQA-style questions name the passage they need, and a passage's title sits in its first 32-token chunk,
pooled with the text after it. This probe gives every passage one more chunk holding only its title (the title
encoded alone: with document-wise RoPE and causal attention its states equal the first tokens of the passage's
own forward), so Eq. 2's max over chunks can match a title sharply. Compared on wiki-dev (the held-out split
`msa distill-data` writes; never ../shared/data/eval/), default model: the passages as banked, the titles alone,
the max of both per layer (the title chunk added), and mixes of the two sides' scores. Writes recall@5 to JSON.

    python benchmarks/title_chunk_probe.py --dev-set /tmp/wiki_pseudo/dev --bank-cache /tmp/wiki_dev_bank \
        --out benchmarks/results/router_training/title_chunk_probe_cpu.json
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from cpu_scoring_dev import dev_bank, dev_parser, dev_set
from layer_weights_probe import layer_scores, recall_at

from msa_core import MSAModel, __version__


def main() -> None:
    out = Path(__file__).parent / "results" / "router_training" / "title_chunk_probe_cpu.json"
    args = dev_parser(__doc__, out).parse_args()
    corpus, queries = dev_set(args.dev_set)
    model = MSAModel.from_pretrained("default", device="cpu")
    passages = dev_bank(model, corpus, args.bank_cache)
    titles = model.index([f"{r['title']}\n" for r in corpus], [r["id"] for r in corpus], show_progress_bar=False)
    assert [r.id for r in titles.docstore] == [r.id for r in passages.docstore]
    questions = [q["question"] for q in queries]
    full, alone = layer_scores(model, passages, questions), layer_scores(model, titles, questions)
    row = {rec.id: i for i, rec in enumerate(passages.docstore)}
    gold, everyone = [[row[g] for g in q["gold_ids"]] for q in queries], list(range(len(queries)))
    r = {"passages as banked (the default)": recall_at(full.mean(0), gold, everyone),
         "titles alone": recall_at(alone.mean(0), gold, everyone),
         "title chunk added (max of both per layer)": recall_at(torch.maximum(full, alone).mean(0), gold, everyone)}
    for w in (0.25, 0.5):
        r[f"scores mixed, title weight {w}"] = recall_at((full * (1 - w) + alone * w).mean(0), gold, everyone)
    result = {"benchmark": "title_chunk_probe", "msa_version": __version__, "dev_set": str(args.dev_set),
              "passages": len(corpus), "questions": len(queries), "title_tokens": titles.info()["tokens"],
              "recall@5": r}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
