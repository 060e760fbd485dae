"""A training run, from a validated config to the adapter on disk: plan it, own its
output folder, resume it or start it, run the loop (:mod:`lora_cli.run.loop`), save.

The data order of epoch e is a permutation that
depends only on (seed, e); with W workers each reads every W-th example of it (see
:func:`lora_cli.run.distributed.epoch_share`), so a step sees batch_size x grad_accum x W
examples either way. The loop reports through a :class:`Reporter` (the CLI draws the
progress display) and writes ``metrics.jsonl``; it never prints. Only rank 0 writes files.
"""

from __future__ import annotations

import contextlib
import math
import os
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import torch

from ..errors import OutputError, UserError
from ..lora.adapter import load_adapter_weights
from ..lora.inject import AdaptSummary, summarize
from . import checkpoint as ckpt
from . import distributed as dist
from .build import Built, build, cpu_threads, resolve_device
from .config import Config
from .distributed import SINGLE, World, global_batch
from .loop import Interrupted, Run, SaveError, TrainingError, lr_factor, make_optimizer  # noqa: F401 (API)
from .output_dir import discard_output_dir, own_output_dir, start_output_dir
from .resume import check_inputs, check_position, resume_config, resume_point


class Reporter(Protocol):
    """Where the loop sends progress; the console implements it."""

    def start(self, plan: "Plan") -> None: ...
    def step(self, step: int, epoch: int, row: dict | None) -> None: ...
    def evaluated(self, row: dict) -> None: ...
    def sampled(self, rows: list[dict]) -> None: ...
    def finish(self) -> None: ...


class _Silent:
    def start(self, plan): pass
    def step(self, step, epoch, row): pass
    def evaluated(self, row): pass
    def sampled(self, rows): pass
    def finish(self): pass


@dataclass
class Plan:
    """A run before it starts: the built model and data, and how long it will be."""

    cfg: Config
    built: Built
    device: torch.device
    summary: AdaptSummary
    steps_per_epoch: int
    total_steps: int
    epochs: int                 # epochs the run touches (the last may be partial)
    world: World = SINGLE
    threads: int = 1            # torch's intra-op CPU threads on this worker

    @property
    def unit(self) -> str:
        return "tokens" if self.cfg.task == "causal_lm" else "samples"

    @property
    def global_batch(self) -> int:
        """Examples per optimizer step, over all workers."""
        return global_batch(self.cfg, self.world.size)


@dataclass
class TrainResult:
    """What a finished run produced and measured."""

    output_dir: Path
    adapter_dir: Path
    steps: int
    epochs: float
    seconds: float              # the whole loop: training steps, evaluations and checkpoints
    train_loss: float | None
    eval_base: dict | None
    eval_final: dict | None
    summary: AdaptSummary
    adapter_bytes: int
    base_bytes: int | None
    notes: list[str] = field(default_factory=list)
    world: World = SINGLE
    global_batch: int = 0
    gradient_bytes: int = 0     # per worker and optimizer step, sent into the gradient exchange
    weight_bytes: int = 0       # the model's parameters (fsdp gathers them in each forward and backward)
    eval_seconds: float = 0.0   # of ``seconds``, spent evaluating (the base's evaluation included)
    checkpoint_seconds: float = 0.0   # of ``seconds``, spent writing checkpoints
    losses: list[float] = field(default_factory=list)       # the logged train losses, in order (the sparkline)
    curves: Path | None = None        # output_dir/curves.png (None: matplotlib is not installed)
    samples_first: list[dict] = field(default_factory=list)  # eval.samples at the first evaluation (the base's)
    samples_last: list[dict] = field(default_factory=list)   # and at the last
    exact_base: dict | None = None    # eval.exact_match: match rates before training (the base's)
    exact_final: dict | None = None   # and after it

    @property
    def train_seconds(self) -> float:
        """Of ``seconds``, spent in training steps."""
        return self.seconds - self.eval_seconds - self.checkpoint_seconds


def plan(cfg: Config, *, search_path: str | os.PathLike | None = None, world: World = SINGLE) -> Plan:
    """Build everything a run needs and work out its length; nothing is written.

    An epoch is ceil(n / global batch) optimizer steps, whatever the number of workers.
    torch's intra-op threads are set for the process as train.num_threads says.
    """
    torch.set_num_threads(cpu_threads(cfg.train.num_threads))
    built = build(cfg, search_path=search_path)
    device = dist.worker_device(resolve_device(cfg.device), world)
    per_epoch = math.ceil(len(built.data.train) / global_batch(cfg, world.size))
    total = cfg.train.max_steps or cfg.train.epochs * per_epoch
    return Plan(cfg=cfg, built=built, device=device, summary=summarize(built.model), steps_per_epoch=per_epoch,
                total_steps=total, epochs=math.ceil(total / per_epoch), world=world, threads=torch.get_num_threads())


def _check_strategy(p: Plan) -> None:
    if p.world.distributed and p.world.strategy == "fsdp" and p.cfg.dtype == "float16":
        raise UserError("train.strategy fsdp cannot train in dtype float16: the loss scaler would skip a "
                        "step on some workers and not on others", where="dtype",
                        fix="use dtype: bfloat16 (or float32) with fsdp, or train.strategy: ddp")


@contextlib.contextmanager
def _stop_on_signals():
    """Record SIGINT/SIGTERM instead of dying mid-step; a second one stops at once.

    A repeat within a second counts as the same request: a worker can get one signal
    twice, from its launcher passing it on and from a job scheduler or terminal that
    signals every process of the job.
    """
    received: list[int] = []
    first: list[float] = []

    def handler(signum, frame):
        if received and time.monotonic() - first[0] > 1.0:
            raise KeyboardInterrupt
        if not received:
            received.append(signum)
            first.append(time.monotonic())

    previous = {}
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            previous[sig] = signal.signal(sig, handler)
    try:
        yield received
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def train(cfg: Config, *, reporter: Reporter | None = None, overwrite: bool = False, resume: bool = False,
          search_path: str | os.PathLike | None = None, prepared: Plan | None = None,
          world: World = SINGLE, allow_changed_data: bool = False, config_file: str | None = None) -> TrainResult:
    """Train the adapter ``cfg`` describes and write it to ``cfg.output_dir``.

    With ``resume`` (or ``train.resume: auto``) the run continues from the newest
    complete checkpoint in output_dir and ends exactly as an uninterrupted run would; it
    is refused when the data files or the base weights changed since the checkpoint,
    unless ``allow_changed_data``. Rank 0 holds output_dir's lock for the whole run, so a
    second run on the same folder stops with a UserError naming this one's PID.
    ``world`` is this worker's place in a multi-worker run (see :mod:`lora_cli.run.distributed`);
    every worker calls ``train`` and gets the same result, rank 0 writes the files.
    ``config_file`` is the YAML file ``cfg`` was read from: like the data and the base,
    it is never overwritten. torch's random generators are the caller's again afterwards.
    """
    reporter = (reporter or _Silent()) if world.is_main else _Silent()
    out = Path(cfg.output_dir)
    cuda = [torch.cuda.current_device()] if torch.cuda.is_available() and torch.cuda.is_initialized() else []
    # the run seeds torch's generators for itself (dropout masks); the caller's are as they were after it
    with dist.peer_failures(world), contextlib.ExitStack() as held, torch.random.fork_rng(devices=cuda):
        world.on_main(lambda: own_output_dir(held, out))
        start = world.on_main(lambda: resume_point(out, cfg, resume))

        def setup() -> tuple[Plan, list[str]]:
            c, notes = (cfg, []) if start is None else resume_config(start[1], cfg, world.size, start[0].path)
            p = prepared if prepared is not None and c is cfg else plan(c, search_path=search_path, world=world)
            _check_strategy(p)
            return p, notes

        p, notes = world.on_all(setup)
        inputs, changed = world.on_main(lambda: check_inputs(p.cfg, start, allow_changed_data))
        notes = [*notes, *changed]
        restored = world.on_main(lambda: ckpt.read_checkpoint(start[0])) if start else None
        created = None     # the folder this run made (None: output_dir existed, or a resume)
        if restored is None:
            read = [f for f in (config_file, p.cfg.data.train, p.cfg.data.eval, p.cfg.model.base, p.cfg.model.hf) if f]
            started, created = world.on_main(lambda: start_output_dir(out, p.cfg, overwrite, read))
            notes = [*notes, *started]
        else:
            world.on_all(lambda: (check_position(restored, p.steps_per_epoch, p.built.model),
                                  load_adapter_weights(p.built.model, restored.adapter)))
        run = Run(p, out, reporter, inputs)
        if restored is not None:
            notes = [f"resuming from {restored.path} (step {restored.loop.step})", *notes, *run.restore(restored)]
        p.built.notes.extend(notes)
        try:
            with _stop_on_signals() as received:      # a signal while saving waits for the save
                seconds = run.train_to_end(received)
                adapter_dir, adapter_bytes = run.save_adapter()
        except (OutputError, SaveError) as exc:   # a full disk: a new run with nothing to resume leaves nothing
            run.close()
            if isinstance(exc, SaveError) and exc.kept is not None:
                raise
            if world.is_main and ckpt.checkpoints(out):
                if not isinstance(exc, SaveError):          # a SaveError says how to go on already
                    exc.fix += "; then continue from the last checkpoint with --resume"
            elif restored is None and world.is_main:
                discard_output_dir(out, created)
            raise
        finally:
            run.close()
    if not world.distributed:
        p.built.model.to("cpu")
    loop, base = run.loop, p.cfg.model.base or p.cfg.model.hf
    losses, curves = _curves(out, p.built.notes) if world.is_main else ([], None)
    sampler = run.sampler
    return TrainResult(output_dir=out, adapter_dir=adapter_dir, steps=loop.step,
                       epochs=loop.step / p.steps_per_epoch, seconds=seconds, train_loss=loop.last_loss,
                       eval_base=loop.eval_base, eval_final=loop.eval_final, summary=p.summary,
                       adapter_bytes=adapter_bytes, base_bytes=_size_on_disk(base) if base else None,
                       notes=p.built.notes, world=world, global_batch=p.global_batch,
                       gradient_bytes=run.gradient_bytes, weight_bytes=run.weight_bytes,
                       eval_seconds=run.eval_seconds, checkpoint_seconds=run.checkpoint_seconds,
                       losses=losses, curves=curves, samples_first=sampler.first if sampler else [],
                       samples_last=sampler.last if sampler else [],
                       exact_base=sampler.first_scores if sampler else None,
                       exact_final=sampler.last_scores if sampler else None)


def _curves(out: Path, notes: list[str]) -> tuple[list[float], Path | None]:
    """The logged train losses, and output_dir/curves.png drawn from metrics.jsonl (None,
    with a note, without matplotlib or when it cannot be written: the adapter is saved)."""
    from .curves import read_metrics, series, write_curves
    rows = read_metrics(out)
    try:
        curves = write_curves(out)
    except OSError as exc:
        notes.append(f"curves.png not written: {exc.strerror or exc}")
        return series(rows, "loss")[1], None
    if curves is None:
        notes.append('curves.png not drawn: matplotlib is not installed (pip install "lora-cli[plot]")')
    return series(rows, "loss")[1], curves


def _size_on_disk(path: str) -> int:
    """A file's size, or the weight files' total of a model directory."""
    p = Path(path)
    if p.is_dir():
        return sum(f.stat().st_size for f in p.iterdir() if f.suffix in (".safetensors", ".bin"))
    return p.stat().st_size

