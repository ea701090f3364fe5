"""Both notebooks execute end to end (nbclient, a fresh kernel each), as CI runs them.

Each takes about a minute on an idle 2-core CPU: the A/B notebook runs the first 10 hotpotqa100 questions
with their candidate pools (or a 16K-token NIAH set when ../shared/data is absent).
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"


def _run(name: str, monkeypatch) -> tuple[object, float]:
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("MSA_AB_LIMIT", raising=False)
    nb = nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)
    client = nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                                     resources={"metadata": {"path": str(NOTEBOOKS)}})
    started = time.perf_counter()
    client.execute()  # raises CellExecutionError, with the cell and its traceback, when a cell fails
    return nb, time.perf_counter() - started


def _text(nb) -> str:
    parts = []
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            parts.append(out.get("text", ""))
            parts.append(out.get("data", {}).get("text/plain", ""))
            parts.append(out.get("data", {}).get("text/markdown", ""))
    return "\n".join(parts)


def test_quickstart_notebook(monkeypatch):
    nb, seconds = _run("quickstart", monkeypatch)
    text = _text(nb)
    for expected in ("indexed 24 documents", "latent:", "hybrid:", "documents in the prompt:", "[MSA] sources:",
                     "[MSA] answer:", "documents reloaded"):
        assert expected in text, expected
    print(f"quickstart.ipynb ran in {seconds:.0f} s")


def test_ab_comparison_notebook(monkeypatch):
    nb, seconds = _run("ab_comparison", monkeypatch)
    text = _text(nb)
    assert "| **msa** |" in text and "| **minilm** |" in text and "| **bm25** |" in text
    assert "| **langchain-inmemory** |" in text and "*chance*" in text
    assert any(out.get("output_type") == "display_data" and "image/png" in out.get("data", {})
               for cell in nb.cells for out in cell.get("outputs", []))
    print(f"ab_comparison.ipynb ran in {seconds:.0f} s")
