"""Hybrid mode in one call: MSA routing picks the documents, any chat model writes the answer."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from langchain_core.documents import Document
from langchain_core.language_models import BaseLanguageModel
from langchain_core.output_parsers import StrOutputParser
from langchain_core.prompts import BasePromptTemplate, ChatPromptTemplate
from langchain_core.retrievers import BaseRetriever
from langchain_core.runnables import Runnable, RunnableLambda, RunnableParallel, RunnablePassthrough
from langchain_core.vectorstores import VectorStore

from msa_core.store import MemoryStore

from .retrievers import MSARetriever

# The same instruction as msa_core's own hybrid mode, so both ways of running hybrid agree.
DEFAULT_PROMPT = ChatPromptTemplate.from_messages([
    ("human", "Answer the question using only the documents below. Answer briefly.\n\n{context}\n\n"
              "Question: {question}"),
])


def format_docs(docs: Sequence[Document]) -> str:
    """Documents as numbered text blocks for a prompt."""
    return "\n\n".join(f"Document [{i + 1}]: {d.page_content}" for i, d in enumerate(docs))


def to_retriever(source: Any, **retriever_options: Any) -> BaseRetriever:
    """Any retriever as is; a VectorStore through `as_retriever`; a MemoryStore as an MSARetriever."""
    if isinstance(source, BaseRetriever):
        if retriever_options:
            raise TypeError(f"options {sorted(retriever_options)} apply when building a retriever; "
                            "this one is built already: configure it instead")
        return source
    if isinstance(source, MemoryStore):
        return MSARetriever(store=source, **retriever_options)
    if isinstance(source, VectorStore):
        return source.as_retriever(**retriever_options)
    raise TypeError(f"expected a retriever, a vector store or a MemoryStore, got {type(source).__name__}")


def build_rag_chain(retriever_or_store: Any, llm: BaseLanguageModel, prompt: BasePromptTemplate | None = None,
                    *, with_sources: bool = False, **retriever_options: Any) -> Runnable:
    """question -> retriever -> format_docs -> prompt -> llm -> string.

    retriever_or_store: an MSARetriever (or any retriever), an MSAVectorStore (or any vector store)
    or a MemoryStore; retriever_options (e.g. search_kwargs={"k": 3} for a vector store, k=3 for a
    MemoryStore) build the retriever. prompt must take {context} and {question} (default:
    DEFAULT_PROMPT). with_sources=True returns {"question", "documents", "answer"} instead of the string.
    """
    retriever = to_retriever(retriever_or_store, **retriever_options)
    prompt = prompt or DEFAULT_PROMPT
    missing = {"context", "question"} - set(prompt.input_variables)
    if missing:
        raise ValueError(f"the prompt lacks the variables {sorted(missing)}; it must take {{context}} and "
                         f"{{question}}, it takes {prompt.input_variables}")
    answer = (RunnablePassthrough.assign(context=RunnableLambda(lambda x: format_docs(x["documents"])))
              | prompt | llm | StrOutputParser())
    retrieve = RunnableParallel(question=RunnablePassthrough(), documents=retriever)
    if with_sources:
        return retrieve | RunnablePassthrough.assign(answer=answer)
    return retrieve | answer
