"""The command line: ``lora-train``, ``lora-merge``, ``lora-eval`` and ``python -m lora_cli``.

Each command parses its arguments, calls one library function and renders the result.
Torch is imported inside the commands, so ``--help`` stays fast. A :class:`UserError`
becomes one red message and exit code 2; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import errno
import functools
import os
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

  lora-train configs/quickstart.yaml train.save_every=50 --resume

  lora-train configs/quickstart.yaml --nproc-per-node 2 train.strategy=fsdp

  torchrun --nnodes 2 --nproc-per-node 8 --rdzv-backend c10d --rdzv-endpoint HOST:29500 -m lora_cli train configs/quickstart.yaml
"""


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


@_user_errors
def train_command(
    config: Path = typer.Argument(..., help="The run's YAML config.", show_default=False),
    overrides: Optional[List[str]] = typer.Argument(
        None, help="KEY=VALUE overrides of config keys, e.g. lora.rank=4 train.lr=1e-3.", show_default=False),
    dry_run: bool = typer.Option(False, "--dry-run", help="Build model and data, print the plan, do not train."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace the run in a non-empty output_dir."),
    resume: bool = typer.Option(False, "--resume", help="Continue from the newest checkpoint in output_dir."),
    nproc_per_node: Optional[int] = typer.Option(
        None, "--nproc-per-node", min=1, help="Train on this many workers on this machine (one per GPU; "
        "on CPU they share the cores), as train.strategy says.", show_default=False),
) -> None:
    """Train a LoRA adapter as CONFIG describes; save it to output_dir/adapter."""
    from . import distributed as dist
    from .config import load_config
    from .console import show_plan

    if resume and overwrite:
        raise UserError("--resume and --overwrite contradict each other", fix="pass one of them")
    cfg = load_config(config, overrides or [])
    search_path = Path(config).resolve().parent
    workers = nproc_per_node or 1
    if dist.launched() and nproc_per_node:
        raise UserError("--nproc-per-node starts workers, but this process already is one (torchrun "
                        "started it)", where="--nproc-per-node", fix="leave --nproc-per-node out under torchrun")
    if dry_run:             # under torchrun, rank 0 shows the plan of the whole run
        from .train import plan
        if dist.launched():
            if os.environ["RANK"] != "0":
                return
            workers = int(os.environ["WORLD_SIZE"])
        show_plan(plan(cfg, search_path=search_path, world=dist.World(size=workers, strategy=cfg.train.strategy)))
    elif dist.launched():
        _train_worker(cfg, config, overrides, overwrite=overwrite, resume=resume, search_path=search_path)
    elif workers > 1:
        _launch_workers(cfg, config, overrides, workers, overwrite=overwrite, resume=resume)
    else:
        _train_here(cfg, config, overrides, overwrite=overwrite, resume=resume, search_path=search_path)


def _launch_workers(cfg, config: Path, overrides, workers: int, *, overwrite: bool, resume: bool) -> None:
    """Start ``workers`` copies of this command on this machine; exit as the run ended."""
    from .checkpoint import checkpoints
    from .console import show_error
    from .launch import launch

    args = [str(config), *(overrides or []), *(["--overwrite"] if overwrite else []), *(["--resume"] if resume else [])]
    code, problem = launch(args, workers, lambda: _resume_command(config, overrides, workers)
                           if checkpoints(cfg.output_dir) else None)
    if problem is not None:
        show_error(problem)
    raise typer.Exit(code)


def _train_here(cfg, config: Path, overrides, *, world=None, **kwargs) -> None:
    from .console import ProgressReporter, show_interrupted, show_train_result
    from .distributed import SINGLE
    from .train import Interrupted, train

    world = world or SINGLE
    try:
        result = train(cfg, reporter=ProgressReporter(), world=world, **kwargs)
    except Interrupted as stop:
        if world.is_main:
            show_interrupted(stop, resume_command=_resume_command(config, overrides, world.size))
        raise typer.Exit(stop.exit_code) from None
    if world.is_main:
        show_train_result(result)


def _train_worker(cfg, config: Path, overrides, **kwargs) -> None:
    """One worker of a torchrun (or --nproc-per-node) run. Rank 0 reports; a worker that
    stops because another failed says so in one line and exits with PEER_FAILED."""
    from . import distributed as dist
    from .console import err, show_error
    from .pipeline import resolve_device

    world = dist.join(cfg.train.strategy, resolve_device(cfg.device))
    if not world.is_main:
        dist.quiet()
    together = True        # every worker stops at this same point: they may wait for each other
    try:
        _train_here(cfg, config, overrides, world=world, **kwargs)
    except dist.FollowerStop as stop:
        together = stop.exit_code == 2
        raise typer.Exit(stop.exit_code) from None
    except dist.PeerFailed as exc:
        together = False
        err.print(str(exc), markup=False, highlight=False, soft_wrap=True)
        raise typer.Exit(dist.PEER_FAILED) from None
    except UserError as exc:
        if world.is_main:   # now: the launcher stops rank 0 as soon as the others have exited
            show_error(exc)
        raise typer.Exit(2) from None
    except typer.Exit:      # interrupted: every worker checkpointed and stops
        raise
    except BaseException:
        together = False
        raise
    finally:
        dist.leave(together)


def _resume_command(config: Path, overrides: Optional[List[str]], workers: int = 1) -> str:
    import shlex
    launch = ["--nproc-per-node", str(workers)] if workers > 1 else []
    return " ".join(shlex.quote(a) for a in ["lora-train", str(config), *(overrides or []), *launch, "--resume"])


MERGE_EXAMPLES = """\
Examples:

  lora-merge data/quickstart/base.safetensors runs/quickstart/adapter

  lora-merge data/quickstart/base.safetensors runs/quickstart/adapter -o merged.safetensors --verify

  lora-merge base.pt runs/a/adapter runs/b/adapter --weights 0.7 0.3 --dtype bfloat16
"""

EVAL_EXAMPLES = """\
Examples:

  lora-eval runs/quickstart/adapter

  lora-eval configs/quickstart.yaml --json

  lora-eval runs/quickstart/adapter --merged data/quickstart/base-merged.safetensors

  lora-eval runs/quickstart/adapter --data data/quickstart/eval.jsonl --batch-size 64
"""


@_user_errors
def merge_command(
    base: Path = typer.Argument(..., help="Base weights: .pt, .safetensors, or a model directory.",
                                show_default=False),
    adapters: List[Path] = typer.Argument(..., help="One or more adapter directories (or their "
                                          ".safetensors files).", show_default=False),
    output: Optional[Path] = typer.Option(None, "-o", "--output",
                                          help="Where to write (default: <base>-merged.<ext> beside the base)."),
    force: bool = typer.Option(False, "--force", help="Replace an existing output."),
    dtype: Optional[str] = typer.Option(None, "--dtype", help="Cast floating tensors: float32, bfloat16 or float16."),
    weights: Optional[List[str]] = typer.Option(None, "--weights", help="One weight per adapter (default 1 each): "
                                                "--weights 0.7 0.3, or 0.7,0.3.", show_default=False),
    verify: bool = typer.Option(False, "--verify", help="Check merged outputs against base+adapter on held-out data."),
    ignore_fingerprint: bool = typer.Option(False, "--ignore-fingerprint",
                                            help="Merge even if the base differs from the adapter's."),
) -> None:
    """Fold LoRA adapters into base weights: W' = W + weight * (alpha/r) * B @ A."""
    from .adapter import read_adapter
    from .console import show_merge, show_verification
    from .evaluate import prepare_verification
    from .merge import merge_checkpoint

    adapters, factors = _split_weights(adapters, weights)
    if dtype is not None and dtype not in ("float32", "bfloat16", "float16"):
        raise UserError(f"unknown dtype {dtype!r}", where="--dtype", fix="use float32, bfloat16 or float16")
    if verify and (len(adapters) > 1 or (factors and factors != [1.0])):
        raise UserError("--verify checks one adapter at weight 1", where="--verify",
                        fix="merge and verify adapters one at a time")
    loaded = [read_adapter(a) for a in adapters]
    verify_merged = prepare_verification(adapters[0], base) if verify else None   # its errors come before writing
    report = merge_checkpoint(base, loaded, output, weights=factors, dtype=dtype, force=force,
                              check_base=not ignore_fingerprint)
    show_merge(report)
    if verify_merged is not None:
        result = verify_merged(report.output)
        show_verification(result)
        if not result.ok:
            raise typer.Exit(1)


def _split_weights(adapters: List[Path], weights: Optional[List[str]]) -> tuple[List[Path], Optional[List[float]]]:
    """Read ``--weights 0.7 0.3`` the way users write it: the shell hands the numbers
    after the first to the adapter list, so trailing numbers that are not files there
    are weights too. ``--weights 0.7,0.3`` and a repeated ``--weights`` also work."""
    if not weights:
        return adapters, None
    raw = [w for item in weights for w in item.split(",") if w.strip()]
    adapters = list(adapters)
    while adapters and not adapters[-1].exists() and _is_number(str(adapters[-1])):
        raw.insert(len(weights), str(adapters.pop()))
    try:
        return adapters, [float(w) for w in raw]
    except ValueError:
        raise UserError(f"--weights must be numbers, got {' '.join(raw)}", where="--weights",
                        fix="write e.g. --weights 0.7 0.3") from None


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


@_user_errors
def eval_command(
    source: Path = typer.Argument(..., help="An adapter directory, or the training config.", show_default=False),
    data: Optional[str] = typer.Option(None, "--data", help="Held-out file (default: the config's eval data)."),
    merged: Optional[str] = typer.Option(None, "--merged", help="Evaluate this merged checkpoint instead of "
                                         "base+adapter."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object instead of tables."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", min=1, help="Examples per batch."),
    ignore_fingerprint: bool = typer.Option(False, "--ignore-fingerprint",
                                            help="Load the adapter even if the base differs from its own."),
) -> None:
    """Measure the base model and base+adapter side by side on held-out data."""
    from .console import show_comparison, show_json
    from .evaluate import compare

    result = compare(source, data=data, merged=merged, batch_size=batch_size, check_base=not ignore_fingerprint)
    if as_json:
        show_json(result.as_dict())
    else:
        show_comparison(result)


train_app = _app("Train a LoRA adapter from a YAML config.")
train_app.command(epilog=TRAIN_EXAMPLES)(train_command)

merge_app = _app("Fold LoRA adapters into base weights.")
merge_app.command(epilog=MERGE_EXAMPLES)(merge_command)
eval_app = _app("Evaluate base and base+adapter on held-out data.")
eval_app.command(epilog=EVAL_EXAMPLES)(eval_command)

app = _app("lora-cli: LoRA fine-tuning from one YAML file.")
app.command("train", epilog=TRAIN_EXAMPLES)(train_command)
app.command("merge", epilog=MERGE_EXAMPLES)(merge_command)
app.command("eval", epilog=EVAL_EXAMPLES)(eval_command)


def main() -> None:
    app()
