"""Calibrated relevance: raw routing scores mapped to [0, 1] so that a score threshold means something.

A fixed map such as (s + 1) / 2 keeps the order of the scores but not their meaning: a router's cosines
cluster in a narrow band, so `score_threshold=0.5` (a common value carried over from FAISS or Chroma)
lets almost everything through. A calibrated router carries two numbers (a, b) and

    relevance = sigmoid(a * score + b)            (Platt scaling)

fitted by logistic regression of "is this the question's gold document?" on the raw score, over a dev
split of training questions, with the gold documents and the others weighted equally. So relevance 0.5
is the score at which a document is as likely to be the gold one as not, whatever the bank's size, and
the order of the documents never changes. `fit_calibration` fits it; `routing.relevance_calibration`
holds it ([a, b]); a router file can ship it beside itself as `<router>.calibration.json`, naming the
router fingerprint it was fitted for (benchmarks/relevance_calibration.py writes one).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import torch

from ..errors import InvalidInputError

SIDECAR_SUFFIX = ".calibration.json"


def calibrated(scores: torch.Tensor, calibration: Sequence[float]) -> torch.Tensor:
    """sigmoid(a * scores + b) for calibration = (a, b)."""
    a, b = float(calibration[0]), float(calibration[1])
    return torch.sigmoid(a * scores.float() + b)


def fit_calibration(positives: Sequence[float], negatives: Sequence[float], *, steps: int = 100) -> list[float]:
    """[a, b] of a class-balanced logistic regression of gold (1) vs other (0) on the raw score.

    Newton's method on the weighted log-likelihood (float64; a tiny L2 term keeps separable data finite).
    """
    pos = torch.as_tensor(list(positives), dtype=torch.float64)
    neg = torch.as_tensor(list(negatives), dtype=torch.float64)
    if pos.numel() == 0 or neg.numel() == 0:
        raise InvalidInputError(f"calibration needs gold and other scores; got {pos.numel()} and {neg.numel()}")
    x = torch.cat([pos, neg])
    y = torch.cat([torch.ones_like(pos), torch.zeros_like(neg)])
    w = torch.cat([torch.full_like(pos, 0.5 / pos.numel()), torch.full_like(neg, 0.5 / neg.numel())])
    features = torch.stack([x, torch.ones_like(x)], dim=1)  # [n, 2]: score, bias
    theta = torch.zeros(2, dtype=torch.float64)
    ridge = 1e-6 * torch.eye(2, dtype=torch.float64)
    for _ in range(steps):
        p = torch.sigmoid(features @ theta)
        grad = features.T @ (w * (p - y)) + ridge @ theta
        hessian = features.T @ (features * (w * p * (1 - p))[:, None]) + ridge
        step = torch.linalg.solve(hessian, grad)
        theta = theta - step
        if step.abs().max() < 1e-10:
            break
    return [float(theta[0]), float(theta[1])]


def sidecar_path(router_path: str | Path) -> Path:
    path = Path(router_path)
    return path.with_name(path.name.removesuffix(".safetensors") + SIDECAR_SUFFIX)


def load_sidecar(router_path: str | Path, router_fingerprint: str) -> list[float] | None:
    """[a, b] shipped beside a router file for exactly this router, else None."""
    path = sidecar_path(router_path)
    if not path.is_file():
        return None
    data = json.loads(path.read_text(encoding="utf-8"))
    if data.get("router_fingerprint") != router_fingerprint:
        return None  # fitted for another router: its scores mean something else
    return [float(data["a"]), float(data["b"])]
