"""User-facing errors.

Every mistake a user can make (a bad config key, a malformed data row, the wrong base
checkpoint) is raised as a :class:`UserError` carrying three things: *what* is wrong,
*where* (a file, a line, a config key path) and *how to fix it*. The CLI turns one of
these into a single red message and exit code 2; anything else is a bug and keeps its
traceback. :func:`closest` is the one "did you mean" every message offers.
"""

from __future__ import annotations

from difflib import SequenceMatcher

from .lora.errors import AdapterError, ModelError, OutputError, TargetError, UserError

__all__ = ["UserError", "ConfigError", "DataError", "ModelError", "TargetError", "AdapterError", "OutputError",
           "closest"]


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


def closest(word: str, options) -> str | None:
    """The option ``word`` was probably meant to be, or None when none is close.

    Close means a few edits away (adjacent swaps count as one edit: 'rnak' -> 'rank'),
    at most 1 for words of up to 4 letters, 2 up to 9 letters, 3 beyond, with at least
    half the letters alike; or a prefix of one option only ('optim' -> 'optimizer').
    Case is ignored. A far-fetched guess is worse than none: 'warmup_ratio' is not
    'warmup_steps'.
    """
    options = [str(o) for o in options]
    low = word.lower()
    limit = 1 if len(low) <= 4 else 2 if len(low) <= 9 else 3
    near = []
    for o in options:
        edits, alike = _edits(low, o.lower()), SequenceMatcher(None, low, o.lower()).ratio()
        if edits <= limit and alike >= 0.5:      # 'y' is one edit from 'a', but nothing alike
            near.append((edits, abs(len(o) - len(word)), -alike, o))
    if near:
        return min(near)[-1]
    prefixed = [o for o in options if len(low) >= 4 and o.lower().startswith(low)]
    return prefixed[0] if len(prefixed) == 1 else None


def _edits(a: str, b: str) -> int:
    """Edit distance with adjacent transpositions (optimal string alignment)."""
    if abs(len(a) - len(b)) > 3:
        return abs(len(a) - len(b))
    prev2: list[int] = []
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        row = [i] + [0] * len(b)
        for j, cb in enumerate(b, 1):
            row[j] = min(prev[j] + 1, row[j - 1] + 1, prev[j - 1] + (ca != cb))
            if i > 1 and j > 1 and ca == b[j - 2] and a[i - 2] == cb:
                row[j] = min(row[j], prev2[j - 2] + 1)
        prev2, prev = prev, row
    return prev[-1]


