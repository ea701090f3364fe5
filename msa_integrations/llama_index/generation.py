"""Generation settings shared by MSALLM and MSAQueryEngine, and chat message conversion."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from llama_index.core.base.llms.types import ChatMessage, MessageRole

from msa_core.errors import InvalidInputError

# Per-call overrides accepted by complete/chat (and their stream/async twins).
GENERATION_KEYS = ("k", "max_new_tokens", "temperature", "top_p", "seed", "stop", "fusion", "alpha")

_ROLES = {
    MessageRole.SYSTEM: "system", MessageRole.DEVELOPER: "system", MessageRole.USER: "user",
    MessageRole.ASSISTANT: "assistant", MessageRole.CHATBOT: "assistant", MessageRole.MODEL: "assistant",
}


def answer_kwargs(settings: Any, msa_filter: Any, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """Keyword arguments of a latent MemoryStore.answer: `settings`' fields, updated per call."""
    overrides = overrides or {}
    unknown = sorted(set(overrides) - set(GENERATION_KEYS))
    if unknown:
        raise TypeError(f"unexpected keyword arguments {unknown}; msa generation takes {list(GENERATION_KEYS)}")
    kw = {key: getattr(settings, key) for key in GENERATION_KEYS}
    kw["stop"] = list(kw["stop"] or [])
    return {**kw, **overrides, "mode": "latent", "filter": msa_filter}


def to_msa_messages(messages: Sequence[ChatMessage], system_prompt: str | None = None) -> list[dict[str, str]]:
    """LlamaIndex chat messages as msa's {role, content} dicts; the last user message routes."""
    out = []
    for i, m in enumerate(messages):
        role = _ROLES.get(m.role)
        if role is None:
            raise InvalidInputError(f"message {i} has role {m.role.value!r}, which the chat template cannot "
                                    f"render; use one of system, user, assistant")
        out.append({"role": role, "content": m.content or ""})
    if system_prompt and not any(m["role"] == "system" for m in out):
        out.insert(0, {"role": "system", "content": system_prompt})
    if not any(m["role"] == "user" for m in out):
        raise InvalidInputError("the chat has no user message; MSA routes on the last user message")
    return out
