"""Reading document corpora from disk, for the CLI and the examples.

Two formats:

* a `.jsonl` file: one JSON object per line with `text` (required), `id`, `title` and `metadata`
  (a dict). Blank lines are skipped. A missing `id` becomes `"line-N"` (N = the 1-based line
  number), so a record can always be traced back to its line; integer ids become strings. Other
  top-level keys are kept in `metadata` rather than dropped.
* a folder: every `.txt`/`.md` file below it (recursively, sorted, hidden files and folders
  skipped); id = path relative to the folder with '/' separators, title = file stem,
  metadata = {"source": relative path}.

Everything is validated before anything is returned: a bad line raises InvalidInputError naming
the file and line, and no partial corpus comes back. Files must be UTF-8 (a BOM is accepted);
Windows newlines are accepted.
"""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import InvalidInputError

__all__ = ["DEMO_CORPUS_PATH", "DEMO_QUESTIONS_PATH", "CorpusRecord", "read_corpus"]

# A small invented corpus (the island town of Velmora) whose facts no model knows, and questions
# with one gold document each: for examples, the CLI's demo and integration tests.
DEMO_CORPUS_PATH = Path(__file__).parents[1] / "data" / "demo_corpus.jsonl"
DEMO_QUESTIONS_PATH = Path(__file__).parents[1] / "data" / "demo_questions.json"

_TEXT_SUFFIXES = (".txt", ".md")
_KNOWN_KEYS = {"id", "text", "title", "metadata"}
_BOM = b"\xef\xbb\xbf"


@dataclass
class CorpusRecord:
    """One document as read from disk."""

    id: str
    text: str
    title: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict)


def read_corpus(path: str | os.PathLike[str], *, follow_symlinks: bool = False) -> list[CorpusRecord]:
    """Read a `.jsonl` corpus file or a folder of `.txt`/`.md` files (see the module docstring).

    In a folder, symbolic links that lead outside it are skipped with a warning unless `follow_symlinks`.
    """
    source = Path(path).expanduser()
    if not source.exists():
        raise InvalidInputError(f"corpus {source} does not exist")
    if source.is_dir():
        records = _read_folder(source, follow_symlinks)
    elif source.is_file() and source.suffix.lower() == ".jsonl":
        records = _read_jsonl(source)
    else:
        raise InvalidInputError(
            f"corpus {source} must be a .jsonl file (one JSON object per line) or a folder of .txt/.md files"
        )
    if not records:
        raise InvalidInputError(f"corpus {source} has no documents")
    return records


# --- JSONL -------------------------------------------------------------------------------------


def _read_jsonl(path: Path) -> list[CorpusRecord]:
    data = path.read_bytes()
    if data.startswith(_BOM):
        data = data[len(_BOM) :]
    records: list[CorpusRecord] = []
    first_line_of: dict[str, int] = {}
    # Split on b"\n" only: JSON strings may hold U+2028 and friends, which str.splitlines would cut.
    for number, raw in enumerate(data.split(b"\n"), start=1):
        line = _decode_line(raw, path, number).strip()  # strip() also drops the '\r' of CRLF files
        if not line:
            continue
        record = _parse_record(line, f"{path} line {number}", default_id=f"line-{number}")
        if record.id in first_line_of:
            raise InvalidInputError(
                f"{path} line {number}: duplicate id {record.id!r} (first used on line "
                f"{first_line_of[record.id]}); ids must be unique"
            )
        first_line_of[record.id] = number
        records.append(record)
    return records


def _decode_line(raw: bytes, path: Path, number: int) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise _not_utf8(path, number, raw[exc.start : exc.start + 1]) from exc


def _not_utf8(path: Path, line: int, bad: bytes) -> InvalidInputError:
    return InvalidInputError(
        f"{path} line {line}: not valid UTF-8 (byte 0x{bad.hex()}); re-encode the file as UTF-8, "
        f"e.g. iconv -f latin1 -t utf-8 {path.name} > fixed{path.suffix}"
    )


def _parse_record(line: str, where: str, *, default_id: str) -> CorpusRecord:
    try:
        obj = json.loads(line, parse_constant=_no_constant)
    except json.JSONDecodeError as exc:
        raise InvalidInputError(f"{where}: invalid JSON: {exc.msg} (column {exc.colno})") from exc
    except RecursionError as exc:
        raise InvalidInputError(f"{where}: invalid JSON: nested too deeply") from exc
    except ValueError as exc:  # NaN/Infinity, or an integer of more than 4300 digits
        raise InvalidInputError(f"{where}: invalid JSON: {exc}") from exc
    if not isinstance(obj, dict):
        raise InvalidInputError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    _check_no_surrogates(obj, where)
    return CorpusRecord(
        id=_record_id(obj.get("id"), where, default_id),
        text=_record_text(obj, where),
        title=_record_title(obj.get("title"), where),
        metadata=_record_metadata(obj, where),
    )


def _no_constant(name: str) -> Any:
    # Python's json reads NaN and Infinity, which are not JSON; the bank would refuse them only
    # after the whole corpus was encoded.
    raise ValueError(f"{name} is not a JSON value; use null or a number")


def _check_no_surrogates(obj: dict[str, Any], where: str) -> None:
    # An escape such as \ud800 decodes to a lone surrogate: not text, and not storable as UTF-8.
    try:
        json.dumps(obj, ensure_ascii=False).encode("utf-8")
    except RecursionError as exc:
        raise InvalidInputError(f"{where}: invalid JSON: nested too deeply") from exc
    except UnicodeEncodeError as exc:
        raise InvalidInputError(
            f"{where}: holds an escaped lone surrogate ({exc.object[exc.start]!r}), which is not text; "
            f"fix the file's encoding"
        ) from exc


def _record_id(value: Any, where: str, default_id: str) -> str:
    if value is None:
        return default_id
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    if isinstance(value, str) and value.strip():
        return value
    raise InvalidInputError(f"{where}: 'id' must be a non-empty string or an integer, got {value!r}")


def _record_text(obj: dict[str, Any], where: str) -> str:
    if "text" not in obj:
        raise InvalidInputError(f"{where}: missing 'text'; every record needs a non-empty string 'text'")
    text = obj["text"]
    if not isinstance(text, str):
        raise InvalidInputError(f"{where}: 'text' must be a string, got {type(text).__name__}")
    if not text.strip():
        raise InvalidInputError(f"{where}: 'text' is empty")
    return text


def _record_title(value: Any, where: str) -> str | None:
    if value is None or isinstance(value, str):
        return value or None  # an empty title is no title
    raise InvalidInputError(f"{where}: 'title' must be a string, got {type(value).__name__}")


def _record_metadata(obj: dict[str, Any], where: str) -> dict[str, Any]:
    metadata = obj.get("metadata", {})
    if metadata is None:
        metadata = {}
    if not isinstance(metadata, dict):
        raise InvalidInputError(f"{where}: 'metadata' must be a JSON object, got {type(metadata).__name__}")
    merged = dict(metadata)
    # Extra top-level keys (e.g. "source", "url") are kept rather than silently dropped.
    for key, value in obj.items():
        if key in _KNOWN_KEYS:
            continue
        if key in merged:
            raise InvalidInputError(
                f"{where}: key {key!r} is both a top-level field and in 'metadata'; keep one of them"
            )
        merged[key] = value
    return merged


# --- folder of text files ----------------------------------------------------------------------


def _read_folder(root: Path, follow_symlinks: bool = False) -> list[CorpusRecord]:
    files = _text_files(root, follow_symlinks)
    if not files:
        raise InvalidInputError(f"corpus folder {root} has no .txt or .md files")
    return [_read_text_file(root, file) for file in files]


def _text_files(root: Path, follow_symlinks: bool = False) -> list[Path]:
    """The .txt/.md files below `root`, hidden ones skipped. Linked folders are entered only when
    `follow_symlinks` (each real folder once: no loops); linked files only when they stay inside `root`."""
    found, outside = [], []
    real_root = Path(os.path.realpath(root))
    seen = {real_root}
    for folder, dirs, files in os.walk(root, followlinks=follow_symlinks):
        here = Path(folder)
        keep = []
        for name in sorted(dirs):
            real = Path(os.path.realpath(here / name))
            if name.startswith(".") or real in seen:  # .git, .ipynb_checkpoints, ...; a folder seen before
                continue
            if (here / name).is_symlink() and not follow_symlinks:
                if not real.is_relative_to(real_root):
                    outside.append(here / name)
                continue
            seen.add(real)
            keep.append(name)
        dirs[:] = keep
        for name in files:
            file = here / name
            if name.startswith(".") or file.suffix.lower() not in _TEXT_SUFFIXES or not file.is_file():
                continue
            inside = not file.is_symlink() or Path(os.path.realpath(file)).is_relative_to(real_root)
            (found if inside or follow_symlinks else outside).append(file)
    if outside:
        warnings.warn(f"corpus folder {root}: skipped {len(outside)} symbolic link(s) leading outside it "
                      f"({', '.join(map(str, outside[:3]))}); pass --follow-symlinks (follow_symlinks=True) "
                      "to read them", stacklevel=3)
    return sorted(found, key=lambda f: f.relative_to(root).as_posix())


def _read_text_file(root: Path, file: Path) -> CorpusRecord:
    data = file.read_bytes()
    try:
        text = data.decode("utf-8-sig")  # -sig: a leading BOM is not part of the text
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise _not_utf8(file, line, data[exc.start : exc.start + 1]) from exc
    # Same text whatever editor wrote it, so ids and encodings do not depend on the platform.
    text = text.replace("\r\n", "\n").replace("\r", "\n").strip()
    if not text:
        raise InvalidInputError(f"{file}: file is empty; remove it or add text")
    relative = file.relative_to(root).as_posix()
    try:  # a name that is not UTF-8 decodes to lone surrogates: unusable as an id, unsaveable
        relative.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise InvalidInputError(f"{root}: the file name {relative!r} is not valid UTF-8; rename the file") from exc
    return CorpusRecord(id=relative, text=text, title=file.stem, metadata={"source": relative})
