"""Argument types for the command line: numbers checked for their range by the parser itself, so a
bad value is a one-line usage error (exit 2) before any work.

Example:
    >>> positive_int("3")
    3
"""

from __future__ import annotations

import argparse

__all__ = ["fractions", "positive_int"]


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


def fractions(text: str) -> tuple[float, ...]:
    """Comma-separated fractions in (0, 1), e.g. slimming levels "0.25,0.5,0.75".

    Example:
        >>> fractions("0.25,0.5")
        (0.25, 0.5)
    """
    try:
        values = tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a list of numbers; pass e.g. 0.25,0.5,0.75") from None
    if not values or not all(0 < v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"{text!r}: pass fractions in (0, 1) separated by commas, e.g. 0.25,0.5,0.75")
    return values
