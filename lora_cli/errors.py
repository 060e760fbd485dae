"""User-facing errors.

Every mistake a user can make (a bad config key, a malformed data row, the wrong base
checkpoint) is raised as a :class:`UserError` carrying three things: *what* is wrong,
*where* (a file, a line, a config key path) and *how to fix it*. The CLI turns one of
these into a single red message and exit code 2; anything else is a bug and keeps its
traceback.
"""

from __future__ import annotations


class UserError(Exception):
    """A problem the user can fix: what is wrong, where, and how to fix it."""

    def __init__(self, what: str, *, where: str | None = None, fix: str | None = None):
        super().__init__(what)
        self.what = what
        self.where = where
        self.fix = fix

    def __str__(self) -> str:
        text = f"{self.where}: {self.what}" if self.where else self.what
        if self.fix:
            text += f"\n  fix: {self.fix}"
        return text


class ConfigError(UserError):
    """One or more problems in a config, each prefixed with its key path.

    All problems found in one pass are reported together, so a user fixes a config in
    one round trip rather than one error at a time.
    """

    def __init__(self, problems: list[str], *, where: str | None = None, fix: str | None = None):
        self.problems = list(problems)
        what = self.problems[0] if len(self.problems) == 1 else (
            f"{len(self.problems)} problems:\n" + "\n".join(f"  - {p}" for p in self.problems)
        )
        super().__init__(what, where=where, fix=fix)


class DataError(UserError):
    """A data file that cannot be used: missing, empty, malformed row, wrong column."""


class ModelError(UserError):
    """A model or base checkpoint that cannot be built or loaded."""


class TargetError(UserError):
    """LoRA target patterns that match nothing, or match something LoRA cannot adapt."""


class AdapterError(UserError):
    """An adapter directory or file that is missing, malformed, or made for another base."""


class OutputError(UserError):
    """An output that cannot be written: the disk is full, the folder read-only or not
    ours. What was half-written is removed before this is raised."""
