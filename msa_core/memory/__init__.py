"""The memory bank: pooled K̄ / V̄ / K̄_R per routing layer, the chunk -> part map and the docstore
(bank.py, records.py), crash-safe versioned persistence (persist.py), metadata filters (filters.py),
encoded documents on their way in (encoded.py) and corpus files (corpus.py).

May import: the ground floor (`msa_core.errors`, `msa_core.config`). Never the decoder, routing or above:
a bank is data, whoever built it.
"""

from .bank import MemoryBank
from .encoded import EncodedDocuments
from .filters import Filter, compile_filter
from .records import PartRecord

__all__ = ["EncodedDocuments", "Filter", "MemoryBank", "PartRecord", "compile_filter"]
