"""Reading files that may come from someone else: bounded safetensors headers, no paths out of a folder.

Ground floor (stdlib only). Raises ValueError with the reason; callers wrap it in their own error
(CorruptBankError for banks, ModelLoadError for router files) naming the file.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, BinaryIO

MAX_HEADER_BYTES = 100_000_000  # the limit of the safetensors library itself

_ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
             "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "U32": 4, "U64": 8}


def read_safetensors_header(f: BinaryIO, size: int) -> tuple[int, dict[str, Any]]:
    """(header length, header) of the safetensors file open as `f` (at offset 0), `size` bytes long.
    Never reads more than MAX_HEADER_BYTES, whatever the file claims."""
    raw = f.read(8)
    if len(raw) < 8:
        raise ValueError(f"{size} bytes is too short for a safetensors file")
    n_head = int.from_bytes(raw, "little")
    if n_head > MAX_HEADER_BYTES:
        raise ValueError(f"its header claims {n_head:,} bytes, more than the {MAX_HEADER_BYTES:,} a safetensors "
                         "header may have")
    if not 2 <= n_head <= size - 8:
        raise ValueError(f"header length {n_head} does not fit a file of {size} bytes")
    header = json.loads(f.read(n_head))  # UnicodeDecodeError and JSONDecodeError are ValueErrors
    if not isinstance(header, dict):
        raise ValueError("its header is not a JSON object")  # noqa: TRY004 - bad data, not a bad argument
    return n_head, header


def check_safetensors_file(path: str | os.PathLike[str]) -> None:
    """Header bounded, and every tensor's shape, dtype and byte range inside the file."""
    size = os.stat(path).st_size
    with open(path, "rb") as f:
        n_head, header = read_safetensors_header(f, size)
    data = size - 8 - n_head
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            begin, end = (int(x) for x in entry["data_offsets"])
            count = 1
            for d in entry["shape"]:
                if int(d) < 0:
                    raise ValueError
                count *= int(d)
            itemsize = _ITEMSIZE[entry["dtype"]]
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"it describes the tensor {name!r} badly ({str(entry)[:200]})") from exc
        if not 0 <= begin <= end <= data or end - begin != count * itemsize:
            raise ValueError(f"the tensor {name!r} claims bytes {begin}..{end} for {entry['shape']} "
                             f"{entry['dtype']}, which do not fit the {data:,} bytes of data in the file")


def check_inside(root: Path, path: Path) -> None:
    """`path` is no symbolic link and lies inside the folder `root` (no `..`, absolute paths or links out)."""
    if path.is_symlink():
        raise ValueError(f"{path} is a symbolic link (to {os.readlink(path)}); a bank's files must be its own")
    if not Path(os.path.realpath(path)).is_relative_to(os.path.realpath(root)):
        raise ValueError(f"{path} lies outside the folder {root}")
