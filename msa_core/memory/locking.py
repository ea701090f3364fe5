"""Writers of one bank folder take turns: an inter-process lock (`filelock`, an OS lock on `DIR/.msa-lock`).

Every save holds it while it picks the next version name, writes, switches CURRENT and removes old
versions, so two processes never clean up each other's half-written versions. A read-modify-write (load,
add or delete, save) holds it across all three with `bank_lock(path)`, so no process saves over a version
it has not seen: the lock is re-entrant within a thread, and the save inside takes it again for free.

The lock is the kernel's (flock): a process that dies, even by SIGKILL, releases it with its file
descriptors, so a crash never leaves a bank locked. Readers take no lock: versions are immutable folders
and CURRENT switches atomically, so a reader sees the version before a write or the one after.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from filelock import FileLock, Timeout

from ..errors import BankError

LOCK_NAME = ".msa-lock"

DEFAULT_TIMEOUT_S = 300.0  # overridden by the MSA_LOCK_TIMEOUT environment variable (seconds)

_log = logging.getLogger("msa_core.memory")
_REGISTRY: dict[str, FileLock] = {}
_REGISTRY_GUARD = threading.Lock()


class BankLockedError(BankError):
    """Another process held a bank's write lock for longer than the caller would wait."""


def default_timeout() -> float:
    """MSA_LOCK_TIMEOUT seconds when set (a number >= 0), else DEFAULT_TIMEOUT_S."""
    raw = os.environ.get("MSA_LOCK_TIMEOUT", "").strip()
    if not raw:
        return DEFAULT_TIMEOUT_S
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not value >= 0:
        raise BankError(f"MSA_LOCK_TIMEOUT={raw!r} is not a number of seconds >= 0; unset it or fix it")
    return value


def _file_lock(root: Path) -> FileLock:
    """One FileLock object per lock file and process, so re-entrant use counts on the same object."""
    path = str(Path(os.path.realpath(root)) / LOCK_NAME)
    with _REGISTRY_GUARD:
        lock = _REGISTRY.get(path)
        if lock is None:
            lock = _REGISTRY[path] = FileLock(path)
        return lock


@contextmanager
def bank_lock(root: str | os.PathLike[str], *, timeout: float | None = None,
              on_wait: Callable[[str], None] | None = None) -> Iterator[None]:
    """Hold the write lock of the bank folder `root` (created if missing) for the `with` block.

    A writer that has to wait says so once (through `on_wait`, else a logging warning) and gives up after
    `timeout` seconds (default: `default_timeout()`) with BankLockedError naming the folder.
    """
    root = Path(root)
    timeout = default_timeout() if timeout is None else timeout
    if not timeout >= 0:
        raise BankError(f"lock timeout must be a number of seconds >= 0, got {timeout!r}")
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise BankError(f"cannot create the memory bank folder {root}: {exc}") from exc
    lock = _file_lock(root)
    _acquire(lock, root, timeout, on_wait)
    try:
        yield
    finally:
        lock.release()


def _acquire(lock: FileLock, root: Path, timeout: float, on_wait: Callable[[str], None] | None) -> None:
    try:
        lock.acquire(timeout=0)
        return
    except Timeout:
        pass
    except OSError as exc:
        raise BankError(f"cannot lock the memory bank {root} for writing ({lock.lock_file}): {exc}") from exc
    message = (f"waiting for another process writing the memory bank {root} (lock {lock.lock_file}; "
               f"giving up after {timeout:g} s)")
    (on_wait or _log.warning)(message)
    started = time.monotonic()
    try:
        lock.acquire(timeout=timeout)
    except Timeout:
        raise BankLockedError(
            f"the memory bank {root} stayed locked by another writer for {time.monotonic() - started:.1f} s "
            f"(lock file {lock.lock_file}); nothing was changed. Try again when that process has finished, or "
            f"wait longer (--lock-timeout SECONDS, or MSA_LOCK_TIMEOUT in the environment)"
        ) from None
