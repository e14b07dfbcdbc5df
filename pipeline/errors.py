"""Why a build stops: the two exceptions the CLI turns into exit codes 1 and 2."""
from __future__ import annotations


class BuildError(Exception):
    """The build cannot finish; str() is a one-line reason (exit code 1).

    ``failures`` lists the inputs that failed (``format.InputNote``), for the caller to show.
    """

    def __init__(self, message: str, failures: list | None = None):
        super().__init__(message)
        self.failures = failures or []


class InputError(BuildError):
    """The request itself is wrong: a missing path, a conflicting --out (exit code 2)."""
