"""Command-line option types shared by `pipeline` and `cache-tools`: bad values fail at parse time.

Each type raises ``argparse.ArgumentTypeError`` with the reason; :class:`OneLineParser`
prints argparse's errors as one line naming the option (``prog: argument --seed: ...``)
and exits 2, like every other usage error of the two programs.
"""
from __future__ import annotations

import argparse
import math
import sys


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


def usage_error(prog: str, message: str) -> int:
    """Print a one-line usage error and return exit status 2."""
    print(f"{prog}: {message}", file=sys.stderr)
    return 2
