"""The one exception type that the command line turns into a one-line message and exit code 2."""

from __future__ import annotations


class UserError(Exception):
    """A mistake the user can fix (bad flag, missing file, impossible step count).

    The message is a single line that says what was wrong and what to do; the command line prints it
    without a traceback.
    """


def first_line(err: BaseException | str, limit: int = 200) -> str:
    """The first non-blank line of an exception's message (its type's name if it has none), cut to `limit`
    characters: enough to say what failed inside a one-line UserError."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return (lines[0] if lines else type(err).__name__)[:limit]
