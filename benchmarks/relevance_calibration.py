"""Fit the shipped router's relevance calibration and measure what `score_threshold` then means.

    .venv/bin/python benchmarks/relevance_calibration.py [--questions 300] [--write-sidecar]

Data: NQ questions of `train/nq_qed_dev.jsonl`, a source held out of the shipped router's training (v8, v10, v11 and v14), never the
eval set. The corpus is the questions' own passages; half the questions fit (a, b) (class-balanced
logistic regression of gold vs other documents on the raw routing score, msa_core/routing/calibration.py), the
other half measure it. Unrelated questions (random letters, Debian package questions) measure what
passes a threshold when nothing in the bank is relevant. Baseline: all-MiniLM-L6-v2 + FAISS (L2) with
LangChain's relevance map for it (1 - d/sqrt(2), d the squared L2 distance FAISS returns), on the same
pairs. Writes benchmarks/results/relevance_calibration.json, and with --write-sidecar the calibration
beside the shipped router.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from msa_core import MSAModel  # noqa: E402
from msa_core.checkpoints.defaults import default_router_path
from msa_core.routing.calibration import calibrated, fit_calibration, sidecar_path  # noqa: E402
from msa_integrations.compare.niah import shared_data_dir

THRESHOLDS = (0.3, 0.5, 0.7)


def load(n: int, seed: int) -> tuple[list[str], list[str], list[str], list[str]]:
    rows = [json.loads(line) for line in (shared_data_dir() / "train" / "nq_qed_dev.jsonl").open()]
    random.Random(seed).shuffle(rows)
    rows = rows[:n]
    docs = list(dict.fromkeys(r["positive"] for r in rows))
    ids = [f"d{i}" for i in range(len(docs))]
    gold = [ids[docs.index(r["positive"])] for r in rows]
    return [r["query"] for r in rows], gold, docs, ids


def unrelated(n: int, seed: int) -> list[str]:
    rng = random.Random(seed + 1)
    letters = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz ") for _ in range(rng.randint(20, 60)))
               for _ in range(n // 2)]
    debian = [json.loads(line)["query"] for line in (shared_data_dir() / "train" / "debian_descriptions.jsonl").open()]
    return letters + debian[:n - n // 2]


def split(scores: list[dict[str, float]], gold: list[str]) -> tuple[np.ndarray, np.ndarray]:
    pos = [s[g] for s, g in zip(scores, gold)]
    neg = [v for s, g in zip(scores, gold) for d, v in s.items() if d != g]
    return np.array(pos), np.array(neg)


def pass_rates(rel: dict[str, np.ndarray]) -> dict[str, dict[str, float]]:
    return {f"{t}": {k: float((v >= t).mean()) for k, v in rel.items()} for t in THRESHOLDS}


def minilm_scores(questions: list[str], docs: list[str], ids: list[str]) -> list[dict[str, float]]:
    from sentence_transformers import SentenceTransformer

    from msa_integrations.compare.retrievers import minilm_path

    st = SentenceTransformer(minilm_path(), device="cpu")
    q = st.encode(questions, normalize_embeddings=True, batch_size=64)
    d = st.encode(docs, normalize_embeddings=True, batch_size=64)
    cos = q @ d.T
    return [dict(zip(ids, row.tolist())) for row in cos]


def faiss_relevance(cos: np.ndarray) -> np.ndarray:
    return 1.0 - (2.0 - 2.0 * cos) / math.sqrt(2.0)  # LangChain FAISS: 1 - d/sqrt(2), d = squared L2


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--questions", type=int, default=300)
    ap.add_argument("--unrelated", type=int, default=50)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "relevance_calibration.json")
    ap.add_argument("--write-sidecar", action="store_true", help="save the fit beside the shipped router")
    ap.add_argument("--msa-scores", type=Path, help="JSON of raw MSA scores: read it when it exists (skipping "
                    "the ~45 min of encoding and routing on a loaded 2-core CPU), else write it")
    args = ap.parse_args()
    started = time.perf_counter()
    questions, gold, docs, ids = load(args.questions, args.seed)
    others = unrelated(args.unrelated, args.seed)
    model = MSAModel.from_pretrained("default")  # raw scores do not depend on the calibration
    if args.msa_scores and args.msa_scores.is_file():
        saved = json.loads(args.msa_scores.read_text())
        assert saved["gold"] == gold and len(saved["q"]) == len(questions) and len(saved["unrelated"]) == len(others)
        msa_q, msa_u = saved["q"], saved["unrelated"]
    else:
        bank = model.index(docs, ids=ids, show_progress_bar=True)
        msa_q = [{h.id: h.score for h in model.retrieve(q, bank, k=len(docs))} for q in questions]
        msa_u = [{h.id: h.score for h in model.retrieve(q, bank, k=len(docs))} for q in others]
        if args.msa_scores:
            args.msa_scores.write_text(json.dumps({"q": msa_q, "gold": gold, "unrelated": msa_u}))
    half = len(questions) // 2
    fit_pos, fit_neg = split(msa_q[:half], gold[:half])
    a, b = fit_calibration(fit_pos, fit_neg)
    ev_pos, ev_neg = split(msa_q[half:], gold[half:])
    un = np.array([v for s in msa_u for v in s.values()])
    cal = lambda x: calibrated(torch.as_tensor(x), (a, b)).numpy()  # noqa: E731
    fixed = lambda x: np.clip((x + 1) / 2, 0, 1)  # noqa: E731
    mini = minilm_scores(questions[half:] + others, docs, ids)
    m_pos, m_neg = split(mini[:len(questions) - half], gold[half:])
    m_un = np.array([v for s in mini[len(questions) - half:] for v in s.values()])
    result = {
        "what": "share of (question, document) pairs whose relevance_score passes each threshold",
        "data": {"source": "train/nq_qed_dev.jsonl (held out of routers v8, v10, v11 and v14)", "questions_fit": half,
                 "questions_eval": len(questions) - half, "documents": len(docs), "unrelated_questions": len(others),
                 "unrelated": "half random letters, half Debian package questions (train/debian_descriptions.jsonl)"},
        "calibration": {"a": a, "b": b, "score_at_relevance_0.5": -b / a},
        "msa_fixed_map": pass_rates({"gold": fixed(ev_pos), "other": fixed(ev_neg), "unrelated": fixed(un)}),
        "msa_calibrated": pass_rates({"gold": cal(ev_pos), "other": cal(ev_neg), "unrelated": cal(un)}),
        "minilm_faiss_langchain": pass_rates({"gold": faiss_relevance(m_pos), "other": faiss_relevance(m_neg),
                                              "unrelated": faiss_relevance(m_un)}),
        "raw_score_percentiles_5_50_95": {"gold": np.percentile(ev_pos, [5, 50, 95]).round(4).tolist(),
                                          "other": np.percentile(ev_neg, [5, 50, 95]).round(4).tolist(),
                                          "unrelated": np.percentile(un, [5, 50, 95]).round(4).tolist()},
        "msa_scores_read_from": str(args.msa_scores) if args.msa_scores else None,
        "router_fingerprint": model.router_fingerprint, "device": "cpu", "torch_threads": torch.get_num_threads(),
        "seconds": round(time.perf_counter() - started, 1),
        "created_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    if args.write_sidecar:
        sidecar = sidecar_path(default_router_path())
        sidecar.write_text(json.dumps({"router_fingerprint": model.router_fingerprint, "a": a, "b": b,
                                       "fitted_by": "benchmarks/relevance_calibration.py",
                                       "fitted_on": result["data"]}, indent=2) + "\n")
        print(f"wrote {sidecar}", file=sys.stderr)


if __name__ == "__main__":
    main()
