"""LlamaIndex nodes <-> msa bank records.

A node becomes one bank document: id = node_id, text = the node's own text, metadata = the node's
metadata plus LlamaIndex's usual bookkeeping keys (`_node_content` holding the whole node as JSON,
`_node_type`, `ref_doc_id`, `doc_id`, `document_id`), exactly as LlamaIndex's own vector stores
write them. So a node comes back whole (relationships included), `ref_doc_id` can be filtered on,
and banks written by other msa tools (no `_node_content`) still come back as plain TextNodes.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from llama_index.core.schema import BaseNode, MetadataMode, NodeWithScore, TextNode
from llama_index.core.vector_stores.utils import metadata_dict_to_node, node_to_metadata_dict

from msa_core.errors import InvalidInputError
from msa_core.model import RetrievedDocument
from msa_core.routing.scores import relevance
from msa_core.store import MemoryStore

SCORE_KEY = "msa_score"  # MSANodeWithScore's field holding the raw routing score (cosine in [-1, 1] by default)
# Hybrid (fusion) queries: msa_score is the fused score, and each side's own score rides beside it (fields too).
LATENT_KEY, LEXICAL_KEY = "msa_latent_score", "msa_lexical_score"
REF_DOC_KEY = "ref_doc_id"
_NODE_CONTENT = "_node_content"


class MSANodeWithScore(NodeWithScore):
    """A NodeWithScore that also carries the raw routing score.

    `score` is the relevance in [0, 1]. The raw score lives here, not in `node.metadata`: the node's
    hash covers its metadata, and LlamaIndex merges the same node found by several retrievers
    (QueryFusionRetriever, reciprocal rank fusion) by that hash.
    """

    msa_score: float | None = None
    msa_latent_score: float | None = None  # fusion: the routing side's score
    msa_lexical_score: float | None = None  # fusion: the BM25 side's score


def has_text(node: BaseNode) -> bool:
    text = node.get_content(metadata_mode=MetadataMode.NONE)
    return bool(text and text.strip())


def node_to_record(node: BaseNode) -> tuple[str, str, dict[str, Any]]:
    """(id, text, metadata) to add to a bank. The text routes as is: metadata is not prepended."""
    if not has_text(node):
        raise InvalidInputError(
            f"node {node.node_id!r} has no text; MSA encodes text, so drop empty nodes before adding them")
    text = node.get_content(metadata_mode=MetadataMode.NONE)
    return node.node_id, text, node_to_metadata_dict(node, remove_text=True, flat_metadata=False)


def record_to_node(doc_id: str, text: str, metadata: dict[str, Any]) -> BaseNode:
    """The node a bank record was made from, or a TextNode for records written by other tools."""
    if _NODE_CONTENT in metadata:
        return metadata_dict_to_node(metadata, text=text)
    return TextNode(id_=doc_id, text=text, metadata=dict(metadata))


def scored_node(node: BaseNode, raw_score: float, relevance_score: float,
                sides: dict[str, float] | None = None) -> MSANodeWithScore:
    """`score` is the relevance in [0, 1]; `msa_score` the raw routing score, and in a fusion each side's own
    score (`sides`: msa_latent_score, msa_lexical_score). The node is left as stored: its hash covers metadata."""
    return MSANodeWithScore(node=node, score=relevance_score, msa_score=raw_score, **(sides or {}))


def hit_to_node(hit: RetrievedDocument) -> MSANodeWithScore:
    sides = ({LATENT_KEY: hit.latent_score, LEXICAL_KEY: hit.lexical_score}
             if hit.latent_score is not None else None)
    return scored_node(record_to_node(hit.id, hit.text, hit.metadata), hit.score, hit.relevance_score, sides)


def answer_sources(store: MemoryStore, doc_ids: Sequence[str], scores: Sequence[float]) -> list[NodeWithScore]:
    """Source nodes of an msa Answer: the routed documents still in the bank, best first."""
    if not doc_ids:
        return []
    records = {r["id"]: r for r in store.get(list(doc_ids))}
    routing = store.model.config.routing
    rel = relevance(torch.tensor(list(scores), dtype=torch.float32), routing.normalization,
                    store.model.backbone.args.head_dim, routing.relevance_calibration)
    return [scored_node(record_to_node(d, records[d]["text"], records[d]["metadata"]), float(s), float(r))
            for d, s, r in zip(doc_ids, scores, rel.tolist()) if d in records]
