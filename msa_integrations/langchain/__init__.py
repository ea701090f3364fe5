"""LangChain adapters over an MSA MemoryStore (installed with the `langchain` extra).

    from msa_integrations.langchain import MSARetriever, MSAVectorStore, ChatMSA, build_rag_chain
"""

from .chains import DEFAULT_PROMPT, build_rag_chain, format_docs
from .chat_models import ChatMSA
from .retrievers import MSARetriever
from .vectorstores import MSAVectorStore

__all__ = ["ChatMSA", "DEFAULT_PROMPT", "MSARetriever", "MSAVectorStore", "build_rag_chain", "format_docs"]
