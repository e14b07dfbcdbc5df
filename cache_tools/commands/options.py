"""Command-line option types (and byte counts as text) shared by `pipeline` and `cache-tools`:
bad values fail at parse time.

Each type raises ``argparse.ArgumentTypeError`` with the reason; :class:`OneLineParser`
prints argparse's errors as one line naming the option (``prog: argument --seed: ...``)
and exits 2, like every other usage error of the two programs.
"""
from __future__ import annotations

import argparse
import math


class OneLineParser(argparse.ArgumentParser):
    """An ArgumentParser whose usage errors are one line (no usage dump) with exit 2.

    Subparsers made with ``add_subparsers().add_parser`` inherit the class.
    """

    def error(self, message: str):
        self.exit(2, f"{self.prog}: {message} (see --help)\n")


def _number(kind, text: str, what: str, ok) -> int | float:
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
    if isinstance(value, float) and not math.isfinite(value) or not ok(value):
        raise argparse.ArgumentTypeError(f"must be {what}, got {text}")
    return value


def non_negative_int(text: str) -> int:
    return _number(int, text, "a non-negative integer", lambda v: v >= 0)


def positive_int(text: str) -> int:
    return _number(int, text, "a positive integer", lambda v: v > 0)


def positive_float(text: str) -> float:
    return _number(float, text, "a positive number", lambda v: v > 0)


def non_negative_float(text: str) -> float:
    return _number(float, text, "a non-negative number", lambda v: v >= 0)


def fraction(text: str) -> float:
    return _number(float, text, "a fraction in [0, 1)", lambda v: 0 <= v < 1)


def human_bytes(n: float) -> str:
    """Bytes in binary units, as `cache-tools info` and the build summary print them: '20.3 MiB'."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{int(n)} B" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"
