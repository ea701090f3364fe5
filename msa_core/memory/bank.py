"""MemoryBank: pooled memory tensors per routing layer, the chunk -> part map and the docstore.

Pure data, no model code. Rows are document *parts* (a long document is split into parts sharing a
parent id); the chunks of a row are contiguous in the tensors. Every mutation builds a new immutable
`BankState` (records.py) and swaps it in with one assignment, so a failed call leaves the bank as it was.
Saving and loading (crash safe, versioned folders, no pickle) is persist.py.

Storage tiers. Routing reads all of K̄_R for every query, generation only the K̄/V̄ rows of the chosen
documents, so the two can live apart. `bank.device` (the routing device) holds kr_bar and the chunk
index; `kv_tier` says where k_bar/v_bar live: "same" (on `bank.device`, the default), "host" (CPU
memory, pinned when CUDA is present so copies to the GPU can be asynchronous) or "disk" (a read-only
memory map of the saved tensors file, see persist.map_tensors: pages are read when touched, so a bank
larger than RAM still serves). `gather_kv` copies only the selected chunks to the compute device.
Pick the tier with `MemoryBank.load(path, map_location=..., kv=...)` or `bank.to(device, kv=...)`;
a disk-tier bank cannot be mutated (load it with kv="host" to edit), but it can be saved elsewhere.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
from pydantic import ValidationError

from ..config import MSAConfig
from ..errors import BankMismatchError, CorruptBankError, InvalidInputError
from . import persist
from .build_stats import BuildStats
from .encoded import EncodedDocuments, all_finite
from .filters import Filter, compile_filter
from .lexical import LexicalCache
from .persist import FORMAT, FORMAT_VERSION, MANIFEST, TENSORS
from .records import (KV_NAMES, STORAGE_DTYPES, TENSOR_NAMES, BankState, PartRecord, build_state, check_parts,
                      check_shape_args, id_list, is_int, records_from_encoded)
from .tiers import check_kv, device_arg, stage_to


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
        check_shape_args(layers, kv_heads, head_dim, config)
        for name, value in (("backbone_fingerprint", backbone_fingerprint),
                            ("router_fingerprint", router_fingerprint), ("model_name", model_name)):
            if not isinstance(value, str):
                raise InvalidInputError(f"{name} must be a string, got {type(value).__name__}")
        self._layers = list(layers)
        self._kv_heads = kv_heads
        self._head_dim = head_dim
        self._config = config.model_copy(deep=True)
        self._dtype = STORAGE_DTYPES[config.encode.storage_dtype]
        self._device = torch.device("cpu")
        self._kv_tier = "same"
        self._kv_pinned = False
        self._kv_file: Path | None = None  # the mapped tensors file of a disk-tier bank
        self._backbone_fp = backbone_fingerprint
        self._router_fp = router_fingerprint
        self._model_name = model_name
        empty = torch.empty(len(layers), 0, kv_heads, head_dim, dtype=self._dtype)
        self._state = build_state((), {n: empty for n in TENSOR_NAMES}, self._device)
        self._lexical = LexicalCache()  # BM25 over the rows' text (lexical.py), built for the current rows
        self._build = BuildStats()  # encoding speed of the documents added so far (manifest "build")

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
    def built_with(self) -> tuple[str, int]:  # (profile, chunk size), checked per query: no config copy
        return self._config.profile or "default", self._config.encode.chunk_size

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

    lexical_index = property(lambda self: self._lexical.index_for(self._state.parts))  # BM25 of the rows' text

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
        for pid in id_list(ids):
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

    def text(self, parent_id: str) -> str:
        """One parent's whole text (its parts joined); KeyError when absent."""
        return "".join(self._state.parts[r].text for r in self._state.parent_rows[parent_id])

    def parts(self, parent_id: str) -> list[dict[str, Any]]:
        """Part records of one parent in part order, each with its `row`; [] when absent."""
        state = self._state
        return [{**state.parts[r].to_dict(), "row": r} for r in state.parent_rows.get(parent_id, [])]

    def parent_rows(self) -> list[list[int]]:
        """Rows of every parent (insertion order), each in part order."""
        return [list(rows) for rows in self._state.parent_rows.values()]

    def rows_of(self, parent_ids: Iterable[str]) -> torch.Tensor:
        """Rows of the given parents (order kept, parts in part order); missing ids skipped."""
        rows_by_parent = self._state.parent_rows
        rows = [r for pid in id_list(parent_ids) for r in rows_by_parent.get(pid, ())]
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
        device = device_arg(device, "device")
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise InvalidInputError(f"dtype must be a floating-point torch.dtype, got {dtype!r}")
        state = self._state
        idx = self._chunk_index(chunks, state.k_bar.device, int(state.k_bar.shape[1]))
        sources = (state.k_bar[li], state.v_bar[li])
        if state.k_bar.device.type == "cpu" and device.type == "cuda":
            return tuple(stage_to(src, idx, device).to(dtype) for src in sources)  # type: ignore[return-value]
        return tuple(src.index_select(0, idx).to(device, dtype) for src in sources)  # type: ignore[return-value]

    def _layer_position(self, layer_index: Any) -> int:
        n = len(self._layers)
        if not is_int(layer_index) or not 0 <= layer_index < n:
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
        check_kv(kv)
        bank = self._empty_like(device_arg(device, "device"), kv)
        state = self._state
        tensors = {n: bank._copy_home(n, getattr(state, n)) for n in TENSOR_NAMES}
        bank._state = build_state(state.parts, tensors, bank._device)
        bank._build = self._build.copy()
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
        self._state = build_state(kept_parts + new_parts, tensors, self._device)
        self._build.record(sum(encoded.n_tokens), encoded.encode_seconds, encoded.compute_dtype)
        return parents

    def delete(self, ids: Iterable[str]) -> int:
        """Delete documents by PARENT id (part ids are not accepted); missing ids are ignored.

        Returns how many parents were deleted. Other documents' tensors are copied bit for bit.
        """
        self._check_writable("delete")
        state = self._state
        targets = {pid for pid in id_list(ids) if pid in state.parent_rows}
        if not targets:
            return 0
        keep = [r for r, p in enumerate(state.parts) if p.parent_id not in targets]
        parts, tensors = self._select_rows(keep)
        self._state = build_state(parts, tensors, self._device)
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
        parts = records_from_encoded(enc)
        check_parts(parts)
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
        if not all_finite(out):
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
            **self._build.info(),
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
        state = self._state  # a snapshot: later mutations cannot tear the write
        return persist.save_version(Path(path), state, self._manifest_base(state), self._lexical.files(state.parts))

    def _manifest_base(self, state: BankState) -> dict[str, Any]:
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
            "build": self._build.to_dict(),
        }

    @classmethod
    def from_manifest(cls, manifest: dict[str, Any], path: Path) -> MemoryBank:
        """An empty bank with the settings a saved manifest records (Memory Parallel loads shards with it)."""
        return _bank_from_manifest(cls, manifest, path)

    def with_contents(self, parts: Sequence[PartRecord], tensors: dict[str, torch.Tensor],
                      device: torch.device | None = None) -> MemoryBank:
        """A bank with this one's settings and fingerprints holding exactly `parts` and `tensors` (e.g. a
        shard of a larger bank). The tensors must be [layers, chunks of parts, kv_heads, head_dim]."""
        check_parts(parts)
        device = self._device if device is None else device
        expected = (len(self._layers), sum(p.n_chunks for p in parts), self._kv_heads, self._head_dim)
        for name, t in tensors.items():
            if tuple(t.shape) != expected:
                raise InvalidInputError(f"tensor {name} has shape {tuple(t.shape)}, expected {expected}")
        bank = self._empty_like(device, "same")
        bank._state = build_state(tuple(parts), {n: tensors[n] for n in TENSOR_NAMES}, device)
        return bank

    @classmethod
    def load(cls, path: str | os.PathLike[str], *, map_location: str | torch.device = "cpu",
             kv: str = "same") -> MemoryBank:
        """Load the live version under `path`, verifying checksums, JSON, shapes and counts first.

        `map_location` is the routing device; `kv` the tier of k_bar/v_bar ("same", "host" or "disk",
        see the module docstring). kv="disk" maps the tensors file instead of reading it.
        """
        check_kv(kv)
        device = device_arg(map_location, "map_location")
        return persist.retry_on_switch(Path(path), lambda: cls._load_live(Path(path), device, kv))

    @classmethod
    def _load_live(cls, path: Path, device: torch.device, kv: str) -> MemoryBank:
        vdir, manifest, parts = persist.read_version(path)
        bank = cls.from_manifest(manifest, vdir / MANIFEST)
        bank._set_tiers(device, kv)
        if kv == "same":
            tensors = persist.read_tensors(vdir / TENSORS, bank, parts)
        else:
            mapped = persist.map_tensors(vdir / TENSORS, bank, parts, scattered_kv=kv == "disk")
            # kr_bar is read whole by every query: always resident. K/V stay mapped only for the disk tier.
            tensors = {n: mapped[n] if kv == "disk" and n in KV_NAMES else bank._copy_home(n, mapped[n])
                       for n in TENSOR_NAMES}
            bank._kv_file = vdir / TENSORS if kv == "disk" else None
        bank._state = build_state(parts, tensors, bank._device)
        bank._lexical = LexicalCache.read(vdir, manifest, parts)
        bank._build = BuildStats.from_dict(manifest.get("build"))
        persist.check_counts(bank, manifest, vdir / MANIFEST)
        return bank


def _bank_from_manifest(cls: type[MemoryBank], manifest: dict[str, Any], path: Path) -> MemoryBank:
    """An empty bank with the settings a manifest records (CorruptBankError naming `path` if they are bad)."""
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


def _short(fp: str, n: int = 12) -> str:
    return repr(fp if len(fp) <= n else fp[:n] + "...")
