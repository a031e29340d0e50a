"""The one exception type for mistakes a user can fix: CLIs print its message on one line, never a traceback; and
how an entry point stops on Ctrl-C or SIGTERM without one either."""

import sys


class UserError(Exception):
    """Bad input, a missing or corrupt file, an unsupported request: the message says what and how to fix it."""


def stopping() -> None:
    """For an entry point that caught Ctrl-C or SIGTERM and is about to return its exit code: a signal that landed
    inside a constructor (tqdm's, seen in CI) leaves a half-built object whose __del__ fails once the unwound frames
    are freed, printing a traceback after our one-line message. The process is stopping, so such destructor errors
    are not printed."""
    sys.unraisablehook = lambda _: None
