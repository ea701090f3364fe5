"""Adapters that plug msa into RAG frameworks (LangChain, LlamaIndex) and the A/B harness."""
