"""GPU kernels of MSA (issue 8): Triton kernels, each with a plain PyTorch reference and a dispatcher.

- routing: chunk / document routing scores of a batch of questions against the whole bank
  (`routing_scores`, `chunk_scores`, `routing_top_k`; references `*_reference`).
- attention: sparse memory attention over bank chunks addressed by index plus the local KV
  (`memory_attention`; reference `memory_attention_reference`).

Dispatchers take backend='auto' (Triton for CUDA tensors when `triton` imports, else the reference),
'triton' or 'reference'. Importing this package never imports triton: the kernel modules
(*_triton.py) load on the first Triton call, so TRITON_INTERPRET=1 set before that call runs the
kernels on CPU tensors with Triton's interpreter. The import name is msa_core.kernels, which cannot
clash with the PyPI `kernels` package (imported as top-level `kernels`).
"""

from ._common import interpreting, triton_available
from .attention import memory_attention, memory_attention_reference
from .routing import (
    chunk_scores,
    chunk_scores_reference,
    inverse_key_norms,
    layer_routing_scores,
    routing_scores,
    routing_scores_reference,
    routing_top_k,
)

__all__ = [
    "chunk_scores", "chunk_scores_reference", "interpreting", "inverse_key_norms", "layer_routing_scores",
    "memory_attention", "memory_attention_reference", "routing_scores", "routing_scores_reference",
    "routing_top_k", "triton_available",
]
