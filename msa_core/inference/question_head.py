"""The shared head of question prompts, computed once, so that retrieve's query forward runs over the
question tokens alone.

A question's prompt is the chat template's head (system prompt, `<|im_start|>user\\n`), the question,
and the template's tail (`<|im_end|>` and the assistant tag). When retrieve routes on the question's own
states (no memory attended: the default), the routing tokens' states depend on the head, which is the same
for every question, and not on the tail (attention is causal). So the head's per-layer K/V are computed
once per (head, RoPE offset, weights), and the engine's query forward (engine.QueryForward) runs over the
question tokens with those K/V in front: 38 tokens become ~10 for a short question with SmolLM2's
template. The math is the whole prompt's (tests/inference/test_question_head.py).
"""

from __future__ import annotations

import dataclasses
import threading
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any, NamedTuple

import torch

from ..decoder.backbone import Backbone
from ..decoder.packed import weights_state


class HeadKV(NamedTuple):
    """Rotated keys and values of a prompt head, one [1, kv_heads, P, D] per layer below the last routing one."""

    k: list[torch.Tensor]
    v: list[torch.Tensor]


def _span(routing: Sequence[bool]) -> tuple[int, int]:
    """[first, last + 1) of the routing tokens."""
    first = list(routing).index(True)
    return first, len(routing) - list(routing)[::-1].index(True)


class HeadCache:
    """Per-layer K/V of prompt heads, a few kept (least recently used dropped)."""

    def __init__(self, entries: int = 4) -> None:
        self.entries = entries
        self.enabled = True  # False: every split leaves the prompts whole (the baseline of benchmarks/tests)
        self._lock = threading.Lock()  # retrieve may run on several threads
        self._store: OrderedDict[tuple, HeadKV] = OrderedDict()

    def __len__(self) -> int:
        return len(self._store)

    def split(self, backbone: Backbone, prompts: Sequence[Any], offset: int,
              last_layer: int) -> tuple[list[Any], int, HeadKV | None]:
        """(prompts cut to their routing tokens, the RoPE position of their first token, the shared head's
        K/V or None when it is empty) for a query forward that stops at `last_layer`; the prompts unchanged,
        `offset` and None when they do not share one head (each prompt: an `inference.generate.Prompt`)."""
        if not self.enabled or not prompts or any(True not in p.routing for p in prompts):
            return list(prompts), offset, None
        spans = [_span(p.routing) for p in prompts]
        head = tuple(prompts[0].ids[: spans[0][0]])
        if any(tuple(p.ids[:first]) != head for p, (first, _) in zip(prompts, spans)):
            return list(prompts), offset, None
        bodies = [dataclasses.replace(p, ids=list(p.ids[first:end]), routing=list(p.routing[first:end]))
                  for p, (first, end) in zip(prompts, spans)]
        kv = self.head_kv(backbone, head, offset, last_layer) if head else None
        return bodies, offset + len(head), kv

    @torch.no_grad()
    def head_kv(self, bb: Backbone, head: tuple[int, ...], offset: int, last_layer: int) -> HeadKV:
        """The head's K/V in layers 0..last_layer-1 (the last routing layer only projects queries), from the
        cache or from one eager forward over the head at positions offset, offset+1, ..."""
        key = (head, offset, last_layer, bb.dtype, weights_state(bb))
        with self._lock:
            if key in self._store:
                self._store.move_to_end(key)
                return self._store[key]
        p = len(head)
        ids = torch.tensor([head], device=bb.device)
        caches = bb.new_caches(1, capacity=p)
        if last_layer > 0:
            bb(ids, offset + torch.arange(p, device=bb.device)[None], valid=torch.ones_like(ids, dtype=torch.bool),
               caches=caches, last_layer=last_layer - 1)
        views = [c.view() for c in caches[:last_layer]]
        kv = HeadKV([k for k, _, _ in views], [v for _, v, _ in views])
        with self._lock:
            self._store[key] = kv
            while len(self._store) > self.entries:
                self._store.popitem(last=False)
        return kv
