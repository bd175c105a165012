"""argparse ``type=`` converters that refuse impossible values at parse time.

A bad value then fails before any model is loaded, with argparse's one-line message naming the flag
(``sla demo: error: argument --heads: must be an integer >= 1, got 0``), instead of deep inside torch or
``statistics``. Light on purpose: the CLI imports this module to build ``--help``.
"""

from __future__ import annotations

import argparse
import math


def positive_int(text: str) -> int:
    """An integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {value}")
    return value


def token_tile(text: str) -> tuple[int, int, int]:
    """Three integers >= 1, ``F,H,W`` (a token tile: frames, rows, columns)."""
    try:
        tile = tuple(int(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected three ints F,H,W such as 4,4,4, got {text!r}") from None
    if len(tile) != 3 or min(tile) < 1:
        raise argparse.ArgumentTypeError(f"expected three positive ints F,H,W such as 4,4,4, got {text!r}")
    return tile


def non_negative_int(text: str) -> int:
    """An integer >= 0."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer >= 0, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be an integer >= 0, got {value}")
    return value


def fraction(text: str) -> float:
    """A number in [0, 1] (a fraction of key blocks)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number in [0, 1], got {text!r}") from None
    if not 0.0 <= value <= 1.0:  # also refuses nan
        raise argparse.ArgumentTypeError(f"must be a fraction of key blocks in [0, 1] (0.05 means 5%), got {text}")
    return value


def finite_float(text: str) -> float:
    """A finite number."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
    return value
