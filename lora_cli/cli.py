"""The command line: ``lora-train``, ``lora-merge``, ``lora-eval`` and ``python -m lora_cli``.

Each command parses its arguments, calls one library function and renders the result.
Torch is imported inside the commands, so ``--help`` stays fast. A :class:`UserError`
becomes one red message and exit code 2; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import List, Optional

import typer

from .choices import DTYPES
from .cli_generate import GENERATE_EXAMPLES, eval_generation, generate_command, plot_runs
from .command import _CODE, _CODE_PATH, _TRUST, _app, _examples, _user_errors, _version_option
from .errors import UserError

TRAIN_COMMANDS = (
    "lora-train configs/quickstart.yaml",
    "lora-train configs/quickstart.yaml --dry-run",
    "lora-train configs/quickstart.yaml lora.rank=4 train.lr=1e-3 device=cpu",
    "lora-train configs/seed_linear.yaml output_dir=runs/try2 --overwrite",
    "lora-train configs/quickstart.yaml train.save_every=50 --resume",
    "lora-train configs/quickstart.yaml --nproc-per-node 2 train.strategy=fsdp",
    "torchrun --nnodes 2 --nproc-per-node 8 --rdzv-backend c10d --rdzv-endpoint HOST:29500 "
    "-m lora_cli train configs/quickstart.yaml",
    "lora-train --list-configs",
    "lora-train --init quickstart my-run && lora-train my-run/quickstart.yaml",
)
TRAIN_EXAMPLES = _examples(*TRAIN_COMMANDS)


@_user_errors
def train_command(
    config: Optional[Path] = typer.Argument(
        None, help="The run's YAML config (with --init: the folder to copy the example into, "
        "default: the current one).", show_default=False),
    overrides: Optional[List[str]] = typer.Argument(
        None, help="KEY=VALUE overrides of config keys, e.g. lora.rank=4 train.lr=1e-3.", show_default=False),
    dry_run: bool = typer.Option(False, "--dry-run", help="Build model and data, print the plan, do not train."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace the run in a non-empty output_dir "
                                   "(with --init: replace existing files)."),
    resume: bool = typer.Option(False, "--resume", help="Continue from the newest checkpoint in output_dir."),
    allow_changed_data: bool = typer.Option(
        False, "--allow-changed-data", help="Resume even though the data files or the base weights changed "
        "since the checkpoint (refused otherwise)."),
    nproc_per_node: Optional[int] = typer.Option(
        None, "--nproc-per-node", min=1, help="Train on this many workers on this machine (one per GPU; "
        "on CPU they share the cores), as train.strategy says.", show_default=False),
    list_configs: bool = typer.Option(False, "--list-configs", help="List the example configs that ship "
                                      "with lora-cli, and exit."),
    init: Optional[str] = typer.Option(None, "--init", metavar="NAME", show_default=False,
                                       help="Copy example config NAME, and the files it reads, to edit and "
                                       "run; then exit."),
    version: bool = _version_option(),
    memory_limit: Optional[float] = typer.Option(
        None, "--memory-limit", metavar="GB", min=0.001, show_default=False,
        help="With --dry-run: also say the largest batch_size whose estimated peak fits GB (1 GB = 1e9 bytes)."),
) -> None:
    """Train a LoRA adapter as CONFIG describes; save it to output_dir/adapter."""
    if list_configs or init is not None:
        _examples_command(config, overrides, list_configs, init, overwrite=overwrite,
                          others=dry_run or resume or nproc_per_node is not None)
        return
    if config is None:
        raise UserError("missing CONFIG, the run's YAML config", where="lora-train",
                        fix="lora-train CONFIG [KEY=VALUE ...]; lora-train --list-configs lists the example "
                            "configs, lora-train --init NAME copies one")
    from .console import show_plan
    from .run import distributed as dist
    from .run.config import load_config

    if resume and overwrite:
        raise UserError("--resume and --overwrite contradict each other", fix="pass one of them")
    if allow_changed_data and overwrite:
        raise UserError("--allow-changed-data is for resuming, and --overwrite starts a new run",
                        where="--allow-changed-data", fix="pass one of them")
    kept = {"allow_changed_data": True} if allow_changed_data else {}
    cfg = load_config(config, overrides or [])
    search_path = Path(config).resolve().parent
    workers = nproc_per_node or 1
    if dist.launched() and nproc_per_node:
        raise UserError("--nproc-per-node starts workers, but this process already is one (torchrun "
                        "started it)", where="--nproc-per-node", fix="leave --nproc-per-node out under torchrun")
    if memory_limit is not None and not dry_run:
        raise UserError("--memory-limit sizes the batch in a plan: it goes with --dry-run", where="--memory-limit",
                        fix="lora-train CONFIG --dry-run --memory-limit GB")
    if dry_run:             # under torchrun, rank 0 shows the plan of the whole run
        from .console import show_memory
        from .run.memory import estimate
        from .run.train import plan
        if dist.launched():
            if os.environ["RANK"] != "0":
                return
            workers = int(os.environ["WORLD_SIZE"])
        planned = plan(cfg, search_path=search_path, world=dist.World(size=workers, strategy=cfg.train.strategy))
        show_plan(planned)
        show_memory(estimate(planned), memory_limit)
    elif dist.launched():
        _train_worker(cfg, config, overrides, overwrite=overwrite, resume=resume, search_path=search_path, **kept)
    elif workers > 1:
        _launch_workers(cfg, config, overrides, workers, overwrite=overwrite, resume=resume, **kept)
    else:
        _train_here(cfg, config, overrides, overwrite=overwrite, resume=resume, search_path=search_path, **kept)


def _examples_command(dest: Optional[Path], extra: Optional[List[str]], list_configs: bool,
                      name: Optional[str], *, overwrite: bool, others: bool) -> None:
    """--list-configs, or --init NAME [DIR]."""
    from .console import show_examples, show_init
    from .examples import init_example, list_examples

    option = "--list-configs" if list_configs else "--init"
    if others or extra or (list_configs and (name is not None or dest is not None or overwrite)):
        raise UserError(f"{option} does not combine with other arguments or options", where=option,
                        fix="run lora-train --list-configs, or lora-train --init NAME [DIR] [--overwrite]")
    if list_configs:
        show_examples(list_examples())
    else:
        show_init(init_example(name, dest or Path("."), overwrite=overwrite))


def _launch_workers(cfg, config: Path, overrides, workers: int, *, overwrite: bool, resume: bool,
                    allow_changed_data: bool = False) -> None:
    """Start ``workers`` copies of this command on this machine; exit as the run ended."""
    from .console import show_error
    from .run.checkpoint import checkpoints
    from .run.launch import launch

    flags = [("--overwrite", overwrite), ("--resume", resume), ("--allow-changed-data", allow_changed_data)]
    args = [str(config), *(overrides or []), *(flag for flag, on in flags if on)]
    code, problem = launch(args, workers, lambda: _resume_command(config, overrides, workers)
                           if checkpoints(cfg.output_dir) else None)
    if problem is not None:
        show_error(problem)
    raise typer.Exit(code)


def _train_here(cfg, config: Path, overrides, *, world=None, **kwargs) -> None:
    from .console import ProgressReporter, show_interrupted, show_train_result
    from .run.distributed import SINGLE
    from .run.train import Interrupted, SaveError, train

    world = world or SINGLE
    try:
        result = train(cfg, reporter=ProgressReporter(), world=world, config_file=str(config), **kwargs)
    except Interrupted as stop:
        if world.is_main:
            show_interrupted(stop, resume_command=_resume_command(config, overrides, world.size))
        raise typer.Exit(stop.exit_code) from None
    except SaveError as exc:
        if exc.kept is not None:
            exc.fix = ("fix the cause, then write the adapter from that copy with: "
                       + _resume_command(config, overrides, world.size))
        raise
    if world.is_main:
        show_train_result(result)


def _train_worker(cfg, config: Path, overrides, **kwargs) -> None:
    """One worker of a torchrun (or --nproc-per-node) run. Rank 0 reports; a worker that
    stops because another failed says so in one line and exits with PEER_FAILED."""
    from .console import err, show_error
    from .run import distributed as dist
    from .run.build import resolve_device

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


MERGE_COMMANDS = (
    "lora-merge data/quickstart/base.safetensors runs/quickstart/adapter",
    "lora-merge data/quickstart/base.safetensors runs/quickstart/adapter -o merged.safetensors --verify",
    "lora-merge base.pt runs/a/adapter runs/b/adapter --weights 0.7,0.3 --dtype bfloat16",
    "lora-merge models/SmolLM2-135M-Instruct runs/peft-adapter --verify --data held-out.jsonl",
)
MERGE_EXAMPLES = _examples(*MERGE_COMMANDS)

EVAL_COMMANDS = (
    "lora-eval runs/quickstart/adapter",
    "lora-eval configs/quickstart.yaml --json",
    "lora-eval runs/quickstart/adapter --merged data/quickstart/base-merged.safetensors",
    "lora-eval runs/quickstart/adapter --data data/quickstart/eval.jsonl --batch-size 64",
    "lora-eval copied/adapter --base data/quickstart/base.safetensors",
    "lora-eval runs/mine/adapter --model-code my_models:TinyNet --model-path ~/project",
)
EVAL_EXAMPLES = _examples(*EVAL_COMMANDS)


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
    weights: Optional[List[str]] = typer.Option(None, "--weights", metavar="W1,W2,...",
                                                help="One weight per adapter, in order, as one comma-separated "
                                                "list: --weights 0.7,0.3 (default 1 each).", show_default=False),
    verify: bool = typer.Option(False, "--verify", help="Check merged outputs against base+adapter on held-out data."),
    data: Optional[str] = typer.Option(None, "--data", help="Inputs for --verify (default: the data the adapter "
                                       "names)."),
    ignore_fingerprint: bool = typer.Option(False, "--ignore-fingerprint",
                                            help="Merge even if the base differs from the adapter's."),
    model_code: Optional[str] = _CODE,
    model_path: Optional[str] = _CODE_PATH,
    trust_adapter_code: bool = _TRUST,
    version: bool = _version_option(),
) -> None:
    """Fold LoRA adapters into base weights: W' = W + weight * (alpha/r) * B @ A."""
    from .console import show_merge, show_model_code, show_verification
    from .lora.adapter import read_adapter
    from .lora.merge_files import merge_checkpoint
    from .run.compare import prepare_verification
    from .run.meta import CodeChoice
    from .run.meta import model_code as allowed_code

    factors = _parse_weights(adapters, weights)
    if dtype is not None and dtype not in DTYPES:
        raise UserError(f"unknown dtype {dtype!r}", where="--dtype", fix=f"use {', '.join(DTYPES)}")
    if verify and (len(adapters) > 1 or (factors and factors != [1.0])):
        raise UserError("--verify checks one adapter at weight 1", where="--verify",
                        fix="merge and verify adapters one at a time")
    choice = CodeChoice(model_code=model_code, model_path=model_path, trust_adapter_code=trust_adapter_code)
    if choice.given and not verify:
        raise UserError(f"{' and '.join(choice.given)} only matter with --verify (merging imports no model code)",
                        where=choice.given[0], fix="add --verify, or leave them out")
    loaded = [read_adapter(a) for a in adapters]
    code = allowed_code(loaded[0], choice) if verify else None     # refused before anything is written
    if code is not None:
        show_model_code(code)
    verify_merged = prepare_verification(adapters[0], base, data=data, code=code) if verify else None
    report = merge_checkpoint(base, loaded, output, weights=factors, dtype=dtype, force=force,
                              check_base=not ignore_fingerprint)
    show_merge(report, loaded)
    if verify_merged is not None:
        result = verify_merged(report.output)
        show_verification(result)
        if not result.ok:
            raise typer.Exit(1)


def _parse_weights(adapters: List[Path], weights: Optional[List[str]]) -> Optional[List[float]]:
    """``--weights 0.7,0.3``: one comma-separated list, one finite number per adapter, in
    order. Anything else (a repeated --weights, numbers after a space, which the shell
    hands to the adapter list, a wrong count) is refused rather than guessed at."""
    if not weights:
        return None
    strays = [str(a) for a in adapters if _is_number(str(a)) and not a.exists()]
    fix = (f"write one number per adapter as one comma-separated list, e.g. --weights "
           f"{','.join(['0.5'] * max(len(adapters) - len(strays), 1))}")
    if len(weights) > 1:
        raise UserError(f"--weights given {len(weights)} times", where="--weights", fix=fix)
    if strays:
        raise UserError(f"{', '.join(strays)} after --weights {weights[0]} would be read as adapter "
                        f"path{'s' if len(strays) > 1 else ''}", where="--weights", fix=fix)
    parts = [w.strip() for w in weights[0].split(",")]
    if not all(_is_number(w) and math.isfinite(float(w)) for w in parts):
        raise UserError(f"must be finite numbers separated by commas, got {weights[0]!r}", where="--weights", fix=fix)
    if len(parts) != len(adapters):
        raise UserError(f"{len(parts)} weight{'s' if len(parts) != 1 else ''} for {len(adapters)} "
                        f"adapter{'s' if len(adapters) != 1 else ''}", where="--weights", fix=fix)
    return [float(w) for w in parts]


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
    base: Optional[str] = typer.Option(None, "--base", help="The base weights (or model directory), when they "
                                       "are no longer where the adapter says."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object instead of tables."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", min=1, help="Examples per batch."),
    ignore_fingerprint: bool = typer.Option(False, "--ignore-fingerprint",
                                            help="Load the adapter even if the base differs from its own."),
    model_code: Optional[str] = _CODE,
    model_path: Optional[str] = _CODE_PATH,
    trust_adapter_code: bool = _TRUST,
    generate: bool = typer.Option(False, "--generate", help="causal_lm: score greedy answers' exact match too."),
    plot: Optional[List[Path]] = typer.Option(None, "--plot", metavar="RUN_DIR", help="Overlay these runs' curves "
                                              "in SOURCE (a .png).", show_default=False),
    version: bool = _version_option(),
) -> None:
    """Measure the base model and base+adapter side by side on held-out data."""
    if plot:
        return plot_runs(source, plot)
    from .console import show_comparison, show_json, show_model_code
    from .run.compare import compare, model_code_for
    from .run.meta import CodeChoice

    choice = CodeChoice(model_code=model_code, model_path=model_path, trust_adapter_code=trust_adapter_code)
    code = model_code_for(source, choice)
    if code is not None:
        show_model_code(code)
    result = compare(source, data=data, merged=merged, base=base, batch_size=batch_size,
                     check_base=not ignore_fingerprint, code=code)
    if generate:
        return eval_generation(result, source, as_json, data=data, merged=merged, base=base, code=code,
                               batch_size=batch_size or 16, check_base=not ignore_fingerprint)
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


@app.callback()
def _group(version: bool = _version_option()) -> None:
    """lora-cli: LoRA fine-tuning from one YAML file."""


app.command("train", epilog=TRAIN_EXAMPLES)(train_command)
app.command("merge", epilog=MERGE_EXAMPLES)(merge_command)
app.command("eval", epilog=EVAL_EXAMPLES)(eval_command)
generate_app = _app("Complete prompts with a trained adapter.")
generate_app.command(epilog=GENERATE_EXAMPLES)(generate_command)
app.command("generate", epilog=GENERATE_EXAMPLES)(generate_command)


def main() -> None:
    app()
