"""The one exception type for mistakes a user can fix: CLIs print its message on one line, never a traceback; and
how an entry point stops on Ctrl-C or SIGTERM without one either."""

import sys


class UserError(Exception):
    """Bad input, a missing or corrupt file, an unsupported request: the message says what and how to fix it."""


def stopping(interrupt: BaseException) -> None:
    """For an entry point that caught Ctrl-C or SIGTERM, before its one-line message: a signal that landed inside a
    constructor (tqdm's, seen in CI) leaves a half-built object whose __del__ fails once the unwound frames are freed,
    which would print a traceback after that message. Free them now, with such destructor errors unprinted (the
    process is stopping), and put the hook back."""
    hook, sys.unraisablehook = sys.unraisablehook, lambda _: None
    try:
        interrupt.__traceback__ = None
    finally:
        sys.unraisablehook = hook
