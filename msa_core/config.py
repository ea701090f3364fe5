"""Validated settings of the engine (pydantic).

`MSAConfig` gathers what decides how documents are encoded, routed and attended to. It is saved
with every memory bank, so a bank knows the settings it was built with.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from .errors import InvalidInputError

HeadReduce = Literal["mean", "max"]
# colbert: late interaction (each token's best chunk of a document, then the mean over tokens; routing/scores.py)
QueryReduce = Literal["max", "mean", "last", "colbert"]
ChunkReduce = Literal["max", "mean"]
# cosine: the paper; scaled_dot: q.k/sqrt(D), the reference inference for INFONCE_DECOUPLE (spec §2.3);
# scaled_cosine: cosine/sqrt(D), the reference without decouple_router for INFONCE (spec §9): same ranking.
Normalization = Literal["cosine", "scaled_dot", "scaled_cosine"]
Profile = Literal["default", "reference"]
LayerAggregate = Literal["mean", "max"]
FusionMethod = Literal["minmax", "zscore", "rrf"]
StorageDtype = Literal["float32", "float16", "bfloat16"]


# The routing settings a router is trained with: a trained router file records them (training/run.py), and a
# model loading it scores the same way unless its config sets them (checkpoints/loading.py).
TRAINED_SCORING = ("head_reduce", "query_reduce", "chunk_reduce", "normalization")
# Likewise the encode settings its routing keys were pooled with (a router trained on 32-token keys ranks
# 32-token keys): recorded under "encode", applied where the config names none.
TRAINED_ENCODE = ("chunk_size",)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class RoutingConfig(_Strict):
    """How a question picks documents (paper Eq. 2 and the design's retrieval ranking)."""

    layers: list[int] | None = Field(
        default=None, description="Routing layer indices; None means the upper half of the backbone."
    )
    top_k: int = Field(default=16, ge=1, description="Documents attended to per routing layer.")
    head_reduce: HeadReduce = "mean"
    query_reduce: QueryReduce = "max"
    chunk_reduce: ChunkReduce = "max"
    normalization: Normalization = "cosine"
    layer_aggregate: LayerAggregate = Field(
        default="mean", description="How per-layer document scores become one retrieval score."
    )
    position_offset: int | Literal["top_k"] = Field(
        default="top_k",
        description="First RoPE position of the question: the paper's k ('top_k') or a fixed integer.",
    )
    kernel: Literal["auto", "triton", "reference"] = Field(
        default="auto",
        description="Routing scores: 'auto' runs the Triton kernel when the bank's routing keys sit on a CUDA GPU "
                    "(and head_reduce is 'mean'), else the PyTorch reference; 'triton' insists, 'reference' never.",
    )
    exact_scores: bool = Field(
        default=False,
        description="Reproduce the fp32 reference scores. Off: the Triton kernel makes one pass on queries rounded "
                    "to the bank's dtype (scores within ~1e-3, as bf16 scoring; up to 2x faster for 128-wide heads), "
                    "and a bfloat16 model on a CPU scores against bfloat16 keys (within ~2e-3; half the bytes read).",
    )
    score_keys: Literal["bank", "int8"] = Field(
        default="bank",
        description="What routing scores read: 'bank', the bank's routing keys as stored; 'int8', the keys quantised "
                    "once per bank state to int8 with a float32 scale per chunk and kv head (routing.scores."
                    "quantized_keys): half the bytes a GPU streams per question, scores within ~3e-3 of the bank's. "
                    "Held beside the bank's keys on a GPU-resident bank; instead of their copy for a bank in host "
                    "memory. Not with exact_scores.",
    )
    retrieve_with_memory: bool = Field(
        default=False,
        description="retrieve(): let routing layers attend to their top-k while scoring (as latent generation "
                    "does). Off: score on the question's own states, the states routers are trained on.",
    )
    relevance_calibration: list[float] | None = Field(
        default=None, min_length=2, max_length=2,
        description="[a, b]: relevance_score = sigmoid(a * score + b), fitted for the router (routing/calibration.py; "
                    "the shipped router brings its own). None: the normalization's fixed map ((s + 1) / 2 for cosine).",
    )
    fusion_alpha: float = Field(
        default=0.5, ge=0.0, le=1.0,
        description="retrieve(fusion='bm25') without alpha: weight of the latent side (1 latent only, 0 BM25 only). "
                    "Chosen on a dev split of training data: benchmarks/results/fusion/alpha_dev.json.",
    )
    fusion_method: FusionMethod = Field(
        default="minmax", description="How fusion combines the sides: min-max or z-score normalised scores "
                                      "(convex combination with alpha), or reciprocal rank fusion ('rrf').",
    )

    @field_validator("layers")
    @classmethod
    def _layers_sorted_unique(cls, v: list[int] | None) -> list[int] | None:
        if v is None:
            return v
        if not v:
            raise ValueError("routing layers must not be empty; use None for the upper half")
        if any(i < 0 for i in v):
            raise ValueError(f"routing layer indices must be >= 0, got {v}")
        return sorted(set(v))

    @model_validator(mode="after")
    def _kernel_computes_reduction(self) -> "RoutingConfig":
        if self.kernel == "triton" and self.query_reduce == "colbert":
            raise ValueError("kernel='triton' computes Eq. 2 only; query_reduce='colbert' needs kernel 'auto' or "
                             "'reference'")
        if self.score_keys == "int8" and self.exact_scores:
            raise ValueError("exact_scores reproduces the fp32 reference from the bank's keys; score_keys='int8' "
                             "scores quantised keys: choose one")
        return self

    @field_validator("position_offset")
    @classmethod
    def _offset_non_negative(cls, v: int | str) -> int | str:
        if isinstance(v, int) and v < 0:
            raise ValueError(f"position_offset must be >= 0, got {v}")
        return v


class EncodeConfig(_Strict):
    """How documents are turned into pooled memory."""

    chunk_size: int = Field(default=64, ge=1, description="P: tokens per pooled chunk.")
    max_doc_tokens: int = Field(
        default=2048, ge=1, description="Longer documents are split into parts sharing a parent id."
    )
    batch_size: int = Field(default=16, ge=1, description="Most documents per forward pass.")
    max_tokens_per_batch: int | None = Field(
        default=None, ge=1,
        description="Most padded tokens (batch x longest) per forward pass. None: 2048 on a CPU (the activations "
                    "stay in cache; ~15% faster than 8192 on a 2-core machine), 8192 on a GPU.",
    )
    storage_dtype: StorageDtype = "float16"
    compile: bool = Field(
        default=False,
        description="On a GPU, torch.compile the encoding forward (one graph, dynamic batch and length: fused norms, "
                    "RoPE, activations and pooling). The first batch compiles for a while; CPUs ignore it.",
    )


class MSAConfig(_Strict):
    """All engine settings; saved in bank manifests."""

    routing: RoutingConfig = Field(default_factory=RoutingConfig)
    encode: EncodeConfig = Field(default_factory=EncodeConfig)
    profile: Profile | None = Field(
        default=None,
        description="default: our prompts and rendering; reference: the released MSA code's (template head, "
                    "instruction-wrapped routing query, `[i]`-rendered documents). None: chosen at load time "
                    "(reference for MSA-format checkpoints).",
    )

    def resolve_routing_layers(self, num_layers: int) -> list[int]:
        """Routing layers for a backbone of `num_layers` layers (default: the upper half)."""
        layers = self.routing.layers
        if layers is None:
            return list(range(num_layers // 2, num_layers))
        bad = [i for i in layers if i >= num_layers]
        if bad:
            raise InvalidInputError(
                f"routing layers {bad} do not exist in a backbone of {num_layers} layers "
                f"(valid: 0..{num_layers - 1})"
            )
        return list(layers)
