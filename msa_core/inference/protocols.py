"""What the inference strategies need of a model: the facade (`msa_core.model.MSAModel`) has all of it.

The reference profile, memory interleave and the debug trace take a `ModelLike` rather than importing
the facade, so imports keep running downwards (the facade builds them and hands itself in).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

from ..config import MSAConfig
from ..decoder.backbone import Backbone


class ModelLike(Protocol):
    backbone: Backbone
    tokenizer: Any
    router: Any
    config: MSAConfig
    layers: list[int]
    eos_ids: list[int]
    reference: Any  # the ReferenceProfile under the reference profile, else None

    @property
    def profile(self) -> str: ...

    def position_offset(self, k: int) -> int: ...

    def index(self, texts: Sequence[str], ids: Sequence[str] | None = None,
              metadatas: Sequence[dict[str, Any]] | None = None, *, show_progress_bar: bool | None = None) -> Any: ...
