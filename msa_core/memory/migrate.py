"""Bringing a bank written by an older msa to the current on-disk format, without ever risking the original.

Format history (`persist.FORMAT_VERSION`, recorded in every manifest):
    1   msa 0.1 - 0.3 and this release: CURRENT + versioned folders, manifest/docstore JSON, safetensors.
        (0.2 and 0.3 differ only in the config keys recorded, which load with their defaults.)

A migration loads the live version with this release's reader (checksums, shapes and counts verified),
writes a complete new copy, verifies the copy by loading it back, and only then makes it live: in the
same folder as a new version (CURRENT switches atomically; the old version is removed after the switch),
or in another folder, leaving the original untouched.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import CorruptBankError, InvalidInputError
from .bank import MemoryBank
from .locking import bank_lock
from .persist import CURRENT, FORMAT_VERSION, read_version
from .records import TENSOR_NAMES

SIDECARS = ("msa-cli.json",)  # files the CLI keeps beside a bank; copied along with it


@dataclass(frozen=True)
class Migration:
    source: Path
    target: Path
    from_version: int
    to_version: int
    written: bool  # False: the bank already was in the current format and no copy was asked for

    def describe(self) -> str:
        if not self.written:
            return (f"{self.source} is already format_version {self.to_version}, the format this msa writes "
                    f"(msa 0.2 and 0.3 wrote it too); nothing to migrate")
        return (f"migrated {self.source} (format_version {self.from_version}) to format_version "
                f"{self.to_version} at {self.target}; the copy was verified before it was made live")


def migrate_bank(source: str | Path, target: str | Path | None = None) -> Migration:
    """Migrate the bank at `source` in place (a new version) or into the new folder `target`."""
    source = Path(source)
    _, manifest, _ = read_version(source)
    from_version = int(manifest["format_version"])
    if target is None:
        if from_version == FORMAT_VERSION:
            return Migration(source, source, from_version, FORMAT_VERSION, written=False)
        with bank_lock(source):
            _write_verified(MemoryBank.load(source), source)
        return Migration(source, source, from_version, FORMAT_VERSION, written=True)
    target = Path(target)
    _check_new_folder(source, target)
    bank = MemoryBank.load(source)
    try:
        _write_verified(bank, target)
        for name in SIDECARS:
            if (source / name).is_file():
                shutil.copy2(source / name, target / name)
    except BaseException:
        shutil.rmtree(target, ignore_errors=True)  # a new folder of ours: nothing else lived there
        raise
    return Migration(source, target, from_version, FORMAT_VERSION, written=True)


def _check_new_folder(source: Path, target: Path) -> None:
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise InvalidInputError(f"{target} exists and is not an empty folder; migrate into a new folder")
    if target.resolve() == source.resolve():
        raise InvalidInputError(f"--output {target} is the bank itself; leave --output out to migrate in place")


def _write_verified(bank: MemoryBank, target: Path) -> None:
    """Save `bank` under `target`, then load the copy back and compare it with `bank`."""
    bank.save(target)
    copy = MemoryBank.load(target)
    same = copy.docstore == bank.docstore and all(
        torch.equal(getattr(copy, n), getattr(bank, n)) for n in TENSOR_NAMES)
    if not same:
        raise CorruptBankError(f"the migrated copy at {target} differs from the bank it was made from; "
                               f"keep using the original ({CURRENT} was not switched to a bad copy)")

