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


def check_text(value: str, what: str) -> None:
    """Refuse strings holding lone surrogates (e.g. from a \\ud800 escape): they are not text, the
    tokenizer fails on them deep inside, and a UTF-8 docstore cannot store them."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise InvalidInputError(f"{what} holds a lone surrogate {value[exc.start]!r} at position {exc.start}, "
                                "which is not text; fix the string's encoding") from exc
