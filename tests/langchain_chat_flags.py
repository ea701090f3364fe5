"""The feature flags ChatMSA answers to langchain-tests' chat-model suites, shared by the unit suite
(tests/integrations/test_langchain_adapters.py) and the integration suite (test_langchain_standard.py)."""

from __future__ import annotations

from msa_integrations.langchain import ChatMSA


class ChatMSASuiteFlags:
    """Mix in before the suite class: ChatMSA, no tool calling or structured output, usage metadata."""

    @property
    def chat_model_class(self) -> type[ChatMSA]:
        return ChatMSA

    @property
    def has_tool_calling(self) -> bool:
        return False

    @property
    def has_structured_output(self) -> bool:
        return False

    @property
    def returns_usage_metadata(self) -> bool:
        return True

    @property
    def supports_model_override(self) -> bool:
        return False  # one ChatMSA runs one loaded model; pick another by building another ChatMSA
