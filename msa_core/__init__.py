"""msa: Memory Sparse Attention retrieval and generation over Hugging Face decoders."""

from .config import EncodeConfig, MSAConfig, RoutingConfig
from .errors import (BankError, BankMismatchError, CorruptBankError, InvalidInputError, ModelLoadError,
                     MSAError)
from .memory import MemoryBank
from .model import Answer, AnswerStream, MSAModel, RetrievedDocument
from .router import RouterProjectors

__version__ = "0.3.0"

__all__ = [
    "Answer", "AnswerStream", "BankError", "BankMismatchError", "CorruptBankError", "EncodeConfig",
    "InvalidInputError", "MemoryBank", "ModelLoadError", "MSAConfig", "MSAError", "MSAModel",
    "RetrievedDocument", "RouterProjectors", "RoutingConfig", "__version__",
]
