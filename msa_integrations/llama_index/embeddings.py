"""A placeholder embedding model, so `VectorStoreIndex` over an MSA store needs no real one.

`VectorStoreIndex` resolves an embedding model when it is built (`Settings.embed_model`, which
defaults to OpenAI: a network call and an API key) and embeds every node it inserts; an
`IngestionPipeline` hands its vector store only the nodes that have an embedding. MSA routes on the
text itself and ignores those vectors, so give this placeholder wherever LlamaIndex asks for an
embedding model, for the indexes over an MSA store only:

    VectorStoreIndex.from_documents(docs, storage_context=ctx, embed_model=MSAPlaceholderEmbedding())
    load_index_from_storage(ctx, embed_model=MSAPlaceholderEmbedding())
    IngestionPipeline(transformations=[SentenceSplitter(), MSAPlaceholderEmbedding()], vector_store=store)

Node embeddings become a constant; a query embedding raises, so an index over another vector store
that would silently rank by the constant fails loudly instead, saying what to do. Nothing here
changes `Settings` unless asked (`MSAVectorStore(set_embed_model=True)` or `ensure_embed_model()`).
"""

from __future__ import annotations

import logging

from llama_index.core.base.embeddings.base import BaseEmbedding, Embedding
from llama_index.core.settings import Settings

logger = logging.getLogger(__name__)

_QUERY_ERROR = (
    "MSAPlaceholderEmbedding cannot embed queries: it stands in for an embedding model only in indexes "
    "over an msa MSAVectorStore, which routes text without embeddings. This index uses another vector "
    "store, which needs a real model: pass embed_model= (or set Settings.embed_model) when building it."
)


class MSAPlaceholderEmbedding(BaseEmbedding):
    """Constant 1-d vectors for nodes; refuses queries (MSA stores never ask for one)."""

    model_name: str = "msa-placeholder"

    @classmethod
    def class_name(cls) -> str:
        return "MSAPlaceholderEmbedding"

    def _get_text_embedding(self, text: str) -> Embedding:
        return [1.0]

    async def _aget_text_embedding(self, text: str) -> Embedding:
        return [1.0]

    def _get_query_embedding(self, query: str) -> Embedding:
        raise RuntimeError(_QUERY_ERROR)

    async def _aget_query_embedding(self, query: str) -> Embedding:
        raise RuntimeError(_QUERY_ERROR)


def ensure_embed_model() -> None:
    """Install the placeholder as `Settings.embed_model` unless the user configured one."""
    # Reading the public property would resolve the OpenAI default (and fail offline), hence the
    # private field: None means "never set".
    if getattr(Settings, "_embed_model", None) is None:
        Settings.embed_model = MSAPlaceholderEmbedding()
        logger.info("no embedding model configured: using MSAPlaceholderEmbedding (MSA routes text itself)")
