"""Fixed linear maps that make a frozen backbone's states well conditioned for router training.

A small LM's normed hidden states are dominated by one shared direction and a few huge dimensions
(SmolLM2-135M: pooled chunk states have cosine 0.97-0.99 to their mean in layers 9-19, and single
dimensions 100-280x the median magnitude). A linear router can in principle ignore both, but trained
on those raw states it learned least in the most anisotropic layers (held-out recall@5 0.03-0.08 in
layers 10-13 and 16). So training runs on S·x instead of x, with S per layer and per side:

    S = D (I - u u^T)   u: the unit mean direction; D: per-dimension 1/std ("standardize")
    S = C^(-1/2) (I - u u^T)   C: the shrunk covariance ("whiten")

The router learns V in score(V_q S_q x_t, V_k S_k x̄_c), and the saved router is W = V S: still one
linear map per side, so banks, kernels and the MSA checkpoint format are unchanged. S is fitted on
training states only.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from ..errors import InvalidInputError
from ..routing.projectors import RouterProjectors
from .cache import RaggedStates

MODES = ("none", "standardize", "whiten")
_FIT_ROWS = 200_000  # rows sampled per layer to fit S: the statistics settle long before that


def fit_map(x: Tensor, mode: str, *, shrink: float = 0.05, generator: torch.Generator | None = None) -> Tensor:
    """S [hidden, hidden] (fp32) for states x [rows, hidden]; y = x @ S.T is the conditioned state.

    shrink: for "whiten", the covariance is blended with shrink x its mean eigenvalue, so directions
    with almost no variance are not blown up into noise."""
    if mode not in MODES:
        raise InvalidInputError(f"precondition must be one of {MODES}, got {mode!r}")
    hidden = x.shape[-1]
    if mode == "none":
        return torch.eye(hidden, device=x.device)
    if x.shape[0] < 2:
        raise InvalidInputError("preconditioning needs at least two states to fit")
    if x.shape[0] > _FIT_ROWS:
        rows = torch.randperm(x.shape[0], generator=generator)[:_FIT_ROWS].to(x.device)
        x = x[rows]
    x = x.float()
    mean = x.mean(0)
    u = mean / mean.norm().clamp_min(1e-12)
    drop_mean = torch.eye(hidden, device=x.device) - torch.outer(u, u)
    y = x @ drop_mean  # drop_mean is symmetric
    y = y - y.mean(0)
    if mode == "standardize":
        std = y.std(0)
        floor = std[std > 0].median() * 1e-2 if (std > 0).any() else torch.tensor(1.0, device=x.device)
        return torch.diag(1.0 / std.clamp_min(floor)) @ drop_mean
    cov = (y.T @ y) / (y.shape[0] - 1)
    evals, evecs = torch.linalg.eigh(cov)
    evals = evals.clamp_min(0) + shrink * evals.clamp_min(0).mean()
    return (evecs * evals.rsqrt()) @ evecs.T @ drop_mean


@dataclass
class Preconditioner:
    """Per-layer maps for question states (q) and pooled document states (k)."""

    mode: str
    q: dict[int, Tensor]
    k: dict[int, Tensor]

    @classmethod
    def fit(cls, queries: RaggedStates, documents: RaggedStates, layers: Sequence[int], mode: str,
            *, seed: int = 0) -> Preconditioner:
        """Fit on training states; column i of the states holds layers[i]."""
        gen = torch.Generator().manual_seed(seed)
        q = {layer: fit_map(queries.x[:, i], mode, generator=gen) for i, layer in enumerate(layers)}
        k = {layer: fit_map(documents.x[:, i], mode, generator=gen) for i, layer in enumerate(layers)}
        return cls(mode, q, k)

    def apply(self, states: RaggedStates, layers: Sequence[int], side: str) -> None:
        """Replace each layer's states by S·x, in place, a layer at a time (bounds the fp32 copy)."""
        if self.mode == "none":  # S = I: nothing to do, and no pass over gigabytes of cached states
            return
        maps = self.q if side == "q" else self.k
        for i, layer in enumerate(layers):
            s = maps[layer].to(states.x.device)
            for start in range(0, states.x.shape[0], 65536):
                block = states.x[start : start + 65536, i]
                block.copy_((block.float() @ s.T).to(block.dtype))

    def into_conditioned(self, router: RouterProjectors) -> None:
        """Rewrite W as V = W S^+ (in place), the start that acts like W on conditioned states, except
        along what S drops."""
        self._rewrite(router, torch.linalg.pinv)

    def fold(self, router: RouterProjectors) -> None:
        """Rewrite V as W = V S (in place): the router that reads raw states."""
        self._rewrite(router, lambda s: s)

    @torch.no_grad()
    def _rewrite(self, router: RouterProjectors, right: Callable[[Tensor], Tensor]) -> None:
        """weight <- weight @ right(S) for both projectors of every layer."""
        if self.mode == "none":
            return
        for layer in router.layers:
            for weight, s in ((router.q_weight(layer), self.q[layer]), (router.k_weight(layer), self.k[layer])):
                weight.copy_((weight.float() @ right(s.to(weight.device))).to(weight.dtype))


def condition(router: RouterProjectors, layers: Sequence[int], mode: str, queries: Sequence[RaggedStates | None],
              documents: Sequence[RaggedStates | None], *, seed: int = 0) -> Preconditioner:
    """Fit the maps on the first (training) queries and documents, apply them in place to every given
    state set (None is skipped) and move `router` into conditioned coordinates. Returns the maps, whose
    `fold` gives back a router for raw states."""
    pre = Preconditioner.fit(queries[0], documents[0], layers, mode, seed=seed)
    for group, side in ((queries, "q"), (documents, "k")):
        for states in group:
            if states is not None:
                pre.apply(states, layers, side)
    pre.into_conditioned(router)
    return pre
