"""User-facing errors.

Anything a user can cause (a wrong path, an out-of-range setting, a prompt for
another model, a damaged file) is raised as :class:`CTPError`. The CLI prints
its message on one line and exits with status 2; library callers catch it like
any exception. Programming errors stay ordinary exceptions with tracebacks.
"""

from __future__ import annotations


class CTPError(Exception):
    """A problem with the user's input, stated with its fix."""

    def __init__(self, problem: str, fix: str | None = None):
        self.problem = problem
        self.fix = fix
        super().__init__(problem if not fix else f"{problem} ({fix})")


def require(condition: bool, problem: str, fix: str | None = None) -> None:
    """Raise :class:`CTPError` unless ``condition`` holds."""
    if not condition:
        raise CTPError(problem, fix)
