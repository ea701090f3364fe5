"""MemoryBank: pooled memory tensors per routing layer, the chunk -> part map and the docstore.

Pure data and persistence, no model code. Rows are document *parts* (a long document is split into
parts sharing a parent id); the chunks of a row are contiguous in the tensors. Every mutation builds
a new immutable `_State` and swaps it in with one assignment, so a failed call leaves the bank as it was.

On disk (crash safe, no pickle):
    path/CURRENT                     names the live version folder, e.g. "v000003"
    path/v000003/manifest.json       format, model fingerprints, config, counts, file checksums
    path/v000003/docstore.json       one record per part row
    path/v000003/tensors.safetensors k_bar, v_bar, kr_bar

Storage tiers. Routing reads all of K̄_R for every query, generation only the K̄/V̄ rows of the chosen
documents, so the two can live apart. `bank.device` (the routing device) holds kr_bar and the chunk
index; `kv_tier` says where k_bar/v_bar live: "same" (on `bank.device`, the default), "host" (CPU
memory, pinned when CUDA is present so copies to the GPU can be asynchronous) or "disk" (a private,
read-only-by-convention memory map of the saved tensors file: pages are read when touched, so a bank
larger than RAM still serves). `gather_kv` copies only the selected chunks to the compute device.
Pick the tier with `MemoryBank.load(path, map_location=..., kv=...)` or `bank.to(device, kv=...)`;
a disk-tier bank cannot be mutated (load it with kv="host" to edit), but it can be saved elsewhere.
"""

from __future__ import annotations

import hashlib
import json
import mmap
import os
import re
import shutil
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
from pydantic import ValidationError
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .config import MSAConfig
from .encoded import EncodedDocuments
from .errors import BankError, BankMismatchError, CorruptBankError, InvalidInputError, check_text
from .filters import Filter, compile_filter

FORMAT = "msa-memory-bank"
FORMAT_VERSION = 1
TENSOR_NAMES = ("k_bar", "v_bar", "kr_bar")
KV_NAMES = ("k_bar", "v_bar")
KV_TIERS = ("same", "host", "disk")
MANIFEST, DOCSTORE, TENSORS, CURRENT = "manifest.json", "docstore.json", "tensors.safetensors", "CURRENT"

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_SAFETENSORS_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
_VERSION_RE = re.compile(r"^v(\d{6,})$")
_TMP_RE = re.compile(r"^\.tmp-[0-9a-f]{32}$")
_HASH_BLOCK = 1 << 20


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
class _State:
    parts: tuple[PartRecord, ...]
    k_bar: torch.Tensor
    v_bar: torch.Tensor
    kr_bar: torch.Tensor
    chunk_doc: torch.Tensor
    chunk_offsets: torch.Tensor
    chunk_counts: torch.Tensor
    parent_rows: dict[str, list[int]]  # parents in insertion order -> their rows in part order


class MemoryBank:
    """Pooled memory of document parts per routing layer, with add/upsert/delete, filters and save/load."""

    def __init__(
        self,
        *,
        layers: list[int],
        kv_heads: int,
        head_dim: int,
        config: MSAConfig,
        backbone_fingerprint: str,
        router_fingerprint: str,
        model_name: str = "",
    ) -> None:
        _check_shape_args(layers, kv_heads, head_dim, config)
        for name, value in (("backbone_fingerprint", backbone_fingerprint),
                            ("router_fingerprint", router_fingerprint), ("model_name", model_name)):
            if not isinstance(value, str):
                raise InvalidInputError(f"{name} must be a string, got {type(value).__name__}")
        self._layers = list(layers)
        self._kv_heads = kv_heads
        self._head_dim = head_dim
        self._config = config.model_copy(deep=True)
        self._dtype = _DTYPES[config.encode.storage_dtype]
        self._device = torch.device("cpu")
        self._kv_tier = "same"
        self._kv_pinned = False
        self._kv_file: Path | None = None  # the mapped tensors file of a disk-tier bank
        self._backbone_fp = backbone_fingerprint
        self._router_fp = router_fingerprint
        self._model_name = model_name
        empty = torch.empty(len(layers), 0, kv_heads, head_dim, dtype=self._dtype)
        self._state = _build_state((), {n: empty for n in TENSOR_NAMES}, self._device)

    # ---- read-only state -------------------------------------------------------------------
    @property
    def layers(self) -> list[int]:
        """Routing layer indices the tensors belong to."""
        return list(self._layers)

    @property
    def kv_heads(self) -> int:
        return self._kv_heads

    @property
    def head_dim(self) -> int:
        return self._head_dim

    @property
    def config(self) -> MSAConfig:
        """A copy of the settings the bank was built with."""
        return self._config.model_copy(deep=True)

    @property
    def storage_dtype(self) -> torch.dtype:
        return self._dtype

    @property
    def device(self) -> torch.device:
        """Routing device: kr_bar and the chunk index live here, k_bar/v_bar too when kv_tier is "same"."""
        return self._device

    @property
    def kv_tier(self) -> str:
        """Where k_bar/v_bar live: "same" (bank.device), "host" (CPU memory) or "disk" (memory-mapped file)."""
        return self._kv_tier

    @property
    def kv_device(self) -> torch.device:
        """Device of k_bar/v_bar."""
        return self._state.k_bar.device

    @property
    def kv_pinned(self) -> bool:
        """Whether k_bar/v_bar sit in pinned (page-locked) host memory."""
        return self._kv_pinned

    @property
    def model_name(self) -> str:
        return self._model_name

    @property
    def backbone_fingerprint(self) -> str:
        return self._backbone_fp

    @property
    def router_fingerprint(self) -> str:
        return self._router_fp

    @property
    def docstore(self) -> tuple[PartRecord, ...]:
        """Part records, one per row."""
        return self._state.parts

    @property
    def k_bar(self) -> torch.Tensor:
        """[L, C, kv_heads, head_dim] pooled keys (do not modify in place)."""
        return self._state.k_bar

    @property
    def v_bar(self) -> torch.Tensor:
        """[L, C, kv_heads, head_dim] pooled values."""
        return self._state.v_bar

    @property
    def kr_bar(self) -> torch.Tensor:
        """[L, C, kv_heads, head_dim] pooled routing keys."""
        return self._state.kr_bar

    @property
    def chunk_doc(self) -> torch.Tensor:
        """LongTensor [C]: part row of each chunk."""
        return self._state.chunk_doc

    @property
    def chunk_offsets(self) -> torch.Tensor:
        """LongTensor [N]: first chunk of each part row."""
        return self._state.chunk_offsets

    @property
    def chunk_counts(self) -> torch.Tensor:
        """LongTensor [N]: chunks of each part row."""
        return self._state.chunk_counts

    @property
    def num_parts(self) -> int:
        return len(self._state.parts)

    @property
    def num_chunks(self) -> int:
        return int(self._state.k_bar.shape[1])

    def __len__(self) -> int:
        return len(self._state.parent_rows)

    def __contains__(self, parent_id: object) -> bool:
        return parent_id in self._state.parent_rows

    def __repr__(self) -> str:
        tier = "" if self._kv_tier == "same" else f", kv={self._kv_tier}"
        return (f"MemoryBank(documents={len(self)}, parts={self.num_parts}, chunks={self.num_chunks}, "
                f"layers={self._layers}, dtype={self._config.encode.storage_dtype}{tier})")

    def ids(self) -> list[str]:
        """Parent ids in insertion order (an upserted document moves to the end)."""
        return list(self._state.parent_rows)

    # ---- lookups ---------------------------------------------------------------------------
    def get(self, ids: Iterable[str]) -> list[dict[str, Any]]:
        """Records {id, text, metadata, n_parts, n_tokens} of the existing parents, in the order asked."""
        state = self._state
        out = []
        for pid in _id_list(ids):
            rows = state.parent_rows.get(pid)
            if rows is None:
                continue
            parts = [state.parts[r] for r in rows]
            out.append({
                "id": pid,
                "text": "".join(p.text for p in parts),  # parts are consecutive slices of the text
                "metadata": json.loads(json.dumps(parts[0].metadata)),  # a copy the caller may mutate
                "n_parts": len(parts),
                "n_tokens": sum(p.n_tokens for p in parts),
            })
        return out

    def parts(self, parent_id: str) -> list[dict[str, Any]]:
        """Part records of one parent in part order, each with its `row`; [] when absent."""
        state = self._state
        return [{**state.parts[r].to_dict(), "row": r} for r in state.parent_rows.get(parent_id, [])]

    def rows_of(self, parent_ids: Iterable[str]) -> torch.Tensor:
        """Rows of the given parents (order kept, parts in part order); missing ids skipped."""
        rows_by_parent = self._state.parent_rows
        rows = [r for pid in _id_list(parent_ids) for r in rows_by_parent.get(pid, ())]
        return torch.tensor(rows, dtype=torch.long, device=self._device)

    def chunks_of(self, rows: torch.Tensor | Sequence[int]) -> torch.Tensor:
        """Chunk indices of the given part rows (or of a BoolTensor[N] row mask), concatenated in order."""
        state = self._state
        rows = self._as_rows(rows)
        counts = state.chunk_counts[rows]
        starts = state.chunk_offsets[rows]
        out_starts = torch.cumsum(counts, 0) - counts
        total = int(counts.sum())
        shift = torch.repeat_interleave(starts - out_starts, counts, output_size=total)
        return shift + torch.arange(total, dtype=torch.long, device=self._device)

    def row_mask(self, filter: Filter = None) -> torch.Tensor:
        """BoolTensor[N] over part rows: which parts' metadata pass `filter` (see filters.py)."""
        predicate = compile_filter(filter)
        parts = self._state.parts
        if filter is None:
            return torch.ones(len(parts), dtype=torch.bool, device=self._device)
        hits = [predicate(p.metadata) for p in parts]
        return torch.tensor(hits, dtype=torch.bool, device=self._device)

    def _as_rows(self, rows: torch.Tensor | Sequence[int]) -> torch.Tensor:
        n = len(self._state.parts)
        rows = torch.as_tensor(rows, device=self._device)
        if rows.dtype == torch.bool:
            if rows.shape != (n,):
                raise InvalidInputError(f"a row mask must have shape [{n}], got {tuple(rows.shape)}")
            return rows.nonzero().flatten()
        if rows.numel() == 0:
            return rows.reshape(0).long()
        if rows.dim() != 1 or rows.dtype.is_floating_point or rows.dtype.is_complex:
            raise InvalidInputError(f"rows must be a 1-D integer tensor, got {rows.dtype} {tuple(rows.shape)}")
        rows = rows.long()
        lo, hi = int(rows.min()), int(rows.max())
        if lo < 0 or hi >= n:
            raise InvalidInputError(f"row {lo if lo < 0 else hi} out of range for a bank of {n} part rows")
        return rows

    # ---- tiers -----------------------------------------------------------------------------
    def gather_kv(self, layer_index: int, chunks: torch.Tensor, device: str | torch.device,
                  dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """K̄ and V̄ rows [n, kv_heads, head_dim] of `chunks` at routing-layer position `layer_index`.

        `layer_index` is a position in `bank.layers` (as in `k_bar[layer_index]`); `chunks` a 1-D integer
        tensor on any device. Only the selected rows are copied to `device`, then cast to `dtype`. From
        host or disk memory to a GPU the copy goes through a pinned buffer and is asynchronous with
        respect to the host (stream-ordered on the GPU).
        """
        li = self._layer_position(layer_index)
        device = _device_arg(device, "device")
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise InvalidInputError(f"dtype must be a floating-point torch.dtype, got {dtype!r}")
        state = self._state
        idx = self._chunk_index(chunks, state.k_bar.device, int(state.k_bar.shape[1]))
        sources = (state.k_bar[li], state.v_bar[li])
        if state.k_bar.device.type == "cpu" and device.type == "cuda":
            return tuple(_stage_to(src, idx, device).to(dtype) for src in sources)  # type: ignore[return-value]
        return tuple(src.index_select(0, idx).to(device, dtype) for src in sources)  # type: ignore[return-value]

    def _layer_position(self, layer_index: Any) -> int:
        n = len(self._layers)
        if not _is_int(layer_index) or not 0 <= layer_index < n:
            raise InvalidInputError(
                f"layer_index must be a position 0..{n - 1} in bank.layers {self._layers}, got {layer_index!r}"
            )
        return layer_index

    @staticmethod
    def _chunk_index(chunks: Any, kv_device: torch.device, n_chunks: int) -> torch.Tensor:
        if (not isinstance(chunks, torch.Tensor) or chunks.dim() != 1 or chunks.dtype == torch.bool
                or chunks.dtype.is_floating_point or chunks.dtype.is_complex):
            got = f"{chunks.dtype} {tuple(chunks.shape)}" if isinstance(chunks, torch.Tensor) else type(chunks).__name__
            raise InvalidInputError(f"chunks must be a 1-D integer tensor, got {got}")
        idx = chunks.to(kv_device, torch.long)
        # Range-checked wherever it is free; a GPU index into GPU tensors is not, as reading its min/max would
        # stall the decode loop on a device sync (a bad index there fails inside index_select instead).
        if idx.numel() and idx.device.type == "cpu":
            lo, hi = int(idx.min()), int(idx.max())
            if lo < 0 or hi >= n_chunks:
                raise InvalidInputError(f"chunk {lo if lo < 0 else hi} out of range for a bank of {n_chunks} chunks")
        return idx

    def to(self, device: str | torch.device, *, kv: str = "same") -> MemoryBank:
        """A new bank holding copies of this one's state, routing tensors on `device` and K/V per `kv`.

        kv="same" puts k_bar/v_bar on `device` too; kv="host" keeps them in CPU memory (pinned when CUDA is
        present). kv="disk" needs a saved file: use MemoryBank.load(path, kv="disk").
        """
        if kv == "disk":
            raise InvalidInputError(
                "to() cannot make a disk tier: it maps a saved bank's file. Save the bank, then "
                "MemoryBank.load(path, kv='disk'); to() takes kv='same' or kv='host'"
            )
        _check_kv(kv)
        bank = self._empty_like(_device_arg(device, "device"), kv)
        state = self._state
        tensors = {n: bank._copy_home(n, getattr(state, n)) for n in TENSOR_NAMES}
        bank._state = _build_state(state.parts, tensors, bank._device)
        return bank

    def _empty_like(self, device: torch.device, kv: str) -> MemoryBank:
        bank = type(self)(layers=self._layers, kv_heads=self._kv_heads, head_dim=self._head_dim,
                          config=self._config, backbone_fingerprint=self._backbone_fp,
                          router_fingerprint=self._router_fp, model_name=self._model_name)
        bank._set_tiers(device, kv)
        return bank

    def _set_tiers(self, device: torch.device, kv: str) -> None:
        self._device = device
        self._kv_tier = kv
        # Pinning needs CUDA; without it plain host memory is all there is (and all that is needed).
        self._kv_pinned = kv == "host" and torch.cuda.is_available()

    def _copy_home(self, name: str, t: torch.Tensor) -> torch.Tensor:
        """A copy of `t` (never a view of a mapped file) where tensor `name` belongs under this bank's tiers."""
        if name in KV_NAMES and self._kv_tier != "same":
            return torch.empty(t.shape, dtype=t.dtype, pin_memory=self._kv_pinned).copy_(t)
        return t.to(self._home(name), copy=True)

    # ---- mutations -------------------------------------------------------------------------
    def add(self, encoded: EncodedDocuments) -> list[str]:
        """Add (upsert) encoded parts; a parent already present has ALL its old parts replaced.

        Returns the parent ids of the batch, in batch order. Validates everything first; on error
        the bank is unchanged.
        """
        self._check_writable("add")
        new_parts, new_tensors = self._validate_encoded(encoded)
        state = self._state
        parents = list(dict.fromkeys(p.parent_id for p in new_parts))
        replaced = {pid for pid in parents if pid in state.parent_rows}
        keep = [r for r, p in enumerate(state.parts) if p.parent_id not in replaced]
        kept_ids = {state.parts[r].id for r in keep}
        clash = sorted(kept_ids.intersection(p.id for p in new_parts))
        if clash:
            raise InvalidInputError(
                f"part ids {clash[:5]} already belong to other documents of the bank; part ids must be unique"
            )
        kept_parts, kept_tensors = self._select_rows(keep)
        tensors = {n: torch.cat([kept_tensors[n], new_tensors[n]], dim=1,
                                out=self._pinned_out(n, kept_tensors[n].shape[1] + new_tensors[n].shape[1]))
                   for n in TENSOR_NAMES}
        self._state = _build_state(kept_parts + new_parts, tensors, self._device)
        return parents

    def delete(self, ids: Iterable[str]) -> int:
        """Delete documents by PARENT id (part ids are not accepted); missing ids are ignored.

        Returns how many parents were deleted. Other documents' tensors are copied bit for bit.
        """
        self._check_writable("delete")
        state = self._state
        targets = {pid for pid in _id_list(ids) if pid in state.parent_rows}
        if not targets:
            return 0
        keep = [r for r, p in enumerate(state.parts) if p.parent_id not in targets]
        parts, tensors = self._select_rows(keep)
        self._state = _build_state(parts, tensors, self._device)
        return len(targets)

    def _select_rows(self, keep: list[int]) -> tuple[tuple[PartRecord, ...], dict[str, torch.Tensor]]:
        state = self._state
        tensors = {n: getattr(state, n) for n in TENSOR_NAMES}
        if len(keep) == len(state.parts):
            return state.parts, tensors
        chunks = self.chunks_of(torch.tensor(keep, dtype=torch.long))
        selected = {n: torch.index_select(t, 1, chunks.to(t.device), out=self._pinned_out(n, len(chunks)))
                    for n, t in tensors.items()}
        return tuple(state.parts[r] for r in keep), selected

    def _pinned_out(self, name: str, n_chunks: int) -> torch.Tensor | None:
        """A pinned buffer for a new host-tier K/V tensor of `n_chunks` chunks; None lets torch allocate.

        Writing straight into it (out=) avoids a second full copy of the bank that .pin_memory() would make.
        """
        if name not in KV_NAMES or not self._kv_pinned:
            return None
        shape = (len(self._layers), n_chunks, self._kv_heads, self._head_dim)
        return torch.empty(shape, dtype=self._dtype, pin_memory=True)

    def _home(self, name: str) -> torch.device:
        """Device a tensor of the bank belongs on under the current tiers."""
        return torch.device("cpu") if name in KV_NAMES and self._kv_tier != "same" else self._device

    def _check_writable(self, op: str) -> None:
        if self._kv_tier == "disk":
            raise InvalidInputError(
                f"{op}() cannot change a bank loaded with kv='disk': its k_bar/v_bar are mapped read-only from "
                f"{self._kv_file}. Load it with kv='host' (or 'same') to modify it, then save it."
            )

    def _validate_encoded(self, enc: EncodedDocuments) -> tuple[tuple[PartRecord, ...], dict[str, torch.Tensor]]:
        if not isinstance(enc, EncodedDocuments):
            raise InvalidInputError(f"add() takes EncodedDocuments, got {type(enc).__name__}")
        if list(enc.layers) != self._layers:
            raise InvalidInputError(
                f"encoded layers {list(enc.layers)} differ from the bank's routing layers {self._layers}; "
                f"encode with the same routing layers as the bank"
            )
        parts = _records_from_encoded(enc)
        _check_parts(parts)
        n_chunks = sum(p.n_chunks for p in parts)
        expected = (len(self._layers), n_chunks, self._kv_heads, self._head_dim)
        return parts, {n: self._storage_tensor(getattr(enc, n), n, expected) for n in TENSOR_NAMES}

    def _storage_tensor(self, t: Any, name: str, expected: tuple[int, ...]) -> torch.Tensor:
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            raise InvalidInputError(f"encoded {name} must be a floating-point tensor, got {type(t).__name__}")
        if tuple(t.shape) != expected:
            raise InvalidInputError(
                f"encoded {name} has shape {tuple(t.shape)}, expected {list(expected)} "
                f"[layers, chunks, kv_heads, head_dim]"
            )
        out = t.detach().to(device=self._home(name), dtype=self._dtype).contiguous()
        # Checked after the cast: float16 overflows to inf, and a NaN key would poison routing.
        if not bool(torch.isfinite(out).all()):
            raise InvalidInputError(
                f"encoded {name} holds NaN or inf once cast to {self._config.encode.storage_dtype}; "
                f"check the encoder output or use a wider storage_dtype"
            )
        return out

    # ---- summaries and checks --------------------------------------------------------------
    def info(self) -> dict[str, Any]:
        """Counts, memory footprint and provenance of the bank."""
        state = self._state
        tensors = [getattr(state, n) for n in (*TENSOR_NAMES, "chunk_doc", "chunk_offsets", "chunk_counts")]
        return {
            "documents": len(self),
            "parts": self.num_parts,
            "tokens": sum(p.n_tokens for p in state.parts),
            "chunks": self.num_chunks,
            "bytes": sum(t.numel() * t.element_size() for t in tensors),
            "layers": list(self._layers),
            "kv_heads": self._kv_heads,
            "head_dim": self._head_dim,
            "chunk_size": self._config.encode.chunk_size,
            "storage_dtype": self._config.encode.storage_dtype,
            "model_name": self._model_name,
            "backbone_fingerprint": self._backbone_fp,
            "router_fingerprint": self._router_fp,
            "device": str(self._device),
            "kv_tier": self._kv_tier,
            "kv_device": str(self.kv_device),
            "kv_pinned": self._kv_pinned,
        }

    def check_compatible(self, backbone_fingerprint: str, router_fingerprint: str) -> None:
        """Raise BankMismatchError unless the bank was built by this backbone and router."""
        diffs = [f"{what} {_short(mine)} (bank) vs {_short(theirs)} (model)"
                 for what, mine, theirs in (("backbone", self._backbone_fp, backbone_fingerprint),
                                            ("router", self._router_fp, router_fingerprint))
                 if mine != theirs]
        if diffs:
            built_with = f" ({self._model_name})" if self._model_name else ""
            raise BankMismatchError(
                f"memory bank was built by another model: {'; '.join(diffs)}. Rebuild the bank with this "
                f"model (encode the documents again) or load the model the bank was built with{built_with}."
            )

    # ---- persistence -----------------------------------------------------------------------
    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write a new version under `path` and switch CURRENT to it atomically; returns the version folder."""
        root = Path(path)
        _prepare_root(root)
        state = self._state  # a snapshot: later mutations cannot tear the write
        tmp = root / f".tmp-{uuid.uuid4().hex}"
        try:
            tmp.mkdir()
            _write_version(tmp, state, self._manifest_base(state))
            final = root / _next_version(root)
            os.rename(tmp, final)
            _fsync_dir(root)
            _write_current(root, final.name)
        except BaseException as exc:
            shutil.rmtree(tmp, ignore_errors=True)
            if isinstance(exc, OSError):
                raise BankError(
                    f"could not save the memory bank to {root}: {exc}; the previous version is intact"
                ) from exc
            raise
        _remove_stale(root, keep=final.name)
        return final

    def _manifest_base(self, state: _State) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "created_at": datetime.now(UTC).isoformat(),
            "model_name": self._model_name,
            "backbone_fingerprint": self._backbone_fp,
            "router_fingerprint": self._router_fp,
            "config": self._config.model_dump(mode="json"),
            "layers": list(self._layers),
            "kv_heads": self._kv_heads,
            "head_dim": self._head_dim,
            "counts": {
                "documents": len(state.parent_rows),
                "parts": len(state.parts),
                "chunks": int(state.k_bar.shape[1]),
                "tokens": sum(p.n_tokens for p in state.parts),
            },
        }

    @classmethod
    def load(cls, path: str | os.PathLike[str], *, map_location: str | torch.device = "cpu",
             kv: str = "same") -> MemoryBank:
        """Load the live version under `path`, verifying checksums, JSON, shapes and counts first.

        `map_location` is the routing device; `kv` the tier of k_bar/v_bar ("same", "host" or "disk",
        see the module docstring). kv="disk" maps the tensors file instead of reading it.
        """
        _check_kv(kv)
        device = _device_arg(map_location, "map_location")
        root = Path(path)
        vdir = _live_version(root)
        manifest = _read_manifest(vdir / MANIFEST)
        for name in (DOCSTORE, TENSORS):
            _verify_file(vdir / name, manifest)
        parts = _read_docstore(vdir / DOCSTORE)
        bank = _bank_from_manifest(cls, manifest, vdir / MANIFEST)
        bank._set_tiers(device, kv)
        if kv == "same":
            tensors = _read_tensors(vdir / TENSORS, bank, parts)
        else:
            mapped = _map_tensors(vdir / TENSORS, bank, parts, scattered_kv=kv == "disk")
            # kr_bar is read whole by every query: always resident. K/V stay mapped only for the disk tier.
            tensors = {n: mapped[n] if kv == "disk" and n in KV_NAMES else bank._copy_home(n, mapped[n])
                       for n in TENSOR_NAMES}
            bank._kv_file = vdir / TENSORS if kv == "disk" else None
        bank._state = _build_state(parts, tensors, bank._device)
        _check_counts(bank, manifest, vdir / MANIFEST)
        return bank


# ---- state helpers -------------------------------------------------------------------------
def _build_state(parts: Sequence[PartRecord], tensors: dict[str, torch.Tensor], device: torch.device) -> _State:
    counts = torch.tensor([p.n_chunks for p in parts], dtype=torch.long, device=device)
    parent_rows: dict[str, list[int]] = {}
    for row, part in enumerate(parts):
        parent_rows.setdefault(part.parent_id, []).append(row)
    return _State(
        parts=tuple(parts),
        chunk_doc=torch.repeat_interleave(torch.arange(len(parts), device=device), counts),
        chunk_offsets=torch.cumsum(counts, 0) - counts,
        chunk_counts=counts,
        parent_rows=parent_rows,
        **tensors,
    )


def _check_kv(kv: Any) -> None:
    if not isinstance(kv, str) or kv not in KV_TIERS:
        raise InvalidInputError(f"kv must be one of {list(KV_TIERS)}, got {kv!r}")


def _device_arg(value: Any, what: str) -> torch.device:
    try:
        device = torch.device(value)
    except (RuntimeError, TypeError) as exc:
        raise InvalidInputError(f"{what} {value!r} is not a device: {exc}") from exc
    if device.type == "cuda" and not (torch.cuda.is_available()
                                      and (device.index or 0) < torch.cuda.device_count()):
        raise InvalidInputError(f"{what} {value!r} names a CUDA device this machine does not have; use 'cpu'")
    return device


def _stage_to(src: torch.Tensor, idx: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Rows `idx` of the host tensor `src`, copied to `device` asynchronously through a pinned buffer.

    A fresh buffer per call is safe without any event of ours: PyTorch's caching host allocator records
    the copy's stream and does not hand the block out again until the copy has finished; and it caches
    the block, so the allocation is cheap.
    """
    stage = torch.empty((idx.numel(), *src.shape[1:]), dtype=src.dtype, pin_memory=True)
    torch.index_select(src, 0, idx, out=stage)
    return stage.to(device, non_blocking=True)


def _check_shape_args(layers: Any, kv_heads: Any, head_dim: Any, config: Any) -> None:
    if not isinstance(config, MSAConfig):
        raise InvalidInputError(f"config must be an MSAConfig, got {type(config).__name__}")
    if (not isinstance(layers, (list, tuple)) or not layers or len(set(layers)) != len(layers)
            or any(not _is_int(i) or i < 0 for i in layers)):
        raise InvalidInputError(f"layers must be a non-empty list of distinct layer indices >= 0, got {layers!r}")
    if config.routing.layers is not None and list(config.routing.layers) != list(layers):
        raise InvalidInputError(
            f"layers {list(layers)} differ from config.routing.layers {config.routing.layers}; pass the same layers"
        )
    for name, value in (("kv_heads", kv_heads), ("head_dim", head_dim)):
        if not _is_int(value) or value < 1:
            raise InvalidInputError(f"{name} must be an integer >= 1, got {value!r}")


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _id_list(ids: Iterable[str]) -> list[str]:
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


def _short(fp: str, n: int = 12) -> str:
    return repr(fp if len(fp) <= n else fp[:n] + "...")


def _records_from_encoded(enc: EncodedDocuments) -> tuple[PartRecord, ...]:
    fields = (enc.ids, enc.parent_ids, enc.part_index, enc.texts, enc.metadatas, enc.n_tokens, enc.n_chunks)
    if len({len(f) for f in fields}) != 1:
        raise InvalidInputError("EncodedDocuments fields have different lengths")
    return tuple(
        PartRecord(id=i, parent_id=p, part_index=k, text=t, metadata=_json_metadata(m, i), n_tokens=nt, n_chunks=nc)
        for i, p, k, t, m, nt, nc in zip(*fields)
    )


def _json_metadata(meta: Any, part_id: Any) -> dict[str, Any]:
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


def _check_parts(parts: Sequence[PartRecord]) -> None:
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
        if not _is_int(value) or value < low:
            raise InvalidInputError(f"{name} of {p.id!r} must be an integer >= {low}, got {value!r}")


# ---- writing -------------------------------------------------------------------------------
def _prepare_root(root: Path) -> None:
    """Create `root`, or make sure it is ours: never write into (or clean) a user's folder."""
    if root.exists() and not root.is_dir():
        raise BankError(f"cannot save a memory bank to {root}: it exists and is not a directory")
    if not root.exists():
        try:
            root.mkdir(parents=True)
        except OSError as exc:
            raise BankError(f"cannot create the memory bank folder {root}: {exc}") from exc
        return
    current = root / CURRENT
    if current.exists():
        _read_current_name(current)  # raises if CURRENT is not ours
        return
    foreign = sorted(e.name for e in root.iterdir() if not _is_ours(e))
    if foreign:
        raise BankError(
            f"cannot save a memory bank to {root}: the folder is not empty and is not an msa bank "
            f"(no {CURRENT} file; it holds {foreign[:5]}). Nothing was changed; pick an empty or new folder."
        )


def _is_ours(entry: Path) -> bool:
    """Leftovers of our own saves (e.g. a first save that was interrupted)."""
    if entry.name == CURRENT + ".tmp":
        return entry.is_file()
    if _TMP_RE.match(entry.name):
        return entry.is_dir()
    return _is_version_dir(entry)


def _is_version_dir(entry: Path) -> bool:
    # A version folder always holds a manifest (it is written before the rename into place).
    return bool(_VERSION_RE.match(entry.name)) and (entry / MANIFEST).is_file()


def _next_version(root: Path) -> str:
    numbers = [int(m.group(1)) for e in root.iterdir() if (m := _VERSION_RE.match(e.name))]
    return f"v{max(numbers, default=0) + 1:06d}"


def _write_version(vdir: Path, state: _State, manifest: dict[str, Any]) -> None:
    tensors = {n: getattr(state, n).detach().cpu().contiguous() for n in TENSOR_NAMES}
    save_file(tensors, str(vdir / TENSORS), metadata={"format": "pt"})
    _fsync_file(vdir / TENSORS)
    docstore = {"parts": [p.to_dict() for p in state.parts]}
    _write_bytes(vdir / DOCSTORE, json.dumps(docstore, ensure_ascii=False).encode("utf-8"))
    manifest = {**manifest, "files": {name: _file_digest(vdir / name) for name in (DOCSTORE, TENSORS)}}
    # The manifest goes last: a version folder that has one is complete.
    _write_bytes(vdir / MANIFEST, json.dumps(manifest, indent=2).encode("utf-8"))
    _fsync_dir(vdir)


def _write_current(root: Path, version: str) -> None:
    tmp = root / (CURRENT + ".tmp")
    _write_bytes(tmp, (version + "\n").encode("ascii"))
    os.replace(tmp, root / CURRENT)
    _fsync_dir(root)


def _write_bytes(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _fsync_file(path: Path) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # some platforms (Windows) cannot open a directory; rename is then the best we have
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _remove_stale(root: Path, keep: str) -> None:
    """Remove older versions and leftovers of interrupted saves; only entries we recognise as ours."""
    for entry in list(root.iterdir()):  # listed first: the loop renames entries
        if entry.name == keep or not _is_ours(entry):
            continue
        # Best effort: the new version is already live, a leftover only costs disk space.
        if entry.is_dir():
            # Renamed to a .tmp- name first: a crash midway through rmtree (manifest already gone)
            # then leaves a folder the next save still recognises as ours and removes.
            doomed = entry if _TMP_RE.match(entry.name) else root / f".tmp-{uuid.uuid4().hex}"
            try:
                os.replace(entry, doomed)
            except OSError:
                doomed = entry
            shutil.rmtree(doomed, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)


def _file_digest(path: Path) -> dict[str, Any]:
    sha = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(_HASH_BLOCK):
            sha.update(block)
    return {"sha256": sha.hexdigest(), "size": path.stat().st_size}


# ---- reading -------------------------------------------------------------------------------
def _live_version(root: Path) -> Path:
    if not root.is_dir():
        raise BankError(f"not an msa bank: {root} does not exist or is not a directory")
    current = root / CURRENT
    if not current.is_file():
        versions = sorted(e.name for e in root.iterdir() if _is_version_dir(e))
        if versions:
            raise BankError(
                f"half-written msa bank at {root}: no {CURRENT} file, though version folders {versions} exist; "
                f"save the bank again, or write the name of a complete version into {current}"
            )
        raise BankError(f"not an msa bank: {root} has no {CURRENT} file")
    vdir = root / _read_current_name(current)
    if not vdir.is_dir():
        raise BankError(f"half-written msa bank: {current} names {vdir.name}, but {vdir} does not exist")
    return vdir


def _read_current_name(current: Path) -> str:
    try:
        name = current.read_text(encoding="ascii").strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise BankError(f"not an msa bank: {current} is unreadable ({exc})") from exc
    if not _VERSION_RE.match(name):
        raise BankError(f"not an msa bank (or half-written): {current} holds {name[:40]!r}, not a version name")
    return name


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_bytes().decode("utf-8"))
    except FileNotFoundError as exc:
        raise CorruptBankError(f"corrupt msa bank: {path} is missing") from exc
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise CorruptBankError(f"corrupt msa bank: {path} is not valid JSON ({exc})") from exc


def _read_manifest(path: Path) -> dict[str, Any]:
    manifest = _read_json(path)
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise BankError(f"not an msa bank: {path} does not declare format {FORMAT!r}")
    version = manifest.get("format_version")
    if not _is_int(version) or version < 1:
        raise CorruptBankError(f"corrupt msa bank: {path} has format_version {version!r}")
    if version > FORMAT_VERSION:
        raise BankError(
            f"{path} is format_version {version}, newer than this msa reads ({FORMAT_VERSION}); upgrade msa"
        )
    return manifest


def _verify_file(path: Path, manifest: dict[str, Any]) -> None:
    expected = manifest.get("files", {}).get(path.name) if isinstance(manifest.get("files"), dict) else None
    if not isinstance(expected, dict) or "sha256" not in expected or "size" not in expected:
        raise CorruptBankError(f"corrupt msa bank: {path.parent / MANIFEST} lacks the checksum of {path.name}")
    if not path.is_file():
        raise CorruptBankError(f"corrupt msa bank: {path} is missing")
    size = path.stat().st_size
    if size != expected["size"]:
        raise CorruptBankError(f"corrupt msa bank: {path} has {size} bytes, the manifest says {expected['size']}")
    if _file_digest(path)["sha256"] != expected["sha256"]:
        raise CorruptBankError(f"corrupt msa bank: {path} does not match its sha256 in the manifest")


def _read_docstore(path: Path) -> tuple[PartRecord, ...]:
    data = _read_json(path)
    rows = data.get("parts") if isinstance(data, dict) else None
    if not isinstance(rows, list):
        raise CorruptBankError(f"corrupt msa bank: {path} has no 'parts' list")
    try:
        parts = tuple(PartRecord(**row) for row in rows)
        _check_parts(parts)
    except (TypeError, InvalidInputError) as exc:
        raise CorruptBankError(f"corrupt msa bank: {path} holds a bad record: {exc}") from exc
    return parts


def _bank_from_manifest(cls: type[MemoryBank], manifest: dict[str, Any], path: Path) -> MemoryBank:
    try:
        config = MSAConfig.model_validate(manifest["config"])
        return cls(
            layers=manifest["layers"], kv_heads=manifest["kv_heads"], head_dim=manifest["head_dim"],
            config=config, backbone_fingerprint=manifest["backbone_fingerprint"],
            router_fingerprint=manifest["router_fingerprint"], model_name=manifest.get("model_name", ""),
        )
    except KeyError as exc:
        raise CorruptBankError(f"corrupt msa bank: {path} lacks {exc}") from exc
    except (ValidationError, InvalidInputError) as exc:
        raise CorruptBankError(f"corrupt msa bank: {path} holds bad settings: {exc}") from exc


def _read_tensors(path: Path, bank: MemoryBank, parts: Sequence[PartRecord]) -> dict[str, torch.Tensor]:
    try:
        loaded = load_file(str(path), device=str(bank.device))
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise CorruptBankError(f"corrupt msa bank: {path} is unreadable ({exc})") from exc
    return _check_tensors(loaded, path, bank, parts)


def _map_tensors(path: Path, bank: MemoryBank, parts: Sequence[PartRecord], *,
                 scattered_kv: bool) -> dict[str, torch.Tensor]:
    """The bank's tensors as views of one private memory map of the safetensors file.

    Nothing is read up front: a page comes from disk when first touched, and the page cache may drop it
    again, so banks larger than RAM work. ACCESS_COPY (MAP_PRIVATE): a stray write stays in this process;
    the file itself is never changed. Layout: u64 LE header size, JSON header, data.
    `scattered_kv` advises the kernel that k_bar/v_bar will be read in scattered rows (see _advise_random).
    """
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            n_head = int.from_bytes(f.read(8), "little")
            if size < 8 or not 2 <= n_head <= size - 8:
                raise ValueError(f"header length {n_head} does not fit a file of {size} bytes")
            header = json.loads(f.read(n_head))
            mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
    except (OSError, ValueError) as exc:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise CorruptBankError(f"corrupt msa bank: {path} is unreadable ({exc})") from exc
    if not isinstance(header, dict):
        raise CorruptBankError(f"corrupt msa bank: {path} has a header that is not a JSON object")
    data = torch.frombuffer(mm, dtype=torch.uint8)  # holds a reference to mm: the map lives as long as views do
    mapped = {}
    for name in TENSOR_NAMES:
        if name in header:
            view = mapped[name] = _mapped_view(data, 8 + n_head, header[name], path, name)
            if scattered_kv and name in KV_NAMES:
                _advise_random(mm, view.storage_offset() * view.element_size(), view.nbytes)
    return _check_tensors(mapped, path, bank, parts)


def _advise_random(mm: mmap.mmap, offset: int, length: int) -> None:
    """Turn off read-ahead for a byte range that is read in scattered rows.

    By default a page fault also reads the pages around it: gathering 100 random 1 KiB chunks of a
    100 MB layer read 111 MB from disk, with MADV_RANDOM under 1 MB (2,000 chunks: 9 MB).
    """
    if length and hasattr(mmap, "MADV_RANDOM"):  # not on Windows; read-ahead then stays on
        lo = offset - offset % mmap.PAGESIZE
        mm.madvise(mmap.MADV_RANDOM, lo, offset + length - lo)


def _mapped_view(data: torch.Tensor, start: int, entry: Any, path: Path, name: str) -> torch.Tensor:
    try:
        dtype = _SAFETENSORS_DTYPES[entry["dtype"]]
        shape = [int(d) for d in entry["shape"]]
        begin, end = (int(x) for x in entry["data_offsets"])
    except (KeyError, TypeError, ValueError) as exc:
        raise CorruptBankError(f"corrupt msa bank: {path} describes {name} badly ({entry!r})") from exc
    nbytes = dtype.itemsize * torch.Size(shape).numel()
    if min(shape, default=0) < 0 or begin < 0 or end - begin != nbytes or start + end > data.numel():
        raise CorruptBankError(f"corrupt msa bank: {path} places {name} at bytes {begin}..{end}, which does not "
                               f"fit {shape} {dtype} in a file of {data.numel()} bytes")
    if (start + begin) % dtype.itemsize:
        # safetensors aligns its data; a file that does not cannot be viewed in place.
        raise CorruptBankError(f"corrupt msa bank: {path} stores {name} unaligned; load it with kv='same'")
    return data[start + begin:start + end].view(dtype).view(shape)


def _check_tensors(loaded: dict[str, torch.Tensor], path: Path, bank: MemoryBank,
                   parts: Sequence[PartRecord]) -> dict[str, torch.Tensor]:
    expected = (len(bank.layers), sum(p.n_chunks for p in parts), bank.kv_heads, bank.head_dim)
    for name in TENSOR_NAMES:
        t = loaded.get(name)
        if t is None:
            raise CorruptBankError(f"corrupt msa bank: {path} lacks the tensor {name!r}")
        if tuple(t.shape) != expected or t.dtype != bank.storage_dtype:
            raise CorruptBankError(
                f"corrupt msa bank: {path} has {name} {tuple(t.shape)} {t.dtype}, the docstore and manifest "
                f"imply {expected} {bank.storage_dtype}"
            )
    return {n: loaded[n] for n in TENSOR_NAMES}


def _check_counts(bank: MemoryBank, manifest: dict[str, Any], path: Path) -> None:
    info = bank.info()
    counts = manifest.get("counts")
    actual = {k: info[k] for k in ("documents", "parts", "chunks", "tokens")}
    if counts != actual:
        raise CorruptBankError(f"corrupt msa bank: {path} counts {counts} differ from the files' {actual}")
