"""The command line: ``lora-train``, ``lora-merge``, ``lora-eval`` and ``python -m lora_cli``.

Each command parses its arguments, calls one library function and renders the result.
Torch is imported inside the commands, so ``--help`` stays fast. A :class:`UserError`
becomes one red message and exit code 2; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import List, Optional

import typer

from .errors import UserError

TRAIN_EXAMPLES = """\
Examples:

  lora-train configs/quickstart.yaml

  lora-train configs/quickstart.yaml --dry-run

  lora-train configs/quickstart.yaml lora.rank=4 train.lr=1e-3 device=cpu

  lora-train configs/seed_linear.yaml output_dir=runs/try2 --overwrite
"""


def _user_errors(fn):
    """Turn a UserError into one message and exit code 2."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except UserError as exc:
            from .console import show_error
            show_error(exc)
            raise typer.Exit(2) from None
    return wrapper


def _app(help_text: str) -> typer.Typer:
    return typer.Typer(add_completion=False, help=help_text, rich_markup_mode=None,
                       context_settings={"help_option_names": ["-h", "--help"]})


@_user_errors
def train_command(
    config: Path = typer.Argument(..., help="The run's YAML config.", show_default=False),
    overrides: Optional[List[str]] = typer.Argument(
        None, help="KEY=VALUE overrides of config keys, e.g. lora.rank=4 train.lr=1e-3.", show_default=False),
    dry_run: bool = typer.Option(False, "--dry-run", help="Build model and data, print the plan, do not train."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace the run in a non-empty output_dir."),
) -> None:
    """Train a LoRA adapter as CONFIG describes; save it to output_dir/adapter."""
    from .config import load_config
    from .console import ProgressReporter, show_plan, show_train_result
    from .train import plan, train

    cfg = load_config(config, overrides or [])
    search_path = Path(config).resolve().parent
    prepared = plan(cfg, search_path=search_path)
    if dry_run:
        show_plan(prepared)
        return
    result = train(cfg, reporter=ProgressReporter(), overwrite=overwrite, search_path=search_path,
                   prepared=prepared)
    show_train_result(result)


train_app = _app("Train a LoRA adapter from a YAML config.")
train_app.command(epilog=TRAIN_EXAMPLES)(train_command)

app = _app("lora-cli: LoRA fine-tuning from one YAML file.")
app.command("train", epilog=TRAIN_EXAMPLES)(train_command)


def main() -> None:
    app()
