"""User-facing errors: one clear line and a distinct exit code, never a traceback."""

from __future__ import annotations


class DGQError(Exception):
    """Bad input or a failed precondition; the CLI prints the message and exits with `exit_code`."""

    exit_code = 2


class VerificationError(DGQError):
    """A packed checkpoint failed `dgq verify`."""

    exit_code = 3
