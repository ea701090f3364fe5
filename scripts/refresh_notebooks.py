"""Execute the notebooks in place and save their outputs (what tests/test_notebooks.py checks).

    .venv/bin/python scripts/refresh_notebooks.py [quickstart] [ab_comparison]

Run it after a change that moves what the notebooks show (a new router, a new report layout).
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import nbclient
import nbformat

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"


def refresh(name: str) -> None:
    path = NOTEBOOKS / f"{name}.ipynb"
    nb = nbformat.read(path, as_version=4)
    started = time.perf_counter()
    nbclient.NotebookClient(nb, timeout=1800, kernel_name="python3",
                            resources={"metadata": {"path": str(NOTEBOOKS)}}).execute()
    nbformat.write(nb, path)
    print(f"{path.name}: executed and saved in {time.perf_counter() - started:.0f} s", file=sys.stderr)


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.pop("MSA_AB_LIMIT", None)  # the stored outputs are the default subset's, as CI runs it
    # The exact fp32 path, as the tests run them (tests/conftest.py): bf16 exists only on some CPUs and can swap
    # near-tied documents (router v14's fifth document for the quickstart question), fp32 is the same everywhere.
    os.environ["MSA_CPU_DTYPE"] = "float32"
    for name in sys.argv[1:] or ["quickstart", "ab_comparison"]:
        refresh(name)
