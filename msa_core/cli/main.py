"""The `msa` command line: index a corpus into a memory bank, query it, answer from it, run the demo.

    msa index corpus.jsonl --bank ./bank          # encode documents into a new bank
    msa add ./bank more.jsonl                     # add or replace (same id) documents
    msa delete ./bank doc-1 doc-2
    msa info ./bank [--json]
    msa query ./bank "question" -k 5 --filter year>=1900 [--json]
    msa ask ./bank "question" --mode latent|hybrid|interleave [--json]
    msa demo                                      # the README's tour on the shipped demo corpus
    msa train-router train/*.jsonl --out router.safetensors      # train router projectors
    msa niah --tokens 64K --out ./niah-64k        # (msa_integrations) a needle-in-a-haystack retrieval set
    msa compare --data DIR --retrievers msa,minilm,bm25 --out ./report   # (msa_integrations) the A/B harness

Commands come from this package's modules and from other installed distributions, which register a
`register(command)` function under the entry point group `msa_core.commands` (msa_integrations adds
`compare` and `niah` that way). A bank remembers the model that built it (its manifest's `model_name`)
and, when it was not the native one, the router (in a small `msa-cli.json` next to the bank's versions),
so later commands need no --model; --model/--router override them. Results go to stdout; messages and
progress to stderr. Exit codes: 0 ok, 2 bad input or usage, 1 internal error (MSA_DEBUG=1 shows the
traceback).
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback
from importlib.metadata import entry_points
from typing import Any

from .. import __version__
from ..errors import InvalidInputError, MSAError
from . import bank_commands, demo, migrate, train

ENTRY_POINT_GROUP = "msa_core.commands"
# Commands other distributions provide, and how to get them when they are missing.
KNOWN_PLUGINS = {"compare": "msa_integrations (pip install 'msa[compare]')",
                 "niah": "msa_integrations (pip install 'msa[compare]')",
                 "distill-data": "msa_integrations (pip install 'msa[compare]')"}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="msa", description="Memory Sparse Attention: index documents into a memory bank, retrieve, answer.",
        epilog="Exit codes: 0 ok, 2 bad input or usage, 1 internal error (MSA_DEBUG=1 shows the traceback).")
    parser.add_argument("--version", action="version", version=f"msa {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    def command(name: str, func: Any, help_text: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(func=func)
        return p

    for module in (bank_commands, demo, train, migrate):
        module.register(command)
    broken: dict[str, str] = {}
    # one registration per target: two installed distributions of this repository would list it twice
    for ep in {ep.value: ep for ep in entry_points(group=ENTRY_POINT_GROUP)}.values():
        try:
            register = ep.load()
        except ImportError as exc:  # a plugin whose own dependencies are missing must not break `msa index`
            broken[ep.value] = f"{exc.name or exc} is missing"
            continue
        register(command)
    parser.set_defaults(registered=sorted(sub.choices), broken_plugins=broken)
    return parser


def _missing_plugin(argv: list[str], parser: argparse.ArgumentParser) -> str | None:
    """The message for a known plugin command that no installed distribution registered, else None."""
    name = next((a for a in argv if not a.startswith("-")), None)
    if name not in KNOWN_PLUGINS or name in parser.get_default("registered"):
        return None
    why = "; ".join(f"{where}: {reason}" for where, reason in parser.get_default("broken_plugins").items())
    return f"`msa {name}` comes with {KNOWN_PLUGINS[name]}, which is not installed" + (f" ({why})" if why else "")


def main(argv: list[str] | None = None) -> int:
    debug = os.environ.get("MSA_DEBUG", "").strip() not in ("", "0")
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        parser = build_parser()
        missing = _missing_plugin(argv, parser)
        if missing:
            raise InvalidInputError(missing)
        args = parser.parse_args(argv)
        if args.command is None:
            parser.print_help(sys.stderr)
            return 2
        return int(args.func(args) or 0)
    except SystemExit as exc:  # argparse: --help/--version (0) and usage errors (2)
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 2)
    except (MSAError, PermissionError) as exc:
        if debug:
            traceback.print_exc()
        print(f"msa: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("msa: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # e.g. `msa query ... | head`: stop quietly
        try:
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        except (OSError, ValueError):
            pass
        return 1
    except Exception as exc:
        if debug:
            traceback.print_exc()
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        print(f"msa: internal error: {type(exc).__name__}" + (f": {first}" if first else ""), file=sys.stderr)
        if not debug:
            print("run with MSA_DEBUG=1 for the traceback", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
