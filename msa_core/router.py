"""Router projectors and the routing scores of MSA (paper Eq. 2, spec §2.2-2.3).

`RouterProjectors` holds, per routing layer, the query projector W_QR (hidden -> H*D) and the key
projector W_KR (hidden -> Hkv*D), and reads/writes them under the released MSA checkpoint's names.

The scoring functions are the plain-PyTorch reference: a question's routing queries are scored
against every pooled routing key (`score_chunks`), chunk scores become document scores
(`reduce_to_docs`), and each row keeps its best documents (`select_top_k`). Faster kernels are
tested against these functions, so they favour clarity and bounded memory over speed.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import ChunkReduce, HeadReduce, LayerAggregate, Normalization, QueryReduce
from .errors import InvalidInputError, ModelLoadError
from .lora import NAME_RE as DELTA_NAME_RE

FORMAT_NAME = "msa-router"
FORMAT_VERSION = "1"
DELTA_FORMAT_VERSION = "2"  # a file that also carries a backbone delta (msa_core/lora.py); older msa refuse it

_Q_NAME = "model.layers.{i}.self_attn.router_q_proj.0.weight"
_K_NAME = "model.layers.{i}.self_attn.router_k_proj.0.weight"
_NAME_RE = re.compile(r"^model\.layers\.(\d+)\.self_attn\.router_([qk])_proj\.0\.weight$")

# F.normalize's default: small enough not to bias real vectors, and a zero vector stays zero.
_NORM_EPS = 1e-12


def router_q_name(layer: int) -> str:
    """Checkpoint name of layer `layer`'s query projector weight."""
    return _Q_NAME.format(i=layer)


def router_k_name(layer: int) -> str:
    """Checkpoint name of layer `layer`'s key projector weight."""
    return _K_NAME.format(i=layer)


# --------------------------------------------------------------------------------------------
# Projectors
# --------------------------------------------------------------------------------------------


def _linear_from(weight: Tensor) -> nn.Linear:
    """An nn.Linear without bias whose weight is `weight` (built on meta: no wasted random init)."""
    out_features, in_features = weight.shape
    lin = nn.Linear(in_features, out_features, bias=False, device="meta")
    lin.weight = nn.Parameter(weight)
    return lin


class RouterProjectors(nn.Module):
    """W_QR / W_KR of every routing layer (no bias, norm, RoPE or activation: spec §1.2).

    Build one with `native`, `random`, `from_state_dict_msa` or `load`; the constructor takes
    ready weights {layer: (W_QR [H*D, hidden], W_KR [Hkv*D, hidden])} and keeps them as given.
    """

    def __init__(
        self,
        weights: Mapping[int, tuple[Tensor, Tensor]],
        num_heads: int,
        kv_heads: int,
        head_dim: int,
        init_mode: str = "custom",
    ) -> None:
        super().__init__()
        _check_heads(num_heads, kv_heads, head_dim)
        if not weights:
            raise InvalidInputError("RouterProjectors needs at least one routing layer, got none")
        self.num_heads = num_heads
        self.kv_heads = kv_heads
        self.head_dim = head_dim
        self.init_mode = init_mode
        self.hidden = _check_layer_shapes(weights, num_heads, kv_heads, head_dim)
        layers = sorted(int(i) for i in weights)
        self.q_proj = nn.ModuleDict({str(i): _linear_from(weights[i][0]) for i in layers})
        self.k_proj = nn.ModuleDict({str(i): _linear_from(weights[i][1]) for i in layers})
        # Set by `load`; kept so a caller can check which backbone the router belongs to.
        self.backbone_fingerprint: str | None = None
        self.extra: dict[str, Any] = {}
        # LoRA adapters of the backbone trained with this router ({lora file name: tensor}), merged into the
        # backbone when the model loads the router (msa_core/lora.py). Empty for a router on a frozen backbone.
        self.backbone_delta: dict[str, Tensor] = {}
        self.delta_scale = 1.0

    # ---- constructors -------------------------------------------------------------------

    @classmethod
    def native(
        cls,
        attn_weights: Mapping[int, tuple[Tensor, Tensor]],
        num_heads: int,
        kv_heads: int,
        head_dim: int,
    ) -> RouterProjectors:
        """Start from the backbone's own attention: copies of (W_Q, W_K) per routing layer."""
        copies = {int(i): (wq.detach().clone(), wk.detach().clone()) for i, (wq, wk) in attn_weights.items()}
        return cls(copies, num_heads, kv_heads, head_dim, init_mode="native")

    @classmethod
    def random(
        cls,
        layers: Sequence[int],
        hidden: int,
        num_heads: int,
        kv_heads: int,
        head_dim: int,
        std: float = 0.02,
        seed: int = 0,
        dtype: torch.dtype = torch.float32,
    ) -> RouterProjectors:
        """N(0, std) weights (the reference's Qwen3 init), deterministic for a given seed.

        Draws happen in ascending layer order, W_QR before W_KR, from a private CPU generator,
        so the global RNG is untouched and the result does not depend on the order of `layers`.
        """
        if not layers:
            raise InvalidInputError("RouterProjectors.random needs at least one routing layer, got []")
        if hidden <= 0:
            raise InvalidInputError(f"hidden must be > 0, got {hidden}")
        _check_heads(num_heads, kv_heads, head_dim)
        gen = torch.Generator(device="cpu").manual_seed(seed)
        weights: dict[int, tuple[Tensor, Tensor]] = {}
        for i in sorted(set(int(x) for x in layers)):
            wq = torch.randn(num_heads * head_dim, hidden, generator=gen) * std
            wk = torch.randn(kv_heads * head_dim, hidden, generator=gen) * std
            weights[i] = (wq.to(dtype), wk.to(dtype))
        return cls(weights, num_heads, kv_heads, head_dim, init_mode="random")

    @classmethod
    def from_state_dict_msa(
        cls,
        tensors: Mapping[str, Tensor],
        num_heads: int,
        kv_heads: int,
        head_dim: int,
        init_mode: str = "msa-checkpoint",
    ) -> RouterProjectors:
        """Read the router tensors of an MSA state dict; unrelated names (the backbone) are ignored."""
        found: dict[int, dict[str, Tensor]] = {}
        for name, t in tensors.items():
            m = _NAME_RE.match(name)
            if m:
                found.setdefault(int(m.group(1)), {})[m.group(2)] = t
        if not found:
            raise ModelLoadError(
                "no router projector tensors found (expected names like "
                f"'{router_q_name(0)}'); is this a decoupled-router MSA checkpoint?"
            )
        incomplete = sorted(i for i, d in found.items() if set(d) != {"q", "k"})
        if incomplete:
            raise ModelLoadError(f"router layers {incomplete} lack their query or key projector weight")
        weights = {i: (d["q"], d["k"]) for i, d in found.items()}
        try:
            return cls(weights, num_heads, kv_heads, head_dim, init_mode=init_mode)
        except InvalidInputError as e:
            raise ModelLoadError(f"router tensors do not fit the head layout: {e}") from e

    def copy(self, layers: Sequence[int] | None = None, *, dtype: torch.dtype | None = None,
             device: str | torch.device | None = None, init_mode: str | None = None) -> RouterProjectors:
        """A detached copy of `layers` (default: all), optionally cast and moved."""
        keep = self.layers if layers is None else sorted(int(i) for i in layers)

        def convert(t: Tensor) -> Tensor:
            return t.detach().to(device=device or t.device, dtype=dtype or t.dtype).clone()

        weights = {i: (convert(self.q_weight(i)), convert(self.k_weight(i))) for i in keep}
        out = RouterProjectors(weights, self.num_heads, self.kv_heads, self.head_dim,
                               init_mode=init_mode or self.init_mode)
        out.backbone_delta = {n: convert(t) for n, t in self.backbone_delta.items()}
        out.delta_scale = self.delta_scale
        return out

    # ---- access -------------------------------------------------------------------------

    @property
    def layers(self) -> list[int]:
        """Routing layer indices, ascending."""
        return sorted(int(i) for i in self.q_proj.keys())

    def q_weight(self, layer: int) -> Tensor:
        """W_QR of `layer`, [H*D, hidden]."""
        return self._linear(self.q_proj, layer).weight

    def k_weight(self, layer: int) -> Tensor:
        """W_KR of `layer`, [Hkv*D, hidden]."""
        return self._linear(self.k_proj, layer).weight

    def project_queries(self, layer: int, x: Tensor) -> Tensor:
        """Routing queries: x [..., hidden] -> [..., H, D] (x is cast to the weight dtype)."""
        w = self.q_weight(layer)
        return F.linear(x.to(w.dtype), w).unflatten(-1, (self.num_heads, self.head_dim))

    def project_keys(self, layer: int, x: Tensor) -> Tensor:
        """Routing keys: x [..., hidden] -> [..., Hkv, D] (x is cast to the weight dtype)."""
        w = self.k_weight(layer)
        return F.linear(x.to(w.dtype), w).unflatten(-1, (self.kv_heads, self.head_dim))

    def _linear(self, table: nn.ModuleDict, layer: int) -> nn.Linear:
        key = str(int(layer))
        if key not in table:
            raise InvalidInputError(f"layer {layer} is not a routing layer; routing layers are {self.layers}")
        return table[key]  # type: ignore[return-value]

    # ---- identity & persistence ---------------------------------------------------------

    def state_dict_msa(self) -> dict[str, Tensor]:
        """Weights under the released MSA checkpoint's names (detached, contiguous)."""
        out: dict[str, Tensor] = {}
        for i in self.layers:
            out[router_q_name(i)] = self.q_weight(i).detach().contiguous()
            out[router_k_name(i)] = self.k_weight(i).detach().contiguous()
        return out

    def fingerprint(self) -> str:
        """First 16 hex chars of a sha256 over head layout, names, shapes and fp32 weight bytes.

        Bytes are taken as fp32 on CPU, so the value is the same across processes, devices and
        storage dtypes that hold the same numbers.
        """
        h = hashlib.sha256()
        h.update(f"{FORMAT_NAME}/{FORMAT_VERSION}:{self.num_heads},{self.kv_heads},{self.head_dim}".encode())
        for name, t in self.state_dict_msa().items():  # ascending layers, q before k
            h.update(f"|{name}:{tuple(t.shape)}|".encode())
            h.update(t.to(device="cpu", dtype=torch.float32).contiguous().numpy().tobytes())
        if self.backbone_delta:  # routers without a delta keep the fingerprints they always had
            h.update(f"|delta scale {self.delta_scale!r}|".encode())
            for name, t in sorted(self.backbone_delta.items()):
                h.update(f"|{name}:{tuple(t.shape)}|".encode())
                h.update(t.to(device="cpu", dtype=torch.float32).contiguous().numpy().tobytes())
        return h.hexdigest()[:16]

    def save(
        self, path: str | os.PathLike[str], backbone_fingerprint: str, extra: dict[str, Any] | None = None
    ) -> None:
        """Write one safetensors file (atomically: temp file renamed into place)."""
        path = Path(path)
        metadata = self._metadata(backbone_fingerprint, extra)
        tensors = {n: t.cpu() for n, t in self.state_dict_msa().items()}
        tensors.update({n: t.detach().cpu().contiguous() for n, t in self.backbone_delta.items()})
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        try:
            from safetensors.torch import save_file

            save_file(tensors, tmp, metadata=metadata)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def _metadata(self, backbone_fingerprint: str, extra: dict[str, Any] | None) -> dict[str, str]:
        try:
            extra_json = json.dumps(extra or {}, sort_keys=True)
        except (TypeError, ValueError) as e:
            raise InvalidInputError(f"router 'extra' metadata must be JSON-serialisable: {e}") from e
        shapes = {n: list(t.shape) for n, t in self.state_dict_msa().items()}
        return {
            "format": FORMAT_NAME,
            "version": DELTA_FORMAT_VERSION if self.backbone_delta else FORMAT_VERSION,
            "backbone_delta": json.dumps({"scale": self.delta_scale, "tensors": len(self.backbone_delta)}),
            "backbone_fingerprint": str(backbone_fingerprint),
            "router_fingerprint": self.fingerprint(),
            "init_mode": self.init_mode,
            "layers": json.dumps(self.layers),
            "hidden": str(self.hidden),
            "num_heads": str(self.num_heads),
            "kv_heads": str(self.kv_heads),
            "head_dim": str(self.head_dim),
            "shapes": json.dumps(shapes, sort_keys=True),
            "extra": extra_json,
        }

    @classmethod
    def load(
        cls,
        path: str | os.PathLike[str],
        expected_backbone_fingerprint: str | None = None,
        *,
        device: str | torch.device = "cpu",
    ) -> RouterProjectors:
        """Read a file written by `save`; checks format, backbone and integrity (ModelLoadError)."""
        path = Path(path)
        if not path.is_file():
            raise ModelLoadError(f"router file {str(path)!r} does not exist; train or save a router first")
        tensors, meta = _read_safetensors(path, device)
        _check_format(path, meta)
        got_backbone = meta.get("backbone_fingerprint")
        if expected_backbone_fingerprint is not None and got_backbone != expected_backbone_fingerprint:
            raise ModelLoadError(
                f"router {str(path)!r} was trained for another backbone (fingerprint {got_backbone!r}, "
                f"this backbone is {expected_backbone_fingerprint!r}); use the router that matches the "
                "model, or build a new one (native/random init)"
            )
        router = _router_from_file(path, tensors, meta)
        router.backbone_fingerprint = got_backbone
        return router


def _check_heads(num_heads: int, kv_heads: int, head_dim: int) -> None:
    if num_heads <= 0 or kv_heads <= 0 or head_dim <= 0:
        raise InvalidInputError(
            f"num_heads, kv_heads and head_dim must be > 0, got {num_heads}, {kv_heads}, {head_dim}"
        )
    if num_heads % kv_heads:
        raise InvalidInputError(f"num_heads ({num_heads}) must be a multiple of kv_heads ({kv_heads})")


def _check_layer_shapes(
    weights: Mapping[int, tuple[Tensor, Tensor]], num_heads: int, kv_heads: int, head_dim: int
) -> int:
    """Validate every (W_QR, W_KR) pair and return the common hidden size."""
    hiddens = set()
    for i, (wq, wk) in weights.items():
        if int(i) < 0:
            raise InvalidInputError(f"routing layer indices must be >= 0, got {i}")
        if wq.dim() != 2 or wq.shape[0] != num_heads * head_dim:
            raise InvalidInputError(
                f"layer {i}: query projector has shape {tuple(wq.shape)}, "
                f"expected [{num_heads * head_dim}, hidden]"
            )
        if wk.dim() != 2 or wk.shape != (kv_heads * head_dim, wq.shape[1]):
            raise InvalidInputError(
                f"layer {i}: key projector has shape {tuple(wk.shape)}, "
                f"expected [{kv_heads * head_dim}, {wq.shape[1]}]"
            )
        hiddens.add(int(wq.shape[1]))
    if len(hiddens) != 1:
        raise InvalidInputError(f"routing layers disagree on the hidden size: {sorted(hiddens)}")
    return hiddens.pop()


def _read_safetensors(path: Path, device: str | torch.device) -> tuple[dict[str, Tensor], dict[str, str]]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt", device=str(device)) as f:
            meta = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises several types for truncated/garbage files
        raise ModelLoadError(f"router file {str(path)!r} is not a readable safetensors file: {e}") from e
    return tensors, meta


def _check_format(path: Path, meta: Mapping[str, str]) -> None:
    if meta.get("format") != FORMAT_NAME:
        raise ModelLoadError(
            f"{str(path)!r} is not an msa router file "
            f"(format {meta.get('format')!r}, expected {FORMAT_NAME!r})"
        )
    if meta.get("version") not in (FORMAT_VERSION, DELTA_FORMAT_VERSION):
        raise ModelLoadError(
            f"router file {str(path)!r} has format version {meta.get('version')!r}; "
            f"this msa reads versions {FORMAT_VERSION!r} and {DELTA_FORMAT_VERSION!r}"
        )


def _router_from_file(path: Path, tensors: Mapping[str, Tensor], meta: Mapping[str, str]) -> RouterProjectors:
    """Rebuild the projectors and check them against the file's own metadata."""
    try:
        heads = int(meta["num_heads"]), int(meta["kv_heads"]), int(meta["head_dim"])
        layers = json.loads(meta["layers"])
        extra = json.loads(meta.get("extra", "{}"))
        delta_scale = float(json.loads(meta.get("backbone_delta", "{}")).get("scale", 1.0))
    except (KeyError, ValueError, AttributeError) as e:
        raise ModelLoadError(f"router file {str(path)!r} has malformed metadata: {e}") from e
    delta = {n: t for n, t in tensors.items() if DELTA_NAME_RE.match(n)}
    if delta and meta.get("version") != DELTA_FORMAT_VERSION:
        raise ModelLoadError(f"router file {str(path)!r} holds backbone adapters but is format version "
                             f"{meta.get('version')!r}, not {DELTA_FORMAT_VERSION!r}")
    unexpected = sorted(n for n in tensors if not _NAME_RE.match(n) and n not in delta)
    if unexpected:
        raise ModelLoadError(f"router file {str(path)!r} holds unexpected tensors {unexpected[:5]}")
    router = RouterProjectors.from_state_dict_msa({n: t for n, t in tensors.items() if n not in delta}, *heads,
                                                  init_mode=meta.get("init_mode", "custom"))
    router.backbone_delta, router.delta_scale = delta, delta_scale
    if router.layers != layers:
        raise ModelLoadError(f"router file {str(path)!r} lists layers {layers} but holds {router.layers}")
    stored = meta.get("router_fingerprint")
    if stored is not None and stored != router.fingerprint():
        raise ModelLoadError(
            f"router file {str(path)!r} is corrupt: its weights do not match its stored fingerprint"
        )
    router.extra = extra if isinstance(extra, dict) else {}
    return router


# --------------------------------------------------------------------------------------------
# Scoring (paper Eq. 2)
# --------------------------------------------------------------------------------------------


def _check_choice(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise InvalidInputError(f"{name} must be one of {allowed}, got {value!r}")


def _check_score_inputs(q: Tensor, token_mask: Tensor, kr_bar: Tensor, chunk_block: int) -> None:
    check_score_shapes(q, token_mask, kr_bar)
    if chunk_block <= 0:
        raise InvalidInputError(f"chunk_block must be > 0, got {chunk_block}")
    empty = (~token_mask.any(dim=1)).nonzero().flatten().tolist()
    if empty:
        raise InvalidInputError(f"rows {empty} have no valid routing token (token_mask is all False)")


def check_score_shapes(q: Tensor, token_mask: Tensor, kr_bar: Tensor) -> None:
    """Shapes and head layout of routing-score inputs (shared with the Triton kernels' dispatcher)."""
    if q.dim() != 4:
        raise InvalidInputError(f"q must be [B, T, H, D], got shape {tuple(q.shape)}")
    if kr_bar.dim() != 3:
        raise InvalidInputError(f"kr_bar must be [C, Hkv, D], got shape {tuple(kr_bar.shape)}")
    b, t, h, d = q.shape
    if token_mask.shape != (b, t) or token_mask.dtype != torch.bool:
        raise InvalidInputError(
            f"token_mask must be a bool tensor of shape {(b, t)}, "
            f"got {token_mask.dtype} {tuple(token_mask.shape)}"
        )
    hkv = kr_bar.shape[1]
    if kr_bar.shape[2] != d:
        raise InvalidInputError(f"head_dim differs: q has {d}, kr_bar has {kr_bar.shape[2]}")
    if hkv == 0 or h % hkv:
        raise InvalidInputError(f"query heads ({h}) must be a multiple of kv heads ({hkv})")


def _last_valid_token(q: Tensor, token_mask: Tensor) -> tuple[Tensor, Tensor]:
    """Keep only each row's highest-index valid token (works for left and right padding)."""
    t = token_mask.shape[1]
    positions = torch.arange(t, device=token_mask.device).expand_as(token_mask)
    last = torch.where(token_mask, positions, -1).amax(dim=1)  # [B]
    q_last = q[torch.arange(q.shape[0], device=q.device), last].unsqueeze(1)  # [B, 1, H, D]
    return q_last, torch.ones(q.shape[0], 1, dtype=torch.bool, device=q.device)


def _token_head_scores(q: Tensor, k: Tensor, head_reduce: str) -> Tensor:
    """S(t, c) for one block of chunks: q [B, T, Hkv, G, D], k [c, Hkv, D] -> [B, T, c]."""
    num_heads = q.shape[2] * q.shape[3]
    if head_reduce == "mean":
        # mean_h <q_h, k_g(h)> = (1/H) sum_g <sum_{h in g} q_h, k_g>: never builds [B, T, H, c].
        return torch.einsum("btgd,cgd->btc", q.sum(dim=3), k) / num_heads

    def group_max(g: int) -> Tensor:  # one kv group at a time bounds memory to [B, T, G, c]
        return torch.einsum("btjd,cd->btjc", q[:, :, g], k[:, g]).amax(dim=2)

    best = group_max(0)
    for g in range(1, q.shape[2]):
        best = torch.maximum(best, group_max(g))
    return best


def _reduce_tokens(s: Tensor, token_mask: Tensor, query_reduce: str) -> Tensor:
    """[B, T, c] -> [B, c] over valid tokens ('last' was already reduced to one token)."""
    m = token_mask.unsqueeze(-1)
    if query_reduce == "mean":
        return s.masked_fill(~m, 0.0).sum(dim=1) / token_mask.sum(dim=1, keepdim=True).to(s.dtype)
    return s.masked_fill(~m, float("-inf")).amax(dim=1)  # max, and last (a single valid token)


def score_chunks(
    q: Tensor,
    token_mask: Tensor,
    kr_bar: Tensor,
    *,
    head_reduce: HeadReduce,
    query_reduce: QueryReduce,
    normalization: Normalization,
    chunk_block: int = 16384,
) -> Tensor:
    """Routing score of every pooled chunk for every row (paper Eq. 2), float32 [B, C].

    q [B, T, H, D] routing queries, token_mask [B, T] True for routing tokens (padding may be on
    either side), kr_bar [C, Hkv, D] pooled routing keys. Query head h reads kv head h // (H/Hkv).
    cosine: both sides L2-normalised; scaled_dot: raw dot product times 1/sqrt(D) (spec §2.3);
    scaled_cosine: cosine times 1/sqrt(D) (the reference without decouple_router, spec §9).
    Chunks are processed `chunk_block` at a time so memory does not grow with the bank.
    """
    _check_choice("head_reduce", head_reduce, ("mean", "max"))
    _check_choice("query_reduce", query_reduce, ("max", "mean", "last"))
    _check_choice("normalization", normalization, ("cosine", "scaled_dot", "scaled_cosine"))
    _check_score_inputs(q, token_mask, kr_bar, chunk_block)
    b, _, h, d = q.shape
    hkv = kr_bar.shape[1]
    token_mask = token_mask.to(q.device)
    q = q.float()
    k = kr_bar.to(device=q.device, dtype=torch.float32)
    if query_reduce == "last":
        q, token_mask = _last_valid_token(q, token_mask)
    if normalization in ("cosine", "scaled_cosine"):
        q = F.normalize(q, dim=-1, eps=_NORM_EPS)
        k = F.normalize(k, dim=-1, eps=_NORM_EPS)
    if normalization in ("scaled_dot", "scaled_cosine"):
        q = q * (1.0 / math.sqrt(d))  # scaling q once is cheaper than scaling every score
    q = q.unflatten(2, (hkv, h // hkv))  # [B, T, Hkv, G, D]
    out = torch.empty(b, k.shape[0], dtype=torch.float32, device=q.device)
    for start in range(0, k.shape[0], chunk_block):
        s = _token_head_scores(q, k[start : start + chunk_block], head_reduce)
        out[:, start : start + chunk_block] = _reduce_tokens(s, token_mask, query_reduce)
    return out


def reduce_to_docs(
    chunk_scores: Tensor,
    chunk_doc: Tensor,
    num_docs: int,
    *,
    chunk_reduce: ChunkReduce,
) -> Tensor:
    """Document scores [B, N] from chunk scores [B, C]; chunk c belongs to doc chunk_doc[c].

    A document without chunks scores -inf, so it can never outrank a real one.
    """
    _check_choice("chunk_reduce", chunk_reduce, ("max", "mean"))
    if chunk_scores.dim() != 2 or chunk_doc.dim() != 1 or chunk_doc.shape[0] != chunk_scores.shape[1]:
        raise InvalidInputError(
            f"chunk_scores must be [B, C] and chunk_doc [C], "
            f"got {tuple(chunk_scores.shape)} and {tuple(chunk_doc.shape)}"
        )
    if num_docs < 0:
        raise InvalidInputError(f"num_docs must be >= 0, got {num_docs}")
    if chunk_doc.numel() and (int(chunk_doc.min()) < 0 or int(chunk_doc.max()) >= num_docs):
        raise InvalidInputError(
            f"chunk_doc values must lie in [0, {num_docs}), "
            f"got [{int(chunk_doc.min())}, {int(chunk_doc.max())}]"
        )
    scores = chunk_scores.float()
    b = scores.shape[0]
    index = chunk_doc.to(device=scores.device, dtype=torch.long).expand(b, -1)
    if chunk_reduce == "max":
        init = torch.full((b, num_docs), float("-inf"), device=scores.device)
        return init.scatter_reduce(1, index, scores, reduce="amax", include_self=True)
    means = torch.zeros(b, num_docs, device=scores.device).scatter_reduce(
        1, index, scores, reduce="mean", include_self=False
    )
    has_chunk = torch.bincount(chunk_doc.long(), minlength=num_docs).to(scores.device) > 0
    return means.masked_fill(~has_chunk, float("-inf"))


def select_top_k(
    doc_scores: Tensor,
    k: int,
    allowed: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """The k best allowed documents of each row: (values [B, k_eff], indices [B, k_eff]).

    `allowed` is a bool mask over documents, shared ([N]) or per row ([B, N]); a disallowed
    document is never returned. k_eff = min(k, fewest allowed documents of any row), so every
    row gets k_eff real documents and no sentinel index exists (a per-row filter that allows
    fewer documents in one row shortens every row; call per row if that matters).
    Order: score descending; equal scores by lower document index (stable sort).
    Allowed documents scoring -inf (no chunks) may still fill a row.
    """
    if k <= 0:
        raise InvalidInputError(f"k must be >= 1, got {k}")
    if doc_scores.dim() != 2:
        raise InvalidInputError(f"doc_scores must be [B, N], got shape {tuple(doc_scores.shape)}")
    if torch.isnan(doc_scores).any():
        raise InvalidInputError("doc_scores contains NaN; check the routing inputs")
    b, n = doc_scores.shape
    allowed_bn = _allowed_mask(allowed, b, n, doc_scores.device)
    k_eff = min(k, int(allowed_bn.sum(dim=1).min()) if b else 0)
    # Two stable sorts = lexicographic order (allowed first, then score desc, then index asc),
    # so a disallowed document cannot slip in by tying with an allowed -inf one.
    by_score = torch.sort(doc_scores, dim=1, descending=True, stable=True).indices
    flags = allowed_bn.gather(1, by_score)
    by_allowed = torch.sort((~flags).to(torch.uint8), dim=1, stable=True).indices
    indices = by_score.gather(1, by_allowed)[:, :k_eff]
    return doc_scores.gather(1, indices), indices


def _allowed_mask(allowed: Tensor | None, b: int, n: int, device: torch.device) -> Tensor:
    if allowed is None:
        return torch.ones(b, n, dtype=torch.bool, device=device)
    if allowed.dtype != torch.bool or allowed.shape not in ((n,), (b, n)):
        raise InvalidInputError(
            f"allowed must be a bool tensor of shape ({n},) or ({b}, {n}), "
            f"got {allowed.dtype} {tuple(allowed.shape)}"
        )
    return allowed.to(device).expand(b, n)


def aggregate_layers(layer_scores: Tensor, how: LayerAggregate) -> Tensor:
    """One ranking from per-layer document scores: [L, B, N] -> [B, N] by mean or max."""
    _check_choice("how", how, ("mean", "max"))
    if layer_scores.dim() != 3 or layer_scores.shape[0] == 0:
        raise InvalidInputError(f"layer_scores must be [L>=1, B, N], got shape {tuple(layer_scores.shape)}")
    if how == "mean":
        return layer_scores.float().mean(dim=0)
    return layer_scores.float().amax(dim=0)


def relevance(scores: Tensor, normalization: Normalization, head_dim: int | None = None,
              calibration: Sequence[float] | None = None) -> Tensor:
    """Scores mapped to [0, 1]: with a calibration (a, b), sigmoid(a*s + b) (msa_core/calibration.py); else
    cosine -> (s+1)/2 clamped; scaled_dot -> sigmoid(s); scaled_cosine -> (s*sqrt(head_dim)+1)/2 clamped
    (head_dim required)."""
    _check_choice("normalization", normalization, ("cosine", "scaled_dot", "scaled_cosine"))
    if calibration is not None:
        from .calibration import calibrated

        return calibrated(scores, calibration)
    s = scores.float()
    if normalization == "scaled_cosine":
        if head_dim is None or head_dim <= 0:
            raise InvalidInputError("relevance of scaled_cosine scores needs head_dim (the routing head size)")
        s = s * math.sqrt(head_dim)
    if normalization in ("cosine", "scaled_cosine"):
        return ((s + 1.0) / 2.0).clamp(0.0, 1.0)
    return torch.sigmoid(s)
