"""``argparse`` argument types shared by ``circuits`` CLI modules (no other imports: no cycles)."""

from __future__ import annotations

import argparse

__all__ = ["positive_int", "non_negative_int"]


def _int(text: str, low: int, what: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
    if v < low:
        raise argparse.ArgumentTypeError(f"expected {what}, got {v}")
    return v


def positive_int(text: str) -> int:
    """``type=`` for an integer ``>= 1``; a clear ``ArgumentTypeError`` otherwise."""
    return _int(text, 1, "a positive integer")


def non_negative_int(text: str) -> int:
    """``type=`` for an integer ``>= 0``; a clear ``ArgumentTypeError`` otherwise."""
    return _int(text, 0, "an integer >= 0")
