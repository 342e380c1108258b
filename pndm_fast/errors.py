"""The one exception type that the command line turns into a one-line message and exit code 2."""


class UserError(Exception):
    """A mistake the user can fix (bad flag, missing file, impossible step count).

    The message is a single line that says what was wrong and what to do; the command line prints it
    without a traceback.
    """
