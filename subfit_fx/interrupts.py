"""A Ctrl-C noticed anywhere stops the run and leaves no output, even where a library swallows it.

The CLI's SIGINT handler raises KeyboardInterrupt, but the exception can land inside library code
that eats it: torch's C++ argument parser reports it as a TypeError, and a library that catches that
TypeError as a fallback carries on as if nothing happened. So the handler also sets a flag here; the
atomic writers refuse to put an output in place once it is set, and the calibration loops stop at
their next batch. Only the CLI sets the flag: a library caller's own handler is left alone.

Example:
    >>> clear(); raise_if_interrupted()  # nothing seen: returns
    >>> note(); interrupted()
    True
    >>> clear()
"""

from __future__ import annotations

import threading

__all__ = ["clear", "interrupted", "note", "raise_if_interrupted"]

_seen = threading.Event()


def note() -> None:
    """Record that an interrupt arrived (called from the CLI's signal handler).

    Example:
        >>> note(); interrupted()
        True
        >>> clear()
    """
    _seen.set()


def clear() -> None:
    """Forget earlier interrupts (a new CLI run starts clean).

    Example:
        >>> clear(); interrupted()
        False
    """
    _seen.clear()


def interrupted() -> bool:
    """Whether an interrupt arrived since the last `clear()`.

    Example:
        >>> clear(); interrupted()
        False
    """
    return _seen.is_set()


def raise_if_interrupted() -> None:
    """Raise KeyboardInterrupt if an interrupt arrived, whatever became of the first one.

    Example:
        >>> clear(); raise_if_interrupted()
    """
    if _seen.is_set():
        raise KeyboardInterrupt
