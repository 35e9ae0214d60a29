"""Argument types for the command line: numbers checked for their range by the parser itself, so a
bad value is a one-line usage error (exit 2) before any work.

Example:
    >>> positive_int("3")
    3
"""

from __future__ import annotations

import argparse

__all__ = ["positive_int"]


def positive_int(text: str) -> int:
    """An integer >= 1 (repeats, batch sizes, token counts).

    Example:
        >>> positive_int("0")
        Traceback (most recent call last):
        ...
        argparse.ArgumentTypeError: 0 is not a positive integer; pass 1 or more
    """
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer; pass a whole number such as 8") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not a positive integer; pass 1 or more")
    return value
