"""What every lora-cli command shares: --help examples that copy-paste whole, --version,
one message and exit code 2 for a user error, the typer app, and the options that say
what model code an adapter may import."""

from __future__ import annotations

import errno
import functools
import os

import typer

from .errors import UserError

EXAMPLE_WIDTH = 76


def _examples(*commands: str) -> str:
    """A --help epilog listing ``commands``, one per line, each line at most 76 characters
    (80 columns with click's indent): a long command is broken between arguments with a
    shell continuation, so it copy-pastes as one command. The \\b keeps click from
    rewrapping the lines."""
    lines = []
    for command in commands:
        words, line = command.split(" "), ""
        for word in words:
            if line and len(line) + 1 + len(word) > EXAMPLE_WIDTH - 2:      # room for " \\"
                lines.append(line + " \\")
                line = "    " + word
            else:
                line = f"{line} {word}" if line else word
        lines.append(line)
    return "Examples:\n\n\b\n" + "\n".join(lines) + "\n"


def _version(value: bool) -> None:
    """--version: lora-cli's version, and torch's and Python's (torch is not imported)."""
    if not value:
        return
    import platform
    from importlib.metadata import PackageNotFoundError, version

    from . import __version__
    try:
        torch = f"torch {version('torch')}"
    except PackageNotFoundError:
        torch = "torch not installed"
    typer.echo(f"lora-cli {__version__} ({torch}, Python {platform.python_version()})")
    raise typer.Exit()


def _version_option():
    return typer.Option(False, "--version", callback=_version, is_eager=True,
                        help="Show lora-cli's version and exit.")


# A path the system refuses before any file is opened: a user error wherever it is met.
_PATH_ERRNOS = (errno.ENAMETOOLONG, errno.EACCES, errno.EPERM, errno.ELOOP)


def _user_errors(fn):
    """Turn a UserError (or a path the system refuses to look up) into one message and
    exit code 2."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            try:
                return fn(*args, **kwargs)
            except OSError as exc:
                if exc.errno not in _PATH_ERRNOS or exc.filename is None:
                    raise
                raise UserError(f"cannot use this path: {exc.strerror}", where=str(exc.filename)[:300],
                                fix="check the path: each name in it at most 255 bytes, in folders you may "
                                    "read") from None
        except UserError as exc:
            from .console import show_error
            rank = os.environ.get("RANK", "0") if int(os.environ.get("WORLD_SIZE", "1")) > 1 else "0"
            show_error(exc, prefix=f"rank {rank}: " if rank != "0" else "")   # under torchrun, before joining
            raise typer.Exit(2) from None
        except KeyboardInterrupt:
            typer.echo("interrupted", err=True)
            raise typer.Exit(130) from None
    return wrapper


def _app(help_text: str) -> typer.Typer:
    return typer.Typer(add_completion=False, help=help_text, rich_markup_mode=None,
                       context_settings={"help_option_names": ["-h", "--help"]})


def _model_code_options():
    """--model-code, --model-path and --trust-adapter-code: what an adapter's own model class may import."""
    return (
        typer.Option(None, "--model-code", metavar="MODULE:CLASS", help="Build the adapter's model (one "
                     "trained with model.class_path) from this class of yours. Nothing an adapter names is "
                     "imported without this or --trust-adapter-code.", show_default=False),
        typer.Option(None, "--model-path", metavar="DIR", help="The folder to import --model-code from "
                     "(default: the current directory); never one the adapter names.", show_default=False),
        typer.Option(False, "--trust-adapter-code", help="Import the class_path the adapter records (from "
                     "--model-path); what is imported from where is printed first."),
    )


_CODE, _CODE_PATH, _TRUST = _model_code_options()
