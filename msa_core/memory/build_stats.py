"""How fast a bank was built: encoded tokens, encoding seconds and the backbone dtypes that encoded them.

Kept by `MemoryBank` across `add` calls, saved in its manifest (`build`) and shown by `bank.info()` and
`msa info`. Banks saved before this existed simply have no build record.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class BuildStats:
    tokens: int = 0  # tokens encoded into the bank (replaced documents included)
    seconds: float = 0.0  # time spent encoding them
    dtypes: list[str] = field(default_factory=list)  # backbone dtypes that encoded them, in order of first use

    def record(self, tokens: int, seconds: float, dtype: str) -> None:
        self.tokens += int(tokens)
        self.seconds += float(seconds)
        if dtype and dtype not in self.dtypes:
            self.dtypes.append(dtype)

    @property
    def tokens_per_s(self) -> float | None:
        return self.tokens / self.seconds if self.tokens and self.seconds > 0 else None

    def copy(self) -> BuildStats:
        return BuildStats(self.tokens, self.seconds, list(self.dtypes))

    def info(self) -> dict[str, Any]:
        """The entries of `bank.info()`: encoding tokens/s (None before any encoding) and the dtypes."""
        rate = self.tokens_per_s
        return {"encode_tokens_per_s": None if rate is None else round(rate, 1), "encode_dtypes": list(self.dtypes)}

    def to_dict(self) -> dict[str, Any]:
        return {"tokens": self.tokens, "seconds": self.seconds, "dtypes": list(self.dtypes)}

    @classmethod
    def from_dict(cls, d: Any) -> BuildStats:
        """From a manifest's `build` entry; anything unreadable gives an empty record (it is informational)."""
        if not isinstance(d, dict):
            return cls()
        try:
            dtypes = [str(x) for x in d.get("dtypes", [])]
            return cls(int(d.get("tokens", 0)), float(d.get("seconds", 0.0)), dtypes)
        except (TypeError, ValueError):
            return cls()
