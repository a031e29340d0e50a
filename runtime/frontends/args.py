"""Command-line argument types shared by every CLI of the project (python -m runtime, build.py, the serving and
engine commands): a usage mistake is one `error: ...` line and exit 2, like every other user error."""

from __future__ import annotations

import argparse

EXIT_USER_ERROR = 2


class Parser(argparse.ArgumentParser):
    """argparse, but a usage mistake reads like every other error: one `error: ...` line, exit 2."""

    def error(self, message: str):
        self.exit(EXIT_USER_ERROR, f"error: {message} (see `{self.prog} --help`)\n")


def number(parse, ok=lambda v: True, requirement: str = ""):
    """An argparse type: `parse` the text (int or float), refuse NaN/inf and values failing `ok`, in one line."""
    def check(text: str):
        try:
            value = parse(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not {'an integer' if parse is int else 'a number'}: {text!r}") from None
        if value != value or value in (float("inf"), float("-inf")):
            raise argparse.ArgumentTypeError(f"must be finite, got {text!r}")
        if not ok(value):
            raise argparse.ArgumentTypeError(f"{requirement}, got {value}")
        return value
    return check


positive_int = number(int, lambda v: v >= 1, "must be at least 1")
non_negative_int = number(int, lambda v: v >= 0, "must be 0 or more")
