"""The `msa` command line: one module per command group, a registry that other distributions extend
through the `msa_core.commands` entry point group (`msa compare` and `msa niah` come from
msa_integrations that way, so the engine never imports its adapters).

May import: anything in msa_core. Nothing in msa_core imports the CLI.
"""

from .main import main

__all__ = ["main"]
