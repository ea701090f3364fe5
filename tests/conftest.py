from __future__ import annotations

import os
import sys

# Triton decides at import whether kernels (and its own standard library) run under its CPU
# interpreter, and libraries collected before tests/test_kernels.py may import it: on machines
# without an NVIDIA GPU, ask for the interpreter before anything else is imported.
if not os.path.exists("/dev/nvidiactl"):
    os.environ.setdefault("TRITON_INTERPRET", "1")
# Unit tests compare against fp32 references: they run the exact fp32 CPU path unless a test asks for
# another dtype (tests/decoder/test_cpu_precision.py covers the bf16 default of CPUs with native bf16).
os.environ.setdefault("MSA_CPU_DTYPE", "float32")
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from tiny import save_tiny_model  # noqa: E402

FAMILIES = ("llama", "qwen2", "qwen3")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "integration: uses the real embedded default model (slow)")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory):
    """Factory: tiny_model_dir(family, **kw) -> folder with a random checkpoint and tokenizer."""
    made: dict[tuple, Path] = {}

    def make(family: str = "llama", **kw) -> Path:
        key = (family, repr(sorted(kw.items())))
        if key not in made:
            made[key] = save_tiny_model(tmp_path_factory.mktemp(f"tiny-{family}"), family, **kw)
        return made[key]

    return make


@pytest.fixture(scope="session")
def tiny_msa_dir(tmp_path_factory: pytest.TempPathFactory):
    """Factory: tiny_msa_dir(decouple=True, aux="INFONCE_DECOUPLE", layers="2,3", ...) -> folder with a
    random MSA-format checkpoint (see tests/msa_tiny.py)."""
    from msa_tiny import save_tiny_msa_model

    made: dict[str, Path] = {}

    def make(**kw) -> Path:
        key = repr(sorted(kw.items()))
        if key not in made:
            made[key] = save_tiny_msa_model(tmp_path_factory.mktemp("tiny-msa"), **kw)
        return made[key]

    return make


@pytest.fixture(scope="module")
def ctx():
    """A forkserver multiprocessing context for tests that run (and kill) bank writers in child processes.
    The forkserver imports torch and msa once; each child is a fork of it. (Not a tests/ helper module:
    Python 3.11's forkserver does not see tests/ on sys.path and would skip it silently.)"""
    import multiprocessing

    if "forkserver" not in multiprocessing.get_all_start_methods():
        pytest.skip("needs the forkserver start method (POSIX)")
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["msa_core.memory"])
    return context
