"""The one error family of lotus-cli.

Every failure a user can fix is a ``LotusError`` whose message names the thing at fault and whose
``hint`` says what to do. The CLI prints ``message (hint)`` on one red line; library users catch
``LotusError``. ``exit_code`` follows the CLI's contract: 1 for a failed input, 2 for a usage error.
"""

from __future__ import annotations


class LotusError(Exception):
    exit_code = 1

    def __init__(self, message: str, hint: str | None = None, *, subject: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint
        self.subject = subject  # the input or option at fault, for machine-readable reports

    def __str__(self) -> str:
        return f"{self.message} ({self.hint})" if self.hint else self.message


class InputError(LotusError):
    """One input (file, frame, dataset sample) cannot be used; a batch goes on without it."""


class UsageError(LotusError):
    """The command line or API call itself is wrong; nothing is processed."""

    exit_code = 2


class ModelError(UsageError):
    """A model cannot be resolved, fetched or loaded."""


class OutputError(LotusError):
    """An output cannot be written (unwritable folder, full disk)."""

    exit_code = 2


def brief(e: BaseException) -> str:
    """An exception in one line for a per-item error: our own errors whole (they say what and how to fix
    it), others as "Type: first line"."""
    if isinstance(e, LotusError):
        return str(e)
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0]}" if text else type(e).__name__
