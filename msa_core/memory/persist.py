"""A bank on disk: versioned folders, atomic switch, checksums; no pickle.

    path/CURRENT                     names the live version folder, e.g. "v000003"
    path/v000003/manifest.json       format, model fingerprints, config, counts, file checksums
    path/v000003/docstore.json       one record per part row
    path/v000003/tensors.safetensors k_bar, v_bar, kr_bar
    path/v000003/lexical.json        the BM25 index of the parts' text (lexical.py; absent in older banks)

A save writes a new version into a `.tmp-*` folder, renames it into place and then rewrites CURRENT
(write + fsync + rename), so a crash leaves the state before or after. Reading verifies checksums, JSON,
shapes and counts before anything is used. Knows `PartRecord`/`BankState`, never `MemoryBank`: the bank
passes what these functions need (anything with `layers`, `kv_heads`, `head_dim`, `storage_dtype`,
`device` and `info()`).
"""

from __future__ import annotations

import errno
import hashlib
import json
import mmap
import os
import re
import shutil
import uuid
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol, TypeVar

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ..errors import BankError, CorruptBankError, InvalidInputError
from ..safefiles import check_inside, check_safetensors_file, read_safetensors_header
from .locking import LOCK_NAME, bank_lock
from .records import KV_NAMES, TENSOR_NAMES, BankState, PartRecord, check_parts, is_int

T = TypeVar("T")


class BankShape(Protocol):
    """What reading tensors needs to know of the bank they belong to."""

    layers: list[int]
    kv_heads: int
    head_dim: int
    storage_dtype: torch.dtype
    device: torch.device

    def info(self) -> dict[str, Any]: ...


def read_version(root: Path, *, verify: bool = True) -> tuple[Path, dict[str, Any], tuple[PartRecord, ...]]:
    """(live version folder, manifest, docstore records) of the bank under `root`; verify=True checks both
    files' sha256 against the manifest first (streaming: memory stays small)."""
    vdir = live_version(root)
    for name in (MANIFEST, DOCSTORE, TENSORS):
        _check_own(root, vdir / name)
    manifest = read_manifest(vdir / MANIFEST)
    if verify:
        for name in (DOCSTORE, TENSORS):
            verify_file(vdir / name, manifest)
    return vdir, manifest, read_docstore(vdir / DOCSTORE)


def save_version(root: Path, state: BankState, manifest: dict[str, Any],
                 extra: dict[str, bytes] | None = None) -> Path:
    """Write `state` as a new version under `root` and switch CURRENT to it; returns the version folder.
    `extra`: more files of the version (name -> bytes, e.g. the lexical index), checksummed like the others.

    Holds the bank's inter-process write lock (locking.py) from picking the version name to cleaning up.
    A failed write (a full disk, an I/O error) removes what it wrote and leaves the previous version live.
    """
    prepare_root(root)
    with bank_lock(root):
        tmp = root / f".tmp-{uuid.uuid4().hex}"
        final: Path | None = None
        try:
            tmp.mkdir()
            write_version(tmp, state, manifest, extra)
            final = root / next_version(root)
            os.rename(tmp, final)
            fsync_dir(root)
            write_current(root, final.name)
        except BaseException as exc:
            _undo_save(root, tmp, final)
            if isinstance(exc, OSError):
                raise BankError(save_failure(root, state, exc)) from exc
            raise
        remove_stale(root, keep=final.name)
        return final


def _undo_save(root: Path, tmp: Path, final: Path | None) -> None:
    """Remove what a failed save wrote, unless CURRENT already names it (then it is the live version)."""
    shutil.rmtree(tmp, ignore_errors=True)
    (root / (CURRENT + ".tmp")).unlink(missing_ok=True)
    if final is not None and current_name(root) != final.name:
        shutil.rmtree(final, ignore_errors=True)


def current_name(root: Path) -> str | None:
    """The live version's folder name, or None when `root` holds no readable CURRENT."""
    try:
        return _read_current_name(root / CURRENT)
    except BankError:
        return None


def retry_on_switch(root: Path, load: Callable[[], T], attempts: int = 5) -> T:
    """`load()`, run again when it failed because a writer switched CURRENT meanwhile and removed the
    version being read. A failure while CURRENT stayed put is the bank's own and is raised as it is."""
    for attempt in range(attempts):
        before = current_name(root)
        try:
            return load()
        except (BankError, OSError):  # OSError: a file vanished between two reads of it
            if attempt == attempts - 1 or current_name(root) == before:
                raise
    raise AssertionError("unreachable")


def save_failure(root: Path, state: BankState, exc: OSError) -> str:
    """The message of a save that failed with `exc`: the folder, the cause and the space a version needs."""
    needed = sum(getattr(state, n).numel() * getattr(state, n).element_size() for n in TENSOR_NAMES)
    needed += sum(len(p.text.encode("utf-8")) + 256 for p in state.parts)  # docstore, roughly
    try:
        free = f"{shutil.disk_usage(root).free / 1e6:,.1f} MB are free there"
    except OSError:
        free = "the free space could not be read"
    cause = errno.errorcode.get(exc.errno or 0, "error")
    advice = ("free some space (or pick another folder) and save again" if exc.errno in (errno.ENOSPC, errno.EDQUOT)
              else "check the disk and save again")
    return (f"could not save the memory bank to {root}: {cause}: {exc.strerror or exc}. A new version needs "
            f"about {needed / 1e6:,.1f} MB; {free}. The previous version is intact and nothing of the failed "
            f"save was left behind; {advice}")

FORMAT = "msa-memory-bank"


FORMAT_VERSION = 1


MANIFEST, DOCSTORE, TENSORS, CURRENT = "manifest.json", "docstore.json", "tensors.safetensors", "CURRENT"


_SAFETENSORS_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


_VERSION_RE = re.compile(r"^v(\d{6,})$")


TMP_RE = re.compile(r"^\.tmp-[0-9a-f]{32}$")


_HASH_BLOCK = 1 << 20


MAX_MANIFEST_BYTES = 16 << 20  # a real one is a few KB; more is not a manifest we wrote


def prepare_root(root: Path) -> None:
    """Create `root`, or make sure it is ours: never write into (or clean) a user's folder."""
    if root.exists() and not root.is_dir():
        raise BankError(f"cannot save a memory bank to {root}: it exists and is not a directory")
    if not root.exists():
        try:
            root.mkdir(parents=True, exist_ok=True)  # another writer may create it at the same time
        except OSError as exc:
            raise BankError(f"cannot create the memory bank folder {root}: {exc}") from exc
        return
    current = root / CURRENT
    if current.exists():
        _read_current_name(current)  # raises if CURRENT is not ours
        return
    foreign = sorted(e.name for e in root.iterdir() if not _is_ours(e))
    if foreign:
        raise BankError(
            f"cannot save a memory bank to {root}: the folder is not empty and is not an msa bank "
            f"(no {CURRENT} file; it holds {foreign[:5]}). Nothing was changed; pick an empty or new folder."
        )


def _is_ours(entry: Path) -> bool:
    """Leftovers of our own saves (e.g. a first save that was interrupted)."""
    if entry.name in (CURRENT + ".tmp", LOCK_NAME):
        return entry.is_file()
    if TMP_RE.match(entry.name):
        return entry.is_dir()
    return _is_version_dir(entry)


def _is_version_dir(entry: Path) -> bool:
    # A version folder always holds a manifest (it is written before the rename into place).
    return bool(_VERSION_RE.match(entry.name)) and (entry / MANIFEST).is_file()


def next_version(root: Path) -> str:
    numbers = [int(m.group(1)) for e in root.iterdir() if (m := _VERSION_RE.match(e.name))]
    return f"v{max(numbers, default=0) + 1:06d}"


def write_version(vdir: Path, state: BankState, manifest: dict[str, Any],
                  extra: dict[str, bytes] | None = None) -> None:
    tensors = {n: getattr(state, n).detach().cpu().contiguous() for n in TENSOR_NAMES}
    save_file(tensors, str(vdir / TENSORS), metadata={"format": "pt"})
    _fsync_file(vdir / TENSORS)
    docstore = {"parts": [p.to_dict() for p in state.parts]}
    _write_bytes(vdir / DOCSTORE, json.dumps(docstore, ensure_ascii=False).encode("utf-8"))
    for name, data in (extra or {}).items():
        _write_bytes(vdir / name, data)
    names = (DOCSTORE, TENSORS, *(extra or {}))
    manifest = {**manifest, "files": {name: _file_digest(vdir / name) for name in names}}
    # The manifest goes last: a version folder that has one is complete.
    _write_bytes(vdir / MANIFEST, json.dumps(manifest, indent=2).encode("utf-8"))
    fsync_dir(vdir)


def write_current(root: Path, version: str) -> None:
    tmp = root / (CURRENT + ".tmp")
    _write_bytes(tmp, (version + "\n").encode("ascii"))
    os.replace(tmp, root / CURRENT)
    fsync_dir(root)


def _write_bytes(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _fsync_file(path: Path) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # some platforms (Windows) cannot open a directory; rename is then the best we have
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def remove_stale(root: Path, keep: str) -> None:
    """Remove older versions and leftovers of interrupted saves; only entries we recognise as ours."""
    for entry in list(root.iterdir()):  # listed first: the loop renames entries
        if entry.name in (keep, LOCK_NAME) or not _is_ours(entry):  # the lock file stays: others may hold it
            continue
        # Best effort: the new version is already live, a leftover only costs disk space.
        if entry.is_dir():
            # Renamed to a .tmp- name first: a crash midway through rmtree (manifest already gone)
            # then leaves a folder the next save still recognises as ours and removes.
            doomed = entry if TMP_RE.match(entry.name) else root / f".tmp-{uuid.uuid4().hex}"
            try:
                os.replace(entry, doomed)
            except OSError:
                doomed = entry
            shutil.rmtree(doomed, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)


def _file_digest(path: Path) -> dict[str, Any]:
    sha = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(_HASH_BLOCK):
            sha.update(block)
    return {"sha256": sha.hexdigest(), "size": path.stat().st_size}


def live_version(root: Path) -> Path:
    if not root.is_dir():
        raise BankError(f"not an msa bank: {root} does not exist or is not a directory")
    current = root / CURRENT
    if not current.is_file():
        versions = sorted(e.name for e in root.iterdir() if _is_version_dir(e))
        if versions:
            raise BankError(
                f"half-written msa bank at {root}: no {CURRENT} file, though version folders {versions} exist; "
                f"save the bank again, or write the name of a complete version into {current}"
            )
        raise BankError(f"not an msa bank: {root} has no {CURRENT} file")
    _check_own(root, current)
    vdir = root / _read_current_name(current)
    _check_own(root, vdir)
    if not vdir.is_dir():
        raise BankError(f"half-written msa bank: {current} names {vdir.name}, but {vdir} does not exist")
    return vdir


def _check_own(root: Path, path: Path) -> None:
    """Refuse files of a bank that are links or lie outside its folder (a bank from someone else)."""
    try:
        check_inside(root, path)
    except ValueError as exc:
        raise CorruptBankError(f"untrusted msa bank: {exc}; refusing to read it") from exc


def _read_current_name(current: Path) -> str:
    try:
        name = current.read_text(encoding="ascii").strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise BankError(f"not an msa bank: {current} is unreadable ({exc})") from exc
    if not _VERSION_RE.match(name):
        raise BankError(f"not an msa bank (or half-written): {current} holds {name[:40]!r}, not a version name")
    return name


def _read_json(path: Path, limit: int | None = None) -> Any:
    try:
        if limit is not None and path.stat().st_size > limit:
            raise CorruptBankError(f"corrupt msa bank: {path} has {path.stat().st_size:,} bytes, more than the "
                                   f"{limit:,} a manifest may have")
        return json.loads(path.read_bytes().decode("utf-8"))
    except FileNotFoundError as exc:
        raise CorruptBankError(f"corrupt msa bank: {path} is missing") from exc
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise CorruptBankError(f"corrupt msa bank: {path} is not valid JSON ({exc})") from exc


def read_manifest(path: Path) -> dict[str, Any]:
    manifest = _read_json(path, MAX_MANIFEST_BYTES)
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise BankError(f"not an msa bank: {path} does not declare format {FORMAT!r}")
    version = manifest.get("format_version")
    if not is_int(version) or version < 1:
        raise CorruptBankError(f"corrupt msa bank: {path} has format_version {version!r}")
    if version > FORMAT_VERSION:
        raise BankError(
            f"{path} is format_version {version}, newer than this msa reads ({FORMAT_VERSION}); upgrade msa"
        )
    return manifest


def verify_file(path: Path, manifest: dict[str, Any]) -> None:
    expected = manifest.get("files", {}).get(path.name) if isinstance(manifest.get("files"), dict) else None
    if not isinstance(expected, dict) or "sha256" not in expected or "size" not in expected:
        raise CorruptBankError(f"corrupt msa bank: {path.parent / MANIFEST} lacks the checksum of {path.name}")
    if not path.is_file():
        raise CorruptBankError(f"corrupt msa bank: {path} is missing")
    size = path.stat().st_size
    if size != expected["size"]:
        raise CorruptBankError(f"corrupt msa bank: {path} has {size} bytes, the manifest says {expected['size']}")
    if _file_digest(path)["sha256"] != expected["sha256"]:
        raise CorruptBankError(f"corrupt msa bank: {path} does not match its sha256 in the manifest")


def read_docstore(path: Path) -> tuple[PartRecord, ...]:
    data = _read_json(path)
    rows = data.get("parts") if isinstance(data, dict) else None
    if not isinstance(rows, list):
        raise CorruptBankError(f"corrupt msa bank: {path} has no 'parts' list")
    try:
        parts = tuple(PartRecord(**row) for row in rows)
        check_parts(parts)
    except (TypeError, InvalidInputError) as exc:
        raise CorruptBankError(f"corrupt msa bank: {path} holds a bad record: {exc}") from exc
    return parts


def read_tensors(path: Path, bank: BankShape, parts: Sequence[PartRecord]) -> dict[str, torch.Tensor]:
    try:
        check_safetensors_file(path)
        loaded = load_file(str(path), device=str(bank.device))
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise CorruptBankError(f"corrupt msa bank: {path} is unreadable ({exc})") from exc
    return _check_tensors(loaded, path, bank, parts)


def map_tensors(path: Path, bank: BankShape, parts: Sequence[PartRecord], *,
                 scattered_kv: bool) -> dict[str, torch.Tensor]:
    """The bank's tensors as views of one read-only memory map of the safetensors file.

    Nothing is read up front: a page comes from disk when first touched, and the page cache may drop it
    again, so banks larger than RAM work. ACCESS_READ (PROT_READ, MAP_SHARED): clean page cache, charged
    to no process's data limit (RLIMIT_DATA) nor to the overcommit reserve, however large the file; the
    file is never changed (a write into these views is refused by the MMU: the disk tier is read-only).
    Layout: u64 LE header size, JSON header, data.
    `scattered_kv` advises the kernel that k_bar/v_bar will be read in scattered rows (see _advise_random).
    """
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            n_head, header = read_safetensors_header(f, size)
            mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    except (OSError, ValueError) as exc:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise CorruptBankError(f"corrupt msa bank: {path} is unreadable ({exc})") from exc
    with warnings.catch_warnings():  # "the given buffer is not writable": on purpose, see above
        warnings.simplefilter("ignore", UserWarning)
        data = torch.frombuffer(mm, dtype=torch.uint8)  # holds a reference to mm: the map lives as long as views do
    mapped = {}
    for name in TENSOR_NAMES:
        if name in header:
            view = mapped[name] = _mapped_view(data, 8 + n_head, header[name], path, name)
            if scattered_kv and name in KV_NAMES:
                _advise_random(mm, view.storage_offset() * view.element_size(), view.nbytes)
    return _check_tensors(mapped, path, bank, parts)


def _advise_random(mm: mmap.mmap, offset: int, length: int) -> None:
    """Turn off read-ahead for a byte range that is read in scattered rows.

    By default a page fault also reads the pages around it: gathering 100 random 1 KiB chunks of a
    100 MB layer read 111 MB from disk, with MADV_RANDOM under 1 MB (2,000 chunks: 9 MB).
    """
    if length and hasattr(mmap, "MADV_RANDOM"):  # not on Windows; read-ahead then stays on
        lo = offset - offset % mmap.PAGESIZE
        mm.madvise(mmap.MADV_RANDOM, lo, offset + length - lo)


def _mapped_view(data: torch.Tensor, start: int, entry: Any, path: Path, name: str) -> torch.Tensor:
    try:
        dtype = _SAFETENSORS_DTYPES[entry["dtype"]]
        shape = [int(d) for d in entry["shape"]]
        begin, end = (int(x) for x in entry["data_offsets"])
    except (KeyError, TypeError, ValueError) as exc:
        raise CorruptBankError(f"corrupt msa bank: {path} describes {name} badly ({entry!r})") from exc
    nbytes = dtype.itemsize * torch.Size(shape).numel()
    if min(shape, default=0) < 0 or begin < 0 or end - begin != nbytes or start + end > data.numel():
        raise CorruptBankError(f"corrupt msa bank: {path} places {name} at bytes {begin}..{end}, which does not "
                               f"fit {shape} {dtype} in a file of {data.numel()} bytes")
    if (start + begin) % dtype.itemsize:
        # safetensors aligns its data; a file that does not cannot be viewed in place.
        raise CorruptBankError(f"corrupt msa bank: {path} stores {name} unaligned; load it with kv='same'")
    return data[start + begin:start + end].view(dtype).view(shape)


def _check_tensors(loaded: dict[str, torch.Tensor], path: Path, bank: BankShape,
                   parts: Sequence[PartRecord]) -> dict[str, torch.Tensor]:
    expected = (len(bank.layers), sum(p.n_chunks for p in parts), bank.kv_heads, bank.head_dim)
    for name in TENSOR_NAMES:
        t = loaded.get(name)
        if t is None:
            raise CorruptBankError(f"corrupt msa bank: {path} lacks the tensor {name!r}")
        if tuple(t.shape) != expected or t.dtype != bank.storage_dtype:
            raise CorruptBankError(
                f"corrupt msa bank: {path} has {name} {tuple(t.shape)} {t.dtype}, the docstore and manifest "
                f"imply {expected} {bank.storage_dtype}"
            )
    return {n: loaded[n] for n in TENSOR_NAMES}


def check_counts(bank: BankShape, manifest: dict[str, Any], path: Path) -> None:
    info = bank.info()
    counts = manifest.get("counts")
    actual = {k: info[k] for k in ("documents", "parts", "chunks", "tokens")}
    if counts != actual:
        raise CorruptBankError(f"corrupt msa bank: {path} counts {counts} differ from the files' {actual}")
