"""Behaviour pins: what the default model does on the demo corpus (retrieval and generated tokens), recorded
once by `python tests/pins.py OUT.json` and compared by tests/test_pins.py, so a refactor that changes
results fails loudly. Uses only the public API, so the same script runs on older releases.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

DATA = Path(__file__).resolve().parents[1] / "msa_core" / "data"
NEW_TOKENS = 12


def demo_corpus() -> tuple[list[str], list[str], list[dict]]:
    rows = [json.loads(line) for line in (DATA / "demo_corpus.jsonl").read_text(encoding="utf-8").splitlines() if line]
    metas = [{"title": r["title"]} if r.get("title") else {} for r in rows]
    return [r["text"] for r in rows], [r["id"] for r in rows], metas


def demo_questions() -> list[str]:
    return [q["question"] for q in json.loads((DATA / "demo_questions.json").read_text(encoding="utf-8"))]


def pins(model, *, interleave: bool = False) -> dict:
    """Retrieval (ids, scores) for every demo question, and the greedy tokens of a few answers."""
    texts, ids, metas = demo_corpus()
    questions = demo_questions()
    bank = model.index(texts, ids, metas, show_progress_bar=False)
    hits = model.retrieve(questions, bank, k=5)
    out = {"retrieve": [[[h.id, round(h.score, 5)] for h in row] for row in hits], "answers": {}}
    for mode in ("latent", "hybrid") + (("interleave",) if interleave else ()):
        for q in questions[:2]:
            extra = {"max_rounds": 2} if mode == "interleave" else {}
            a = model.answer(q, bank, mode=mode, k=3, max_new_tokens=NEW_TOKENS, **extra)
            out["answers"].setdefault(mode, []).append({"text": a.text, "doc_ids": a.doc_ids,
                                                       "layers": {str(k): v for k, v in a.layer_selections.items()}})
    return out


def all_pins() -> dict:
    from msa_core import MSAModel

    torch.manual_seed(0)
    default = MSAModel.from_pretrained("default", device="cpu", dtype=torch.float32)
    reference = MSAModel.from_pretrained("default", device="cpu", dtype=torch.float32, profile="reference")
    return {"default": pins(default), "reference": pins(reference, interleave=True)}


if __name__ == "__main__":
    Path(sys.argv[1]).write_text(json.dumps(all_pins(), indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
