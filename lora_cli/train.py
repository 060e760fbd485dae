"""The training loop: one process, the trainable tensors only.

    for each optimizer step:
        grad_accum micro-batches: loss = task loss / micro-batches, backward
        clip the gradient norm, optimizer step, schedule step, zero grads (set to None)

The data order of epoch e is a permutation that depends only on (seed, e). The loop
reports through a :class:`Reporter` (the CLI draws the progress display) and writes
``metrics.jsonl``; it never prints.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import torch

from . import data as datalib
from .adapter import WEIGHTS_NAME, save_adapter
from .config import Config, dump_config
from .errors import UserError
from .evaluate import evaluate, forward, loss_fn
from .inject import AdaptSummary, summarize
from .pipeline import Built, adapter_metadata, autocast_for, batches, build, resolve_device

OWNED = ("adapter", "config.yaml", "metrics.jsonl")   # what a run writes into output_dir


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
            target = path / name
            if target.is_dir():
                shutil.rmtree(target)
            elif target.exists():
                target.unlink()
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / ".write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as exc:
        raise UserError(f"output_dir cannot be written: {exc.strerror}", where=str(path),
                        fix="choose a folder you can write to") from None


def train(cfg: Config, *, reporter: Reporter | None = None, overwrite: bool = False,
          search_path: str | os.PathLike | None = None, prepared: Plan | None = None) -> TrainResult:
    """Train the adapter ``cfg`` describes and write it to ``cfg.output_dir``."""
    reporter = reporter or _Silent()
    p = prepared or plan(cfg, search_path=search_path)
    out = Path(cfg.output_dir)
    prepare_output_dir(out, overwrite)
    (out / "config.yaml").write_text(dump_config(cfg))

    model, data, device, t = p.built.model, p.built.data, p.device, cfg.train
    model.to(device)
    params = [q for q in model.parameters() if q.requires_grad]
    optimizer = make_optimizer(cfg, params)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, total=p.total_steps, warmup=t.warmup_steps, kind=t.scheduler))
    autocast = autocast_for(device, cfg.dtype)
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.dtype == "float16" and device.type == "cuda")
    pad = data.tokenizer.pad_id if data.tokenizer is not None else None

    def run_eval(step: int, epoch: float) -> dict:
        order = torch.arange(len(data.eval))
        metrics = evaluate(model, batches(data.eval, order, t.batch_size, pad), cfg.task,
                           num_classes=data.num_classes, device=device, autocast=autocast)
        row = {"step": step, "epoch": round(epoch, 4), **{f"eval_{k}": v for k, v in metrics.items()
                                                         if k not in ("confusion", "n")}}
        log.write(json.dumps(row) + "\n")
        log.flush()
        reporter.evaluated(row)
        return metrics

    torch.manual_seed(cfg.seed)
    started = time.perf_counter()
    step, epoch, eval_base, eval_final, last_loss = 0, 0, None, None, None
    window_loss, window_items, window_start = 0.0, 0, time.perf_counter()
    model.train()
    with open(out / "metrics.jsonl", "w") as log:
        reporter.start(p)
        if data.eval is not None:
            eval_base = eval_final = run_eval(0, 0.0)
        while step < p.total_steps:
            order = datalib.epoch_order(len(data.train), seed=cfg.seed, epoch=epoch)
            micro = batches(data.train, order, t.batch_size, pad)
            for _ in range(p.steps_per_epoch):
                group = [b for _, b in zip(range(t.grad_accum), micro)]
                loss_sum = 0.0
                for inputs, target in group:
                    inputs, target = inputs.to(device), target.to(device)
                    with autocast():
                        loss = loss_fn(cfg.task, forward(model, inputs), target) / len(group)
                    scaler.scale(loss).backward()
                    loss_sum += float(loss.detach())
                    window_items += inputs.numel() if p.unit == "tokens" else inputs.shape[0]
                if not math.isfinite(loss_sum):
                    raise TrainingError(f"the loss became {loss_sum} at step {step + 1}",
                                        where="train.lr", fix="lower train.lr, or use dtype: float32")
                scaler.unscale_(optimizer)
                grad_norm = torch.nn.utils.clip_grad_norm_(params, t.clip_grad_norm or float("inf"))
                scaler.step(optimizer)
                scaler.update()
                schedule.step()
                optimizer.zero_grad(set_to_none=True)
                step += 1
                window_loss += loss_sum
                row = None
                if step % t.log_every == 0 or step == p.total_steps:
                    elapsed = time.perf_counter() - window_start
                    n_steps = (step - 1) % t.log_every + 1
                    last_loss = window_loss / n_steps
                    row = {"step": step, "epoch": round(step / p.steps_per_epoch, 4),
                           "loss": last_loss, "lr": schedule.get_last_lr()[0], "grad_norm": float(grad_norm),
                           f"{p.unit}_per_s": window_items / elapsed if elapsed > 0 else None}
                    log.write(json.dumps(row) + "\n")
                    log.flush()
                    window_loss, window_items, window_start = 0.0, 0, time.perf_counter()
                reporter.step(step, epoch, row)
                if data.eval is not None and t.eval_every and step % t.eval_every == 0:
                    eval_final = run_eval(step, step / p.steps_per_epoch)
                if step >= p.total_steps:
                    break
            epoch += 1
            if data.eval is not None and not t.eval_every:
                eval_final = run_eval(step, step / p.steps_per_epoch)
        if data.eval is not None and t.eval_every and step % t.eval_every:
            eval_final = run_eval(step, step / p.steps_per_epoch)
        reporter.finish()
    seconds = time.perf_counter() - started

    model.to("cpu")
    adapter_dir = save_adapter(model, out / "adapter", metadata=adapter_metadata(cfg, p.built))
    base = cfg.model.base
    return TrainResult(output_dir=out, adapter_dir=adapter_dir, steps=step, epochs=step / p.steps_per_epoch,
                       seconds=seconds, train_loss=last_loss, eval_base=eval_base, eval_final=eval_final,
                       summary=p.summary, adapter_bytes=(adapter_dir / WEIGHTS_NAME).stat().st_size,
                       base_bytes=Path(base).stat().st_size if base else None, notes=p.built.notes)

