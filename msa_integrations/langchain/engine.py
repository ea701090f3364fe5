"""Building the MemoryStore an adapter wraps, from the options LangChain users pass.

Every LangChain class here is a thin layer over one `msa_core.store.MemoryStore` (one model, one
bank, one lock, one worker thread); nothing here routes or stores by itself.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any, TypeVar

from msa_core import MemoryBank, MSAModel
from msa_core.store import MemoryStore, shared_default_model

T = TypeVar("T")

# Options that choose or load the engine, accepted by `from_texts`, `load_local` and the constructors.
ENGINE_OPTIONS = ("model", "bank", "router", "config", "device", "dtype", "profile")
_LOAD_OPTIONS = ("router", "config", "device", "dtype", "profile")


def make_store(**options: Any) -> MemoryStore:
    """A MemoryStore from engine options.

    model:  None or "default" (the shared embedded default model), a checkpoint folder or hub id,
            or a loaded `MSAModel`.
    bank:   None (a new empty bank), a `MemoryBank`, or the folder of a saved bank.
    router, config, device, dtype, profile: passed to `MSAModel.from_pretrained` when a model is
            loaded here.
    """
    unknown = sorted(set(options) - set(ENGINE_OPTIONS))
    if unknown:
        raise TypeError(f"unknown engine option(s) {unknown}; the engine options are {list(ENGINE_OPTIONS)}")
    model, bank = options.get("model"), options.get("bank")
    load_kw = {k: options[k] for k in _LOAD_OPTIONS if options.get(k) is not None}
    if isinstance(model, MSAModel):
        if load_kw:
            raise TypeError(f"options {sorted(load_kw)} only apply when the model is loaded by name; "
                            "the MSAModel you passed is already loaded: drop them or pass a name")
        engine: MSAModel | None = model
    elif (model is None or model == "default") and not load_kw:
        engine = None  # MemoryStore shares one default model per process
    elif model is None or isinstance(model, (str, Path)):
        engine = MSAModel.from_pretrained(model or "default", **load_kw)
    else:
        raise TypeError(f"model must be None, a name or folder, or an MSAModel; got {type(model).__name__}")
    if isinstance(bank, (str, Path)):  # a store that follows the folder: new versions saved there are picked up
        return MemoryStore.load(bank, engine or shared_default_model())
    if bank is not None and not isinstance(bank, MemoryBank):
        raise TypeError(f"bank must be None, a MemoryBank or a saved bank's folder; got {type(bank).__name__}")
    return MemoryStore(engine, bank)


def split_engine_options(kwargs: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(engine options, the rest) of a keyword-argument dict."""
    engine = {k: v for k, v in kwargs.items() if k in ENGINE_OPTIONS}
    rest = {k: v for k, v in kwargs.items() if k not in ENGINE_OPTIONS}
    return engine, rest


def as_memory_store(obj: Any) -> MemoryStore:
    """The MemoryStore behind a MemoryStore, an MSAVectorStore or an MSARetriever."""
    if isinstance(obj, MemoryStore):
        return obj
    inner = getattr(obj, "store", None)
    if isinstance(inner, MemoryStore):
        return inner
    raise TypeError(f"expected a MemoryStore, MSAVectorStore or MSARetriever, got {type(obj).__name__}; "
                    "build one with MSAVectorStore.from_texts(texts) or MemoryStore()")


def store_lock(store: MemoryStore) -> AbstractContextManager[Any]:
    """The store's lock: hold it to read the bank and route against the same bank version."""
    return store.locked()


async def run_on_worker(store: MemoryStore, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Run fn on the store's worker thread, so the event loop never waits on the model or the lock."""
    return await store.run_async(fn, *args, **kwargs)
