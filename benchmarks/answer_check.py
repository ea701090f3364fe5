"""Does a router change the default model's hybrid answers? Routers side by side in one run, on CPU (issue 22).

Data: NQ questions of `train/nq_qed_dev.jsonl` with QED's short answers, a source held out of every router's
training and never an evaluation set. The corpus is all its distinct passages (title on its own line, then the
text, as `msa compare` indexes them); N questions are drawn with a seed. Each arm (NAME=ROUTER, 'default' for
the shipped router) indexes the corpus with its own model and answers every question in hybrid mode (k
documents as prompt text, greedy). Scores per question, then means:

- answer recall: the share of the gold answer's tokens found in the generated text (SQuAD normalisation:
  lowercase, punctuation and articles dropped);
- SQuAD token F1 of the generated text against the gold answer;
- gold in prompt: whether the question's own passage is among the k documents the prompt holds.

Each arm after the first is compared with the first: the paired difference of each mean, with a 95% bootstrap
interval over questions.

    python benchmarks/answer_check.py --arm v11=default --arm p32s=p32s.safetensors \
        --out benchmarks/results/router_training/answer_check_v14_cpu.json
"""

from __future__ import annotations

import argparse
import json
import random
import re
import string
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from msa_core import MSAModel  # noqa: E402
from msa_integrations.compare.niah import shared_data_dir  # noqa: E402


def normalize(text: str) -> list[str]:
    """SQuAD's answer normalisation, as tokens."""
    text = "".join(c for c in text.lower() if c not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return text.split()


def answer_recall(prediction: str, gold: str) -> float:
    want, got = normalize(gold), set(normalize(prediction))
    return sum(t in got for t in want) / len(want) if want else 0.0


def token_f1(prediction: str, gold: str) -> float:
    p, g = normalize(prediction), normalize(gold)
    common = sum((Counter(p) & Counter(g)).values())
    if not p or not g or not common:
        return 0.0
    precision, recall = common / len(p), common / len(g)
    return 2 * precision * recall / (precision + recall)


def load(n: int, seed: int) -> tuple[list[dict], list[str], list[str]]:
    rows = [json.loads(line) for line in (shared_data_dir() / "train" / "nq_qed_dev.jsonl").open(encoding="utf-8")]
    passages = list(dict.fromkeys((r.get("title") or "", r["positive"]) for r in rows))
    ids = [f"p{i}" for i in range(len(passages))]
    index = {p: i for i, p in zip(ids, passages)}
    texts = [f"{title}\n{text}" if title else text for title, text in passages]
    picked = random.Random(seed).sample(rows, n)
    questions = [{"question": r["query"], "answer": r["answer"], "gold": index[(r.get("title") or "", r["positive"])]}
                 for r in picked]
    return questions, texts, ids


def bootstrap(diff: np.ndarray, seed: int, rounds: int = 2000) -> list[float]:
    rng = np.random.default_rng(seed)
    means = [diff[rng.integers(0, len(diff), len(diff))].mean() for _ in range(rounds)]
    return [round(float(np.percentile(means, 2.5)), 4), round(float(np.percentile(means, 97.5)), 4)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arm", action="append", required=True, help="NAME=ROUTER ('default': the shipped router)")
    ap.add_argument("--questions", type=int, default=200)
    ap.add_argument("--k", type=int, default=3, help="documents in the hybrid prompt")
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    questions, texts, ids = load(args.questions, args.seed)
    out = {"data": "train/nq_qed_dev.jsonl", "questions": len(questions), "documents": len(texts), "k": args.k,
           "max_new_tokens": args.max_new_tokens, "seed": args.seed, "arms": {}}
    per_question: dict[str, dict[str, np.ndarray]] = {}
    for arm in args.arm:
        name, _, router = arm.partition("=")
        model = MSAModel.from_pretrained("default", router=None if router == "default" else router)
        t = time.perf_counter()
        bank = model.index(texts, ids=ids, show_progress_bar=False)
        index_s = time.perf_counter() - t
        rows, t = [], time.perf_counter()
        for i, q in enumerate(questions):
            a = model.answer(q["question"], bank, mode="hybrid", k=args.k, max_new_tokens=args.max_new_tokens)
            rows.append({"recall": answer_recall(a.text, q["answer"]), "f1": token_f1(a.text, q["answer"]),
                         "gold_in_prompt": float(q["gold"] in a.doc_ids), "text": a.text, "doc_ids": a.doc_ids})
            if (i + 1) % 50 == 0:
                print(f"{name}: {i + 1}/{len(questions)} answered", flush=True)
        scores = {m: np.array([r[m] for r in rows]) for m in ("recall", "f1", "gold_in_prompt")}
        per_question[name] = scores
        out["arms"][name] = {"router": router, "chunk_size": model.config.encode.chunk_size,
                             "index_s": round(index_s, 1), "answer_s": round(time.perf_counter() - t, 1),
                             **{f"mean_{m}": round(float(v.mean()), 4) for m, v in scores.items()},
                             "answers": [{"question": q["question"], "gold": q["answer"], **r}
                                         for q, r in zip(questions, rows)]}
        print(name, {k: v for k, v in out["arms"][name].items() if k != "answers"}, flush=True)
        Path(args.out).write_text(json.dumps(out, indent=1))
    base = args.arm[0].partition("=")[0]
    out["paired_vs_" + base] = {
        name: {m: {"difference": round(float((v - per_question[base][m]).mean()), 4),
                   "ci95": bootstrap(v - per_question[base][m], args.seed)} for m, v in scores.items()}
        for name, scores in per_question.items() if name != base}
    print(json.dumps(out["paired_vs_" + base], indent=1), flush=True)
    Path(args.out).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
