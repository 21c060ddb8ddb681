"""The one exception type that reaches users.

Raise `RetrolmError` for anything a user can fix (bad path, empty corpus, half-built
database, mismatched checkpoint). The CLI prints its message as one line on stderr and
exits non-zero; the message should say what is wrong and what to do.
"""

from __future__ import annotations


class RetrolmError(Exception):
    """A user-facing error: one line saying what is wrong and what to do."""

    exit_code: int = 2
