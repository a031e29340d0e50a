"""The one exception type for mistakes a user can fix: CLIs print its message on one line, never a traceback."""


class UserError(Exception):
    """Bad input, a missing or corrupt file, an unsupported request: the message says what and how to fix it."""
