"""Errors raised by msa. Every error we raise on purpose derives from MSAError.

The message names the bad value and, where there is one, the fix.
"""


class MSAError(Exception):
    """Base class of every error msa raises on purpose."""


class InvalidInputError(MSAError, ValueError):
    """A caller passed something we cannot use (empty text, k <= 0, a bad filter, ...)."""


class ModelLoadError(MSAError):
    """A backbone or router could not be loaded (missing folder, unsupported family, offline hub id)."""


class BankError(MSAError):
    """A memory bank directory is missing, unreadable or inconsistent."""


class CorruptBankError(BankError):
    """A bank's files are truncated, altered or half-written."""


class BankMismatchError(BankError):
    """A bank was built by another backbone or router than the one asked to use it."""
