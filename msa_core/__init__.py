"""msa: Memory Sparse Attention retrieval and generation over Hugging Face decoders."""

from . import legacy
from .config import EncodeConfig, MSAConfig, RoutingConfig
from .errors import BankError, BankMismatchError, CorruptBankError, InvalidInputError, ModelLoadError, MSAError
from .memory.bank import MemoryBank
from .model import Answer, AnswerStream, MSAModel, RetrievedDocument
from .routing.projectors import RouterProjectors

__version__ = "0.3.0"

legacy.install()  # msa 0.3 module paths (msa_core.router, ...) for one more release

__all__ = [
    "Answer", "AnswerStream", "BankError", "BankMismatchError", "CorruptBankError", "EncodeConfig",
    "InvalidInputError", "MemoryBank", "ModelLoadError", "MSAConfig", "MSAError", "MSAModel",
    "RetrievedDocument", "RouterProjectors", "RoutingConfig", "__version__",
]
