"""The errors the LoRA engine raises: a :class:`UserError` carries *what* is wrong,
*where* (a file, a module path, an option) and *how to fix it*; the CLI turns one into a
single message and exit code 2. The rest of lora-cli adds its own kinds (config, data) in
:mod:`lora_cli.errors`, which re-exports these.
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


class ModelError(UserError):
    """A model or base checkpoint that cannot be built or loaded."""


class TargetError(UserError):
    """LoRA target patterns that match nothing, or match something LoRA cannot adapt."""


class AdapterError(UserError):
    """An adapter directory or file that is missing, malformed, or made for another base."""


class OutputError(UserError):
    """An output that cannot be written: the disk is full, the folder read-only or not
    ours. What was half-written is removed before this is raised."""
