"""`MSAVectorStore`: a LlamaIndex vector store whose "similarity" is MSA routing.

    store = MSAVectorStore()                                  # empty, on the embedded default model
    index = VectorStoreIndex.from_documents(docs, storage_context=StorageContext.from_defaults(vector_store=store),
                                            embed_model=MSAPlaceholderEmbedding())   # MSA needs no embeddings
    index.as_retriever(similarity_top_k=3).retrieve("Who keeps the lighthouse?")

It stores text (`stores_text=True`) and takes the query text, not a vector (`is_embedding_query=False`).
Each node is one bank document (id = node_id); filters run inside the engine before routing.
Query modes: "default" (routing order) and "mmr" (maximal marginal relevance, `mmr_threshold` =
lambda); a query with no text returns the nodes that pass its filters, in bank order.

`VectorStoreQueryMode.HYBRID` fuses routing with the bank's BM25 index (MSAModel.retrieve(fusion="bm25")):

    index.as_retriever(vector_store_query_mode="hybrid", alpha=0.5)   # alpha 1: routing only, 0: BM25 only

Hybrid nodes (MSANodeWithScore) carry `msa_latent_score` and `msa_lexical_score` beside the fused `msa_score`.
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import fsspec
from llama_index.core.bridge.pydantic import PrivateAttr
from llama_index.core.schema import BaseNode
from llama_index.core.vector_stores.simple import NAMESPACE_SEP
from llama_index.core.vector_stores.types import (
    DEFAULT_PERSIST_DIR,
    DEFAULT_PERSIST_FNAME,
    BasePydanticVectorStore,
    MetadataFilters,
    VectorStoreQuery,
    VectorStoreQueryMode,
    VectorStoreQueryResult,
)

from msa_core.errors import InvalidInputError
from msa_core.memory.filters import Filter, compile_filter
from msa_core.model import MSAModel, RetrievedDocument
from msa_core.routing.mmr import document_vectors, mmr_select
from msa_core.store import MemoryStore

from .embeddings import ensure_embed_model
from .filters import combine, to_msa_filter
from .nodes import REF_DOC_KEY, has_text, hit_to_node, node_to_record, record_to_node

logger = logging.getLogger(__name__)

_ALL = 1 << 62  # "every document": retrieve caps k at the bank size
_MMR_LAMBDA = 0.5  # LlamaIndex's default mmr_threshold
_MMR_PREFETCH_FACTOR = 4  # candidates per result considered by MMR, unless mmr_prefetch_k is given


class MSAVectorStore(BasePydanticVectorStore):
    """LlamaIndex vector store over an msa `MemoryStore` (one model, one memory bank).

    Args:
        store: the MemoryStore to wrap; default: an empty one on `model`.
        model: the MSAModel of a new store; default: the shared embedded default model.
        set_embed_model: opt in to installing `MSAPlaceholderEmbedding` as the process-wide
            `Settings.embed_model` when none is configured. Off by default: pass
            `embed_model=MSAPlaceholderEmbedding()` to the indexes over this store instead, which
            leaves every other index of the process alone (see embeddings.py).
    """

    stores_text: bool = True
    is_embedding_query: bool = False  # VectorIndexRetriever then passes query_str, never embeds
    flat_metadata: bool = False  # the bank keeps nested JSON metadata

    _store: MemoryStore = PrivateAttr()

    def __init__(self, store: MemoryStore | None = None, *, model: MSAModel | None = None,
                 set_embed_model: bool = False, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if store is not None and not isinstance(store, MemoryStore):
            raise InvalidInputError(f"store must be an msa MemoryStore, got {type(store).__name__}")
        if store is not None and model is not None and store.model is not model:
            raise InvalidInputError("pass either store= or model=, not both: the store already has a model")
        self._store = store if store is not None else MemoryStore(model)
        if set_embed_model:
            ensure_embed_model()

    @classmethod
    def class_name(cls) -> str:
        return "MSAVectorStore"

    def __getstate__(self) -> Any:
        # LlamaIndex's BaseComponent pickles by dropping what it cannot pickle: the copy would be an
        # empty store that retrieves nothing. Refuse instead, naming the way that keeps the bank.
        raise TypeError("an MSAVectorStore (and an index over one) cannot be pickled: its memory bank lives in "
                        "tensors behind a lock. Save it with index.storage_context.persist(persist_dir=d) and "
                        "reload it with MSAVectorStore.from_persist_dir(d) in the other process")

    @property
    def client(self) -> MemoryStore:
        return self._store

    @property
    def store(self) -> MemoryStore:
        """The wrapped MemoryStore (share it with MSARetriever, MSALLM, MSAQueryEngine)."""
        return self._store

    # ---- writes -------------------------------------------------------------------------

    def add(self, nodes: Sequence[BaseNode], **kwargs: Any) -> list[str]:
        """Encode the nodes into the bank (a node id already there is replaced); returns their ids."""
        nodes = _with_text(nodes)
        if not nodes:
            return []
        ids, texts, metas = _records(nodes)
        self._store.add(texts, ids, metas, show_progress_bar=kwargs.get("show_progress"))
        return [n.node_id for n in nodes]

    async def async_add(self, nodes: Sequence[BaseNode], **kwargs: Any) -> list[str]:
        nodes = _with_text(nodes)
        if not nodes:
            return []
        ids, texts, metas = _records(nodes)
        await self._store.aadd(texts, ids, metas, show_progress_bar=kwargs.get("show_progress"))
        return [n.node_id for n in nodes]

    # Finding the ids and deleting them happen under one hold of the store's lock: an upsert in between
    # could otherwise move a node to another source document and see it deleted anyway. The async
    # versions run all of it on the store's worker thread: taking the lock on the event loop would
    # block the loop behind whatever the worker is doing.

    def delete(self, ref_doc_id: str, **delete_kwargs: Any) -> None:
        """Delete every node of the source document `ref_doc_id`."""
        with self._store.locked():
            self._store.delete(self._ids_of_ref_doc(ref_doc_id))

    async def adelete(self, ref_doc_id: str, **delete_kwargs: Any) -> None:
        await self._store.run_async(self.delete, ref_doc_id)

    def delete_nodes(self, node_ids: list[str] | None = None, filters: MetadataFilters | None = None,
                     **delete_kwargs: Any) -> None:
        """Delete the nodes that are in `node_ids` AND match `filters`; with neither, nothing (see clear)."""
        if node_ids is None and filters is None:
            return
        ids = _id_list(node_ids) if node_ids is not None else None
        with self._store.locked():
            if filters is not None:
                wanted = set(ids) if ids is not None else None
                ids = [i for i in self._ids_where(to_msa_filter(filters)) if wanted is None or i in wanted]
            self._store.delete(ids or [])

    async def adelete_nodes(self, node_ids: list[str] | None = None, filters: MetadataFilters | None = None,
                            **delete_kwargs: Any) -> None:
        await self._store.run_async(self.delete_nodes, node_ids, filters)

    def clear(self) -> None:
        with self._store.locked():
            self._store.delete(self._store.ids())

    async def aclear(self) -> None:
        await self._store.run_async(self.clear)

    # ---- reads --------------------------------------------------------------------------

    def get_nodes(self, node_ids: list[str] | None = None,
                  filters: MetadataFilters | None = None) -> list[BaseNode]:
        """Nodes by id (missing ids skipped, order kept) and/or filter; all nodes with neither."""
        predicate = compile_filter(to_msa_filter(filters))
        with self._store.locked():  # ids and records from one bank version, not from either side of an add
            records = self._store.get(_id_list(node_ids) if node_ids is not None else self._store.ids())
        return [record_to_node(r["id"], r["text"], r["metadata"]) for r in records if predicate(r["metadata"])]

    async def aget_nodes(self, node_ids: list[str] | None = None,
                         filters: MetadataFilters | None = None) -> list[BaseNode]:
        return await self._store.run_async(self.get_nodes, node_ids, filters)

    def query(self, query: VectorStoreQuery, **kwargs: Any) -> VectorStoreQueryResult:
        """Nodes by routing score ("default"), by maximal marginal relevance ("mmr"), or, with no
        query text, the nodes passing the filters (bank order, no score)."""
        question, k, msa_filter = _plan(query)
        node_ids = set(query.node_ids or ())
        if question is None:
            return self._filtered(k, msa_filter, node_ids)
        if query.mode == VectorStoreQueryMode.MMR:
            return self._mmr(query, question, k, msa_filter, node_ids, kwargs)
        hits = self._store.retrieve(question, k=_ALL if node_ids else k, filter=msa_filter, **_fusion(query))
        return _result(hits, node_ids, k)

    async def aquery(self, query: VectorStoreQuery, **kwargs: Any) -> VectorStoreQueryResult:
        question, k, msa_filter = _plan(query)
        if question is None or query.mode == VectorStoreQueryMode.MMR:
            return await self._store.run_async(self.query, query, **kwargs)
        node_ids = set(query.node_ids or ())
        hits = await self._store.aretrieve(question, k=_ALL if node_ids else k, filter=msa_filter, **_fusion(query))
        return _result(hits, node_ids, k)

    def _filtered(self, k: int, msa_filter: Filter, node_ids: set[str]) -> VectorStoreQueryResult:
        nodes = self.get_nodes(filters=msa_filter)  # type: ignore[arg-type]  # to_msa_filter passes msa filters
        nodes = [n for n in nodes if not node_ids or n.node_id in node_ids][:k]
        return VectorStoreQueryResult(nodes=nodes, similarities=None, ids=[n.node_id for n in nodes])

    def _mmr(self, query: VectorStoreQuery, question: str, k: int, msa_filter: Filter, node_ids: set[str],
             kwargs: dict[str, Any]) -> VectorStoreQueryResult:
        """k of the best fetch_k nodes by MMR (msa_core.routing.mmr): relevance = routing relevance, similarity =
        cosine of the pooled routing keys; lambda = mmr_threshold (0.5 when unset)."""
        threshold = kwargs.get("mmr_threshold", query.mmr_threshold)  # vector_store_kwargs or the query
        lam = _MMR_LAMBDA if threshold is None else float(threshold)
        if not 0.0 <= lam <= 1.0:
            raise InvalidInputError(f"mmr_threshold must be in [0, 1] (1: relevance only), got {lam}")
        fetch_k = int(kwargs.get("mmr_prefetch_k") or k * kwargs.get("mmr_prefetch_factor", _MMR_PREFETCH_FACTOR))
        with self._store.locked():  # route and read the pooled keys from one bank version
            hits = self._store.retrieve(question, k=_ALL if node_ids else max(k, fetch_k), filter=msa_filter)
            hits = [h for h in hits if not node_ids or h.id in node_ids][:max(k, fetch_k)]
            if not hits:
                return VectorStoreQueryResult(nodes=[], similarities=[], ids=[])
            vectors = document_vectors(self._store.bank, [h.id for h in hits])
        picks = mmr_select([h.relevance_score for h in hits], vectors, k, lam)
        return _result([hits[i] for i in picks], set(), k)

    def _ids_of_ref_doc(self, ref_doc_id: str) -> list[str]:
        """Nodes whose source is `ref_doc_id`; in banks written by other msa tools, where records
        carry no source, the record `ref_doc_id` itself (it is its own source document)."""
        ids = self._ids_where({REF_DOC_KEY: ref_doc_id})
        own = self._store.get([ref_doc_id])
        if own and REF_DOC_KEY not in own[0]["metadata"]:
            ids.append(ref_doc_id)
        return ids

    def _ids_where(self, msa_filter: Filter) -> list[str]:
        """Document ids whose metadata passes the filter, from one consistent snapshot of the bank."""
        predicate = compile_filter(msa_filter)
        self._store.reload_if_newer()  # a store loaded from a folder follows versions other processes save
        parts = self._store.bank.docstore  # an immutable tuple: later writes swap in a new one
        return list(dict.fromkeys(p.parent_id for p in parts if predicate(p.metadata)))

    # ---- persistence (the bank's own format: safetensors + JSON, no pickle) -------------

    def persist(self, persist_path: str, fs: fsspec.AbstractFileSystem | None = None) -> None:
        """Save the bank as a folder at `persist_path` (StorageContext.persist names it
        `<dir>/default__vector_store.json`); load it with `from_persist_dir` / `from_persist_path`."""
        _check_local(fs)
        self._store.save(persist_path)

    @classmethod
    def from_persist_path(cls, persist_path: str | os.PathLike[str], model: MSAModel | None = None,
                          fs: fsspec.AbstractFileSystem | None = None, **kwargs: Any) -> "MSAVectorStore":
        """Load a persisted store; `model` must be the one that built the bank (default model if None)."""
        _check_local(fs)
        path = Path(persist_path)
        if not path.exists():
            raise InvalidInputError(f"no persisted MSAVectorStore at {path}; call persist() or "
                                    f"storage_context.persist() first, or check the path")
        return cls(MemoryStore.load(path, model=model), **kwargs)

    @classmethod
    def from_persist_dir(cls, persist_dir: str | os.PathLike[str] = DEFAULT_PERSIST_DIR,
                         namespace: str = "default", model: MSAModel | None = None,
                         fs: fsspec.AbstractFileSystem | None = None, **kwargs: Any) -> "MSAVectorStore":
        """Load the store that `storage_context.persist(persist_dir)` wrote for `namespace`."""
        path = Path(persist_dir) / f"{namespace}{NAMESPACE_SEP}{DEFAULT_PERSIST_FNAME}"
        return cls.from_persist_path(path, model=model, fs=fs, **kwargs)

    @classmethod
    def from_namespaced_persist_dir(cls, persist_dir: str | os.PathLike[str] = DEFAULT_PERSIST_DIR,
                                    model: MSAModel | None = None, fs: fsspec.AbstractFileSystem | None = None,
                                    **kwargs: Any) -> dict[str, "MSAVectorStore"]:
        """{namespace: store} for every bank `storage_context.persist(persist_dir)` wrote, as
        SimpleVectorStore's method of this name: pass it as `StorageContext.from_defaults(vector_stores=...)`."""
        _check_local(fs)
        suffix = f"{NAMESPACE_SEP}{DEFAULT_PERSIST_FNAME}"
        found = sorted(p for p in Path(persist_dir).glob(f"*{suffix}") if p.is_dir())
        if not found:
            raise InvalidInputError(f"no persisted MSAVectorStore in {persist_dir} (no *{suffix} bank folder); "
                                    "call storage_context.persist(persist_dir) first, or check the path")
        return {p.name[:-len(suffix)]: cls.from_persist_path(p, model=model, **kwargs) for p in found}


def as_memory_store(obj: Any) -> MemoryStore:
    """The MemoryStore behind a MemoryStore, an MSAVectorStore or a VectorStoreIndex over one."""
    if isinstance(obj, MemoryStore):
        return obj
    if isinstance(obj, MSAVectorStore):
        return obj.store
    inner = getattr(obj, "vector_store", None)  # a VectorStoreIndex
    if isinstance(inner, MSAVectorStore):
        return inner.store
    raise InvalidInputError(
        f"expected an msa MemoryStore, an MSAVectorStore or a VectorStoreIndex over one, got {type(obj).__name__}")


def _id_list(node_ids: Sequence[str] | str) -> list[str]:
    # One string is one id, as in MemoryBank: list("abc") would delete (or get) nodes "a", "b", "c".
    return [node_ids] if isinstance(node_ids, str) else list(node_ids)


def _with_text(nodes: Sequence[BaseNode]) -> list[BaseNode]:
    """The nodes that have text. Empty ones (an empty file, a blank page) are skipped with a warning
    that counts them, as LlamaIndex's own indexes skip them: one empty file never fails a batch."""
    kept = [n for n in nodes if has_text(n)]
    skipped = len(nodes) - len(kept)
    if skipped:
        message = (f"MSAVectorStore skipped {skipped} of {len(nodes)} node(s) with no text (e.g. an empty file): "
                   "MSA encodes text, so there is nothing to store for them")
        logger.warning(message)
        warnings.warn(message, UserWarning, stacklevel=3)
    return kept


def _records(nodes: Sequence[BaseNode]) -> tuple[list[str], list[str], list[dict[str, Any]]]:
    # A repeated node id in one batch keeps its last version, as successive upserts would.
    latest = {r[0]: r for r in map(node_to_record, nodes)}
    ids, texts, metas = zip(*latest.values())
    return list(ids), list(texts), list(metas)


def _plan(query: VectorStoreQuery) -> tuple[str | None, int, Filter]:
    """(question or None for a filter-only query, k, msa filter); refuses what MSA cannot honour."""
    if query.mode not in (VectorStoreQueryMode.DEFAULT, VectorStoreQueryMode.MMR,
                          VectorStoreQueryMode.HYBRID):
        raise InvalidInputError(
            f"query mode {query.mode.value!r} is not supported by MSAVectorStore: MSA ranks by routing "
            f"score; use vector_store_query_mode='default', 'mmr' or 'hybrid' (routing fused with BM25, alpha)")
    question = query.query_str if query.query_str and query.query_str.strip() else None
    if question is None and query.query_embedding is not None:
        raise InvalidInputError("MSAVectorStore routes the query text, but query_str is empty and only an "
                                "embedding was given; pass the question text (query embeddings are not used)")
    if query.similarity_top_k < 1:
        raise InvalidInputError(f"similarity_top_k must be >= 1, got {query.similarity_top_k}")
    doc_filter = {REF_DOC_KEY: {"$in": list(query.doc_ids)}} if query.doc_ids else None
    return question, query.similarity_top_k, combine(to_msa_filter(query.filters), doc_filter)


def _fusion(query: VectorStoreQuery) -> dict[str, Any]:
    """retrieve() arguments of a query: fusion with BM25 in hybrid mode (alpha None: the model's default)."""
    if query.mode == VectorStoreQueryMode.HYBRID:
        return {"fusion": "bm25", "alpha": query.alpha}
    return {}


def _result(hits: list[RetrievedDocument], node_ids: set[str], k: int) -> VectorStoreQueryResult:
    if node_ids:  # as_retriever passes [] (nothing to restrict) when the store keeps the text
        hits = [h for h in hits if h.id in node_ids][:k]
    scored = [hit_to_node(h) for h in hits]
    return VectorStoreQueryResult(nodes=[s.node for s in scored], similarities=[s.score for s in scored],
                                  ids=[h.id for h in hits])


def _check_local(fs: fsspec.AbstractFileSystem | None) -> None:
    if fs is not None and "file" not in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)):
        raise InvalidInputError(f"MSAVectorStore persists to the local disk only, got a {fs.protocol!r} "
                                "filesystem; persist locally and copy the folder")
