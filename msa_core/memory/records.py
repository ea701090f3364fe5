"""The bank's rows and state: `PartRecord` (one docstore row), `BankState` (an immutable snapshot of
tensors and index) and the validation of records. Imports only the ground floor (config, errors, encoded).
"""

from __future__ import annotations

import json
import uuid
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch

from ..config import MSAConfig
from ..errors import InvalidInputError, check_text
from .encoded import EncodedDocuments

TENSOR_NAMES = ("k_bar", "v_bar", "kr_bar")


KV_NAMES = ("k_bar", "v_bar")


KV_TIERS = ("same", "host", "disk")


STORAGE_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class PartRecord:
    """One docstore row: a document part (the whole document when it was not split)."""

    id: str
    parent_id: str
    part_index: int
    text: str
    metadata: dict[str, Any]  # shared with the bank: read, do not mutate
    n_tokens: int
    n_chunks: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)  # deep-copies metadata


@dataclass(frozen=True)
class BankState:
    """One immutable version of a bank: every mutation builds a new one and swaps it in."""

    parts: tuple[PartRecord, ...]
    k_bar: torch.Tensor
    v_bar: torch.Tensor
    kr_bar: torch.Tensor
    chunk_doc: torch.Tensor
    chunk_offsets: torch.Tensor
    chunk_counts: torch.Tensor
    parent_rows: dict[str, list[int]]  # parents in insertion order -> their rows in part order


def build_state(parts: Sequence[PartRecord], tensors: dict[str, torch.Tensor], device: torch.device) -> BankState:
    counts = torch.tensor([p.n_chunks for p in parts], dtype=torch.long, device=device)
    parent_rows: dict[str, list[int]] = {}
    for row, part in enumerate(parts):
        parent_rows.setdefault(part.parent_id, []).append(row)
    return BankState(
        parts=tuple(parts),
        chunk_doc=torch.repeat_interleave(torch.arange(len(parts), device=device), counts),
        chunk_offsets=torch.cumsum(counts, 0) - counts,
        chunk_counts=counts,
        parent_rows=parent_rows,
        **tensors,
    )


def check_shape_args(layers: Any, kv_heads: Any, head_dim: Any, config: Any) -> None:
    if not isinstance(config, MSAConfig):
        raise InvalidInputError(f"config must be an MSAConfig, got {type(config).__name__}")
    if (not isinstance(layers, (list, tuple)) or not layers or len(set(layers)) != len(layers)
            or any(not is_int(i) or i < 0 for i in layers)):
        raise InvalidInputError(f"layers must be a non-empty list of distinct layer indices >= 0, got {layers!r}")
    if config.routing.layers is not None and list(config.routing.layers) != list(layers):
        raise InvalidInputError(
            f"layers {list(layers)} differ from config.routing.layers {config.routing.layers}; pass the same layers"
        )
    for name, value in (("kv_heads", kv_heads), ("head_dim", head_dim)):
        if not is_int(value) or value < 1:
            raise InvalidInputError(f"{name} must be an integer >= 1, got {value!r}")


def is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def id_list(ids: Iterable[str]) -> list[str]:
    if isinstance(ids, str):  # one id, not an iterable of its characters
        return [ids]
    try:
        out = list(ids)
    except TypeError as exc:
        raise InvalidInputError(f"ids must be an iterable of strings, got {type(ids).__name__}") from exc
    bad = [i for i in out if not isinstance(i, str)]
    if bad:
        raise InvalidInputError(f"ids must be strings, got {bad[:5]!r}")
    return out


def records_from_encoded(enc: EncodedDocuments) -> tuple[PartRecord, ...]:
    fields = (enc.ids, enc.parent_ids, enc.part_index, enc.texts, enc.metadatas, enc.n_tokens, enc.n_chunks)
    if len({len(f) for f in fields}) != 1:
        raise InvalidInputError("EncodedDocuments fields have different lengths")
    return tuple(
        PartRecord(id=i, parent_id=p, part_index=k, text=t, metadata=json_metadata(m, i), n_tokens=nt, n_chunks=nc)
        for i, p, k, t, m, nt, nc in zip(*fields)
    )


def json_metadata(meta: Any, part_id: Any) -> dict[str, Any]:
    """A private JSON round-tripped copy of `meta`, so what is saved is what is filtered on."""
    if not isinstance(meta, dict):
        raise InvalidInputError(f"metadata of {part_id!r} must be a dict, got {type(meta).__name__}")
    try:
        _check_str_keys(meta, part_id)
        text = json.dumps(meta, allow_nan=False, ensure_ascii=False)
        text.encode("utf-8")  # a lone surrogate passes json.dumps but would make save() fail later
        return json.loads(text)
    except RecursionError as exc:
        raise InvalidInputError(f"metadata of {part_id!r} is nested too deeply to store") from exc
    except (TypeError, ValueError) as exc:  # UnicodeEncodeError is a ValueError
        raise InvalidInputError(f"metadata of {part_id!r} is not JSON-serialisable: {exc}") from exc


def _check_str_keys(value: Any, part_id: Any) -> None:
    # json.dumps would silently turn {1: x} into {"1": x}; a filter on 1 would then stop matching.
    if isinstance(value, dict):
        for k, v in value.items():
            if not isinstance(k, str):
                raise InvalidInputError(f"metadata of {part_id!r} has a non-string key {k!r}")
            _check_str_keys(v, part_id)
    elif isinstance(value, (list, tuple)):
        for v in value:
            _check_str_keys(v, part_id)


def check_parts(parts: Sequence[PartRecord]) -> None:
    """Raise InvalidInputError unless ids are unique and each parent's parts are contiguous, 0..n-1."""
    seen_ids: set[str] = set()
    done_parents: set[str] = set()
    prev: PartRecord | None = None
    for p in parts:
        _check_record_types(p)
        if p.id in seen_ids:
            raise InvalidInputError(f"part id {p.id!r} appears twice; part ids must be unique")
        seen_ids.add(p.id)
        continues = prev is not None and prev.parent_id == p.parent_id
        if not continues and p.parent_id in done_parents:
            raise InvalidInputError(
                f"parts of parent {p.parent_id!r} are not contiguous; keep a parent's parts together"
            )
        expected_index = prev.part_index + 1 if continues else 0
        if p.part_index != expected_index:
            raise InvalidInputError(
                f"part {p.id!r} of parent {p.parent_id!r} has part_index {p.part_index}, expected {expected_index} "
                f"(parts must come in order 0, 1, 2, ...)"
            )
        done_parents.add(p.parent_id)
        prev = p


def _check_record_types(p: PartRecord) -> None:
    for name in ("id", "parent_id"):
        value = getattr(p, name)
        if not isinstance(value, str) or not value:
            raise InvalidInputError(f"{name} must be a non-empty string, got {value!r}")
        check_text(value, name)
    if not isinstance(p.text, str):
        raise InvalidInputError(f"text of {p.id!r} must be a string, got {type(p.text).__name__}")
    check_text(p.text, f"text of {p.id!r}")
    if not isinstance(p.metadata, dict):
        raise InvalidInputError(f"metadata of {p.id!r} must be a dict, got {type(p.metadata).__name__}")
    for name in ("part_index", "n_tokens", "n_chunks"):
        value, low = getattr(p, name), (0 if name == "part_index" else 1)
        if not is_int(value) or value < low:
            raise InvalidInputError(f"{name} of {p.id!r} must be an integer >= {low}, got {value!r}")


def check_documents(texts: Sequence[str], ids: Sequence[str] | None,
                    metadatas: Sequence[dict[str, Any]] | None):
    """Texts, ids (uuid4 where not given) and metadatas of documents to index, checked: clear errors
    for a lone string, empty or non-string texts, empty or duplicate ids, mismatched lengths."""
    if isinstance(texts, str):
        raise InvalidInputError("texts must be a list of strings, got a single string; wrap it in a list")
    texts = list(texts)
    if not texts:
        raise InvalidInputError("no documents given: the list of texts is empty")
    ids = [str(uuid.uuid4()) for _ in texts] if ids is None else [str(i) for i in ids]
    metadatas = [{} for _ in texts] if metadatas is None else [dict(m or {}) for m in metadatas]
    if len(ids) != len(texts) or len(metadatas) != len(texts):
        raise InvalidInputError(f"got {len(texts)} texts, {len(ids)} ids and {len(metadatas)} metadatas; "
                                "they must have the same length")
    for i, (t, doc_id) in enumerate(zip(texts, ids)):
        if not isinstance(t, str):
            raise InvalidInputError(f"document {doc_id!r} (position {i}) is a {type(t).__name__}, not a string")
        if not t.strip():
            raise InvalidInputError(f"document {doc_id!r} (position {i}) is empty")
        check_text(t, f"document {doc_id!r} (position {i})")
        if not doc_id:
            raise InvalidInputError(f"document at position {i} has an empty id")
    dup = sorted(i for i, n in Counter(ids).items() if n > 1)
    if dup:
        raise InvalidInputError(f"duplicate ids in one call: {dup[:5]}")
    return texts, ids, metadatas
