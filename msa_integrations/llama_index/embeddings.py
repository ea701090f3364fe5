"""A placeholder embedding model, so `VectorStoreIndex` over an MSA store needs no real one.

`VectorStoreIndex` resolves an embedding model when it is built (`Settings.embed_model`, which
defaults to OpenAI: a network call and an API key) and embeds every node it inserts. MSA routes
on the text itself and ignores those vectors, so `MSAVectorStore` installs this placeholder as
`Settings.embed_model` when the user has configured none. Node embeddings become a constant; a
query embedding raises, so an index over another vector store that would silently rank by the
constant fails loudly instead, saying what to do.
"""

from __future__ import annotations

import logging

from llama_index.core.base.embeddings.base import BaseEmbedding, Embedding
from llama_index.core.settings import Settings

logger = logging.getLogger(__name__)

_QUERY_ERROR = (
    "MSAPlaceholderEmbedding cannot embed queries: msa installed it as Settings.embed_model because no "
    "embedding model was configured, and MSA routes text without embeddings. This index uses another "
    "vector store, which needs a real model: set Settings.embed_model (or pass embed_model=) before "
    "building it."
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
