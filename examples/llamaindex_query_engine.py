"""LlamaIndex over MSA: a VectorStoreIndex on MSAVectorStore, asked through the hybrid and latent engines.

    python examples/llamaindex_query_engine.py [--docs 4] [--max-new-tokens 32]

Offline and CPU-only: the embedded default model (SmolLM2-135M-Instruct), no embedding model, no API
key. The default router is untrained, so routing is near chance and the tiny model's answers are
often wrong (see the README's status table); the example shows the wiring, not the quality.
"""

from __future__ import annotations

import argparse
import json
import time

from llama_index.core import Document, StorageContext, VectorStoreIndex

from msa_core.memory.corpus import DEMO_CORPUS_PATH, DEMO_QUESTIONS_PATH, read_corpus
from msa_integrations.llama_index import MSALLM, MSAPlaceholderEmbedding, MSAQueryEngine, MSAVectorStore


def load_documents(n: int) -> list[Document]:
    """The first `n` documents of the shipped demo corpus (an invented island town)."""
    records = read_corpus(DEMO_CORPUS_PATH)[:n]
    return [Document(id_=r.id, text=r.text, metadata={"title": r.title or r.id, **r.metadata}) for r in records]


def show_sources(response) -> None:
    for s in response.source_nodes:
        raw = getattr(s, "msa_score", None)  # MSA's own retrievers and engines add the raw routing score
        print(f"   {s.score:.3f}" + (f"  (raw {raw:+.3f})" if raw is not None else "")
              + f"  {s.node.ref_doc_id or s.node.node_id}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--docs", type=int, default=4, help="demo documents to index (default 4)")
    parser.add_argument("--max-new-tokens", type=int, default=32, help="answer length (default 32)")
    args = parser.parse_args()

    started = time.perf_counter()
    store = MSAVectorStore()  # empty store on the embedded default model
    documents = load_documents(args.docs)
    index = VectorStoreIndex.from_documents(documents, storage_context=StorageContext.from_defaults(vector_store=store),
                                            embed_model=MSAPlaceholderEmbedding())  # MSA needs no embeddings
    print(f"indexed {len(documents)} documents in {time.perf_counter() - started:.1f} s")

    question = json.loads(DEMO_QUESTIONS_PATH.read_text(encoding="utf-8"))[0]
    print(f"\nQ: {question['question']}   (expected: {question['answer']}, in {question['gold_id']})")

    # Hybrid: MSA routing picks the documents, any LLM reads their text. Here the same backbone
    # without memory (use_memory=False), so the example stays offline.
    generator = MSALLM(store, use_memory=False, max_new_tokens=args.max_new_tokens)
    hybrid = index.as_query_engine(llm=generator, similarity_top_k=2)  # LlamaIndex's own engine
    response = hybrid.query(question["question"])
    print(f"\n[hybrid] {response.response.strip()}")
    show_sources(response)

    # Latent: the routing layers attend to the compressed memory of the routed documents; streamed.
    latent = MSAQueryEngine(store, k=2, max_new_tokens=args.max_new_tokens, streaming=True)
    streaming = latent.query(question["question"])
    print("\n[latent] ", end="")
    for piece in streaming.response_gen:
        print(piece, end="", flush=True)
    print()
    show_sources(streaming)  # filled once the stream has ended
    print(f"\ndone in {time.perf_counter() - started:.1f} s")


if __name__ == "__main__":
    main()
