"""The training loop: one process, the trainable tensors only.

    for each optimizer step:
        grad_accum micro-batches: loss = task loss / micro-batches, backward
        clip the gradient norm, optimizer step, schedule step, zero grads (set to None)

The data order of epoch e is a permutation that depends only on (seed, e). The loop
reports through a :class:`Reporter` (the CLI draws the progress display) and writes
``metrics.jsonl``; it never prints.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import torch

from . import checkpoint as ckpt
from . import data as datalib
from .adapter import WEIGHTS_NAME, save_adapter
from .config import Config, config_to_dict, dump_config
from .errors import UserError
from .evaluate import evaluate, forward, loss_fn
from .files import remove, write_atomic
from .fused import shared_dropout
from .inject import AdaptSummary, summarize
from .pipeline import Built, adapter_metadata, autocast_for, batches, build, peft_fields, resolve_device

OWNED = ("adapter", "config.yaml", "metrics.jsonl", ckpt.DIRNAME)   # what a run writes into output_dir


class TrainingError(UserError):
    """Training cannot go on (a non-finite loss, say)."""


class Reporter(Protocol):
    """Where the loop sends progress; the console implements it."""

    def start(self, plan: "Plan") -> None: ...
    def step(self, step: int, epoch: int, row: dict | None) -> None: ...
    def evaluated(self, row: dict) -> None: ...
    def finish(self) -> None: ...


class _Silent:
    def start(self, plan): pass
    def step(self, step, epoch, row): pass
    def evaluated(self, row): pass
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
    epochs: int

    @property
    def unit(self) -> str:
        return "tokens" if self.cfg.task == "causal_lm" else "samples"


@dataclass
class TrainResult:
    """What a finished run produced and measured."""

    output_dir: Path
    adapter_dir: Path
    steps: int
    epochs: float
    seconds: float
    train_loss: float | None
    eval_base: dict | None
    eval_final: dict | None
    summary: AdaptSummary
    adapter_bytes: int
    base_bytes: int | None
    notes: list[str] = field(default_factory=list)


def plan(cfg: Config, *, search_path: str | os.PathLike | None = None) -> Plan:
    """Build everything a run needs and work out its length; nothing is written."""
    built = build(cfg, search_path=search_path)
    device = resolve_device(cfg.device)
    t = cfg.train
    per_epoch = math.ceil(datalib.num_batches(len(built.data.train), t.batch_size) / t.grad_accum)
    total = t.max_steps or t.epochs * per_epoch
    return Plan(cfg=cfg, built=built, device=device, summary=summarize(built.model),
                steps_per_epoch=per_epoch, total_steps=total, epochs=math.ceil(total / per_epoch))


def make_optimizer(cfg: Config, params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
    t = cfg.train
    if t.optimizer == "sgd":
        return torch.optim.SGD(params, lr=t.lr, weight_decay=t.weight_decay, foreach=True)
    cls = torch.optim.AdamW if t.optimizer == "adamw" else torch.optim.Adam
    return cls(params, lr=t.lr, weight_decay=t.weight_decay, foreach=True)


def lr_factor(step: int, *, total: int, warmup: int, kind: str) -> float:
    """Multiplier of the peak lr at ``step``: linear warmup, then cosine/linear decay to 0."""
    if step < warmup:
        return (step + 1) / (warmup + 1)
    if kind == "constant":
        return 1.0
    progress = (step - warmup) / max(1, total - warmup)
    if kind == "linear":
        return max(0.0, 1.0 - progress)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def prepare_output_dir(path: Path, overwrite: bool) -> None:
    """Refuse a non-empty output_dir unless ``overwrite``; then remove only what a run owns."""
    if path.exists() and not path.is_dir():
        raise UserError("output_dir exists and is a file", where=str(path), fix="choose another output_dir")
    if path.is_dir() and any(path.iterdir()):
        if not overwrite:
            raise UserError("output_dir already exists and is not empty", where=str(path),
                            fix="pass --overwrite to replace its run, or set output_dir=<new folder>")
        for name in OWNED:
            remove(path / name)
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / ".write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as exc:
        raise UserError(f"output_dir cannot be written: {exc.strerror}", where=str(path),
                        fix="choose a folder you can write to") from None


class Interrupted(Exception):
    """SIGINT or SIGTERM arrived: the current step was finished and checkpointed."""

    def __init__(self, signum: int, step: int, checkpoint: Path):
        super().__init__(f"interrupted by signal {signum} after step {step}")
        self.signum, self.step, self.checkpoint = signum, step, checkpoint

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


# Config fields a resumed run may change; any other change is refused.
RESUMABLE_CHANGES = ("device", "train.epochs", "train.max_steps", "train.log_every", "train.eval_every",
                     "train.save_every", "train.keep_last", "train.resume", "train.on_nan")


def _check_resume_config(saved: dict, cfg: Config, where: Path) -> list[str]:
    """Refuse config changes that cannot happen mid-run; return notes on allowed ones."""
    from .config import config_from_dict, diff_fields

    old = config_from_dict(saved, source=str(where), check_files=False)
    changed = diff_fields(old, cfg)
    fixed = [f for f in changed if f not in RESUMABLE_CHANGES]
    if fixed:
        raise UserError(f"cannot resume with a changed {', '.join(fixed)}: the checkpoint was trained "
                        "with other values", where=str(where),
                        fix="restore those config values, or start a new run with --overwrite")
    return [f"resuming with a changed {f}" for f in changed]


@contextlib.contextmanager
def _stop_on_signals():
    """Record SIGINT/SIGTERM instead of dying mid-step; a second one stops at once."""
    received: list[int] = []

    def handler(signum, frame):
        if received:
            raise KeyboardInterrupt
        received.append(signum)

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
          search_path: str | os.PathLike | None = None, prepared: Plan | None = None) -> TrainResult:
    """Train the adapter ``cfg`` describes and write it to ``cfg.output_dir``.

    With ``resume`` (or ``train.resume: auto``) the run continues from the newest
    complete checkpoint in output_dir and ends exactly as an uninterrupted run would.
    """
    reporter = reporter or _Silent()
    out = Path(cfg.output_dir)
    start_from = None
    if resume or cfg.train.resume == "auto":
        ckpt.clean_partial(out)
        found = ckpt.checkpoints(out)
        if found:
            start_from = found[-1]
        elif resume:
            raise UserError("no complete checkpoint to resume from", where=str(out / ckpt.DIRNAME),
                            fix="run without --resume; set train.save_every to write checkpoints")
    notes: list[str] = []
    if start_from is not None:
        saved = json.loads((start_from.path / "trainer_state.json").read_text())["config"]
        notes = _check_resume_config(saved, cfg, start_from.path)
    p = prepared or plan(cfg, search_path=search_path)
    if start_from is None:
        prepare_output_dir(out, overwrite)
        write_atomic(out / "config.yaml", lambda f: f.write(dump_config(cfg).encode()))

    model, data, device, t = p.built.model, p.built.data, p.device, cfg.train
    model.to(device)
    params = [q for q in model.parameters() if q.requires_grad]
    optimizer = make_optimizer(cfg, params)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, total=p.total_steps, warmup=t.warmup_steps, kind=t.scheduler))
    autocast = autocast_for(device, cfg.dtype)
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.dtype == "float16" and device.type == "cuda")
    pad = data.tokenizer.pad_id if data.tokenizer is not None else None
    metadata = adapter_metadata(cfg, p.built)
    saved_config = config_to_dict(cfg)

    torch.manual_seed(cfg.seed)
    loop = ckpt.LoopState()
    if start_from is not None:
        loop = ckpt.load_checkpoint(start_from, model, optimizer=optimizer, schedule=schedule, scaler=scaler).loop
        ckpt.trim_metrics(out / "metrics.jsonl", loop.step)
        notes.insert(0, f"resuming from {start_from.path} (step {loop.step})")
    p.built.notes.extend(notes)

    def log_row(row: dict) -> None:
        log.write(json.dumps(row) + "\n")
        log.flush()

    def run_eval() -> dict:
        order = torch.arange(len(data.eval))
        metrics = evaluate(model, batches(data.eval, order, t.batch_size, pad), cfg.task,
                           num_classes=data.num_classes, device=device, autocast=autocast)
        row = {"step": loop.step, "epoch": round(loop.step / p.steps_per_epoch, 4),
               **{f"eval_{k}": v for k, v in metrics.items() if k not in ("confusion", "n")}}
        log_row(row)
        reporter.evaluated(row)
        loop.last_eval_step = loop.step
        return metrics

    def checkpoint() -> Path:
        return ckpt.save_checkpoint(out, model, loop=loop, optimizer=optimizer, schedule=schedule, scaler=scaler,
                                    config=saved_config, metadata=metadata, keep_last=t.keep_last)

    started = time.perf_counter()
    window_start = time.perf_counter()
    model.train()
    with open(out / "metrics.jsonl", "a") as log, _stop_on_signals() as received:
        reporter.start(p)
        if data.eval is not None and loop.step == 0:
            loop.eval_base = loop.eval_final = run_eval()
        while loop.step < p.total_steps:
            order = datalib.epoch_order(len(data.train), seed=cfg.seed, epoch=loop.epoch)
            done = loop.step_in_epoch * t.grad_accum * t.batch_size     # examples this epoch already saw
            micro = batches(data.train, order[done:], t.batch_size, pad)
            while loop.step < p.total_steps:
                group = [b for _, b in zip(range(t.grad_accum), micro)]
                loss_sum = 0.0
                for inputs, target in group:
                    inputs, target = inputs.to(device), target.to(device)
                    with autocast():
                        loss = loss_fn(cfg.task, forward(model, inputs), target) / len(group)
                    scaler.scale(loss).backward()
                    loss_sum += float(loss.detach())
                    loop.window_items += inputs.numel() if p.unit == "tokens" else inputs.shape[0]
                scaler.unscale_(optimizer)
                grad_norm = float(torch.nn.utils.clip_grad_norm_(params, t.clip_grad_norm or float("inf")))
                finite = math.isfinite(loss_sum) and (scaler.is_enabled() or math.isfinite(grad_norm))
                if not finite and t.on_nan == "stop":
                    last = ckpt.checkpoints(out)
                    kept = f"; the last good checkpoint is {last[-1].path}" if last else ""
                    raise TrainingError(
                        f"the {'loss' if not math.isfinite(loss_sum) else 'gradient norm'} became non-finite "
                        f"at step {loop.step + 1}{kept}", where="train",
                        fix="lower train.lr, set train.clip_grad_norm, use dtype: float32, "
                            "or train.on_nan: skip to skip such steps")
                if finite:
                    scaler.step(optimizer)
                    loop.window_loss += loss_sum
                else:
                    loop.skipped += 1
                scaler.update()
                schedule.step()
                optimizer.zero_grad(set_to_none=True)
                loop.step += 1
                loop.step_in_epoch += 1
                row = None
                if loop.step % t.log_every == 0 or loop.step == p.total_steps:
                    elapsed = time.perf_counter() - window_start
                    n_steps = (loop.step - 1) % t.log_every + 1
                    loop.last_loss = loop.window_loss / n_steps
                    row = {"step": loop.step, "epoch": round(loop.step / p.steps_per_epoch, 4),
                           "loss": loop.last_loss, "lr": schedule.get_last_lr()[0], "grad_norm": grad_norm,
                           f"{p.unit}_per_s": loop.window_items / elapsed if elapsed > 0 else None}
                    if loop.skipped:
                        row["skipped_steps"] = loop.skipped
                    log_row(row)
                    loop.window_loss, loop.window_items, window_start = 0.0, 0, time.perf_counter()
                reporter.step(loop.step, loop.epoch, row)
                if data.eval is not None and t.eval_every and loop.step % t.eval_every == 0:
                    loop.eval_final = run_eval()
                epoch_done = loop.step_in_epoch == p.steps_per_epoch
                if epoch_done:
                    loop.epoch, loop.step_in_epoch = loop.epoch + 1, 0
                    if data.eval is not None and not t.eval_every:
                        loop.eval_final = run_eval()
                saved_at = checkpoint() if t.save_every and loop.step % t.save_every == 0 else None
                if received:
                    reporter.finish()
                    raise Interrupted(received[0], loop.step, saved_at or checkpoint())
                if epoch_done:
                    break
        if data.eval is not None and loop.last_eval_step != loop.step:
            loop.eval_final = run_eval()
        reporter.finish()
    shared_dropout.clear()   # it holds the last dropped activation
    seconds = time.perf_counter() - started

    model.to("cpu")
    adapter_dir = save_adapter(model, out / "adapter", metadata=metadata, **peft_fields(cfg))
    base = cfg.model.base or cfg.model.hf
    return TrainResult(output_dir=out, adapter_dir=adapter_dir, steps=loop.step,
                       epochs=loop.step / p.steps_per_epoch, seconds=seconds, train_loss=loop.last_loss,
                       eval_base=loop.eval_base, eval_final=loop.eval_final, summary=p.summary,
                       adapter_bytes=(adapter_dir / WEIGHTS_NAME).stat().st_size,
                       base_bytes=_size_on_disk(base) if base else None, notes=p.built.notes)


def _size_on_disk(path: str) -> int:
    """A file's size, or the weight files' total of a model directory."""
    p = Path(path)
    if p.is_dir():
        return sum(f.stat().st_size for f in p.iterdir() if f.suffix in (".safetensors", ".bin"))
    return p.stat().st_size

