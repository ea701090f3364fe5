"""`msa migrate BANK [--output DIR]`: bring a bank written by an older msa to the current format."""

from __future__ import annotations

import argparse
from typing import Any


def cmd_migrate(args: argparse.Namespace) -> int:
    from ..memory.migrate import migrate_bank

    print(migrate_bank(args.bank, args.output).describe())
    return 0


def register(command: Any) -> None:
    """Add the `migrate` command; `command(name, func, help)` returns its argparse parser."""
    p = command("migrate", cmd_migrate, "Bring a bank written by an older msa to the current on-disk format "
                "(a verified new copy; the original is never rewritten in place before the copy is complete).")
    p.add_argument("bank", metavar="BANK")
    p.add_argument("--output", metavar="DIR", default=None,
                   help="write the migrated bank to this new folder and leave BANK untouched "
                        "(default: a new version inside BANK, switched to atomically once verified)")
