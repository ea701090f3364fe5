"""LlamaIndex integration of msa: retriever, vector store, LLM and latent query engine.

    from msa_integrations.llama_index import MSARetriever, MSAVectorStore, MSALLM, MSAQueryEngine

All four wrap an msa `MemoryStore` (one model, one memory bank) and never route or store by themselves.
Needs the `llamaindex` extra (llama-index-core).
"""

from .embeddings import MSAPlaceholderEmbedding
from .filters import to_msa_filter
from .llms import MSALLM
from .query_engines import MSAQueryEngine
from .retrievers import MSARetriever
from .vector_stores import MSAVectorStore

__all__ = ["MSALLM", "MSAPlaceholderEmbedding", "MSAQueryEngine", "MSARetriever", "MSAVectorStore", "to_msa_filter"]
