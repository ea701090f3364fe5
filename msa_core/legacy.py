"""Old module paths of msa 0.3 (`msa_core.router`, `msa_core.generate`, ...), importable for one more
release with a DeprecationWarning. Each old module is a thin view over the modules its code moved to.
Nothing in msa_core imports these paths; `msa_core/__init__.py` installs the finder.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import warnings
from types import ModuleType
from typing import Any

REMOVED_IN = "0.5"
MOVED: dict[str, tuple[str, ...]] = {
    "msa_core.router": ("msa_core.routing.projectors", "msa_core.routing.scores"),
    "msa_core.mmr": ("msa_core.routing.mmr",),
    "msa_core.backbone": ("msa_core.decoder.backbone",),
    "msa_core.rope": ("msa_core.decoder.rope",),
    "msa_core.lora": ("msa_core.decoder.lora",),
    "msa_core.encoded": ("msa_core.memory.encoded",),
    "msa_core.filters": ("msa_core.memory.filters",),
    "msa_core.corpus": ("msa_core.memory.corpus",),
    "msa_core.generate": ("msa_core.inference.generate",),
    "msa_core.encode": ("msa_core.inference.encode",),
    "msa_core.interleave": ("msa_core.inference.interleave",),
    "msa_core.reference": ("msa_core.inference.reference",),
    "msa_core.debug": ("msa_core.inference.debug",),
    "msa_core.msa_format": ("msa_core.checkpoints.msa_format",),
    "msa_core.defaults": ("msa_core.checkpoints.defaults",),
    "msa_core.train": ("msa_core.training.trainer",),
    "msa_core.train_tuned": ("msa_core.training.tuned",),
    "msa_core.train_cache": ("msa_core.training.cache",),
    "msa_core.train_data": ("msa_core.training.data",),
    "msa_core.train_precondition": ("msa_core.training.precondition",),
}


class _Finder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, name: str, path: Any = None, target: Any = None) -> importlib.machinery.ModuleSpec | None:
        return importlib.util.spec_from_loader(name, self) if name in MOVED else None

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType:
        targets = MOVED[spec.name]
        warnings.warn(f"{spec.name} moved to {' and '.join(targets)}; the old path goes away in msa {REMOVED_IN}",
                      DeprecationWarning, stacklevel=3)
        module = ModuleType(spec.name, f"Deprecated alias of {', '.join(targets)}.")
        for target in reversed(targets):  # the first target wins where names clash
            module.__dict__.update({k: v for k, v in vars(importlib.import_module(target)).items()
                                    if not k.startswith("__")})
        return module

    def exec_module(self, module: ModuleType) -> None:
        pass


def install() -> None:
    if not any(isinstance(f, _Finder) for f in sys.meta_path):
        sys.meta_path.append(_Finder())
