"""The training loop of one worker: a step function, and what happens after a step.

    for each optimizer step:                                       Run.step
        N = loss items (rows, or target tokens) in the step's micro-batches, on all workers
        grad_accum micro-batches: loss = summed task loss / N, backward
            (with W workers: x W, as their gradients are averaged on the last micro-batch)
        clip the gradient norm, optimizer step, schedule step, zero grads (set to None)
    after it, on its cadence:                                      Run.after_step
        log (train.log_every), evaluate (train.eval_every, or each epoch's end),
        checkpoint (train.save_every), stop (a signal, on every worker at the same step)

so a step's gradient is that of the mean loss over all its items, however they are split
into micro-batches and workers. The step leaves its loss, gradient norm and finiteness on
the device: the host reads them only on a log step, before a checkpoint or evaluation,
and at the end (``train.on_nan: skip`` must decide before each optimizer step, so it
reads every step's; one worker reads a signal every step, several agree on one at those
points). A non-finite step under ``on_nan: stop`` is found there, and the run stops
naming the step it happened at; nothing after it has been saved.
"""

from __future__ import annotations

import json
import math
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .. import data as datalib
from ..errors import UserError
from ..lora.adapter import WEIGHTS_NAME, adapter_keys, write_adapter
from ..lora.adapter_config import adapter_config
from ..lora.files import remove, write_error
from ..lora.kernel import sharing_dropout
from ..lora.loraplus import loraplus_param_groups
from . import checkpoint as ckpt
from . import distributed as dist
from . import lm_loss
from .build import autocast_for, batches
from .config import config_to_dict
from .board import Board
from .evaluate import evaluate, forward, ignore_rows, loss_fn, loss_items
from .samples import Sampler, has_heldout
from .meta import adapter_metadata, peft_fields
from .rng import rng_state, set_rng_state


class TrainingError(UserError):
    """Training cannot go on (a non-finite loss, say)."""


class SaveError(TrainingError):
    """A finished run could not write its adapter. ``kept`` is where its trained state
    went instead (``lora-train CONFIG --resume`` writes the adapter from it), or None."""

    def __init__(self, what: str, *, where: str, fix: str, kept: Path | None):
        super().__init__(what, where=where, fix=fix)
        self.kept = kept


class Interrupted(Exception):
    """SIGINT or SIGTERM arrived: the current step was finished and checkpointed."""

    def __init__(self, signum: int, step: int, checkpoint: Path):
        super().__init__(f"interrupted by signal {signum} after step {step}")
        self.signum, self.step, self.checkpoint = signum, step, checkpoint

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


def make_optimizer(cfg, params: list) -> torch.optim.Optimizer:
    """The configured optimizer over ``params`` (parameters, or parameter groups)."""
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


def head_only(task: str, model: torch.nn.Module, world) -> tuple | None:
    """Where the causal LM head is (:func:`lm_loss.head_of`) when the step may run it on
    the loss positions alone: one process, or ddp with a frozen head (fsdp shards it)."""
    where = lm_loss.head_of(model) if task == "causal_lm" else None
    if where is None or not world.distributed:
        return where
    frozen = not any(q.requires_grad for q in where[2].parameters())
    return where if world.strategy == "ddp" and frozen else None


def to_device(inputs, device: torch.device):
    """A batch's inputs on ``device``: a tensor, or a packed batch's dict of tensors."""
    if isinstance(inputs, dict):
        return {k: v.to(device) for k, v in inputs.items()}
    return inputs.to(device)


@dataclass
class Step:
    """What one optimizer step left on the device, and what the host knows of it."""

    loss: torch.Tensor          # the step's mean loss over all workers (float64, 0-d)
    grad_norm: torch.Tensor     # before clipping
    finite: torch.Tensor        # whether loss and gradient norm were finite (bool, 0-d)
    items: int                  # loss items (rows or tokens) it trained on, on this worker
    lr: float                   # the learning rate it used


class Run:
    """One run on this worker: the model as a step calls it (itself, DDP over it, or
    sharded in place), optimizer, schedule, scaler, the loop position, and the files
    rank 0 writes (metrics.jsonl, checkpoints, the adapter)."""

    def __init__(self, p, out: Path, reporter, inputs: dict | None = None):
        cfg, t, world, model = p.cfg, p.cfg.train, p.world, p.built.model
        self.p, self.cfg, self.t, self.world, self.out, self.reporter = p, cfg, t, world, out, reporter
        self.inputs = inputs                                # fingerprints of the data and base, for checkpoints
        self.data = p.built.data
        # what adapter files hold, worked out on the whole model before any sharding
        self.adapter_config = adapter_config(model, metadata=adapter_metadata(cfg, p.built), **peft_fields(cfg))
        self.keys = adapter_keys(model)                     # adapter key -> model state-dict key
        self.saved_config = config_to_dict(cfg)
        self.gradient_bytes = dist.gradient_bytes(model, world)
        self.weight_bytes = dist.weight_bytes(model)
        self.engine = dist.wrap(model, world, p.device)
        self.head = head_only(cfg.task, model, world)       # causal LM: the head runs only where the loss is
        self.params = [q for q in self.engine.parameters() if q.requires_grad]
        self.optimizer = make_optimizer(cfg, self.params if t.loraplus_lr_ratio is None else loraplus_param_groups(
            dist.inner(self.engine), t.lr, t.loraplus_lr_ratio))
        self.schedule = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: lr_factor(s, total=p.total_steps, warmup=t.warmup_steps, kind=t.scheduler))
        self.autocast = autocast_for(p.device, cfg.dtype)
        self.scaler = torch.amp.GradScaler(p.device.type, enabled=cfg.dtype == "float16" and p.device.type == "cuda")
        self.pad = self.data.tokenizer.pad_id if self.data.tokenizer is not None else None
        self.loop = ckpt.LoopState()
        self.log = None                                     # metrics.jsonl, opened when the loop starts
        self.eval_seconds = self.checkpoint_seconds = 0.0   # time spent beside the training steps
        self.window: list[Step] = []                        # the steps since the last log row, not yet read
        # eval.samples (one process: generation needs the whole model) and log.tensorboard, on rank 0
        self.sampler = None if world.distributed else Sampler.of(cfg, self.data.tokenizer, out)
        if world.distributed and world.is_main and (cfg.eval.samples or cfg.eval.exact_match):
            p.built.notes.append("eval.samples and eval.exact_match are skipped with several workers: run "
                                 "lora-generate or lora-eval --generate on the adapter")
        elif (cfg.eval.samples or cfg.eval.exact_match) and cfg.task == "causal_lm" and not has_heldout(cfg):
            p.built.notes.append("eval.samples and eval.exact_match are skipped: there is no held-out data "
                                 "(set data.eval or data.val_split to have them)")
        self.board = Board(out / "tensorboard") if cfg.log.tensorboard and world.is_main else None
        torch.manual_seed(cfg.seed + world.rank)            # dropout masks differ between workers

    def restore(self, restored: ckpt.Restored) -> list[str]:
        """Continue from a checkpoint (its adapter is already in the model); notes."""
        from .resume import states_for

        notes = []
        optimizer, schedule, scaler = states_for(restored, self.optimizer, self.schedule, self.scaler)
        self.optimizer.load_state_dict(dist.shard_optimizer_state(self.optimizer, optimizer))
        self.schedule.load_state_dict(schedule)
        if scaler is not None:
            self.scaler.load_state_dict(scaler)
        self.loop = restored.loop
        if len(restored.rng) == self.world.size:
            set_rng_state(restored.rng[self.world.rank])
        else:
            torch.manual_seed(self.cfg.seed + self.world.rank + 7919 * self.loop.step)
            if self.cfg.lora.dropout > 0:
                notes.append(f"the checkpoint holds the random state of {len(restored.rng)} worker(s), not "
                             f"{self.world.size}: dropout masks from here on differ from an uninterrupted run")
        self.world.on_main(lambda: ckpt.trim_metrics(self.out / "metrics.jsonl", self.loop.step))
        return notes

    # --- the loop ------------------------------------------------------------------------

    def train_to_end(self, received: list[int]) -> float:
        """Train to the last step; return the seconds it took. Raises Interrupted when a
        signal arrived on any worker (after checkpointing), TrainingError on a non-finite loss."""
        p, t, loop, data = self.p, self.t, self.loop, self.data
        if self.world.is_main:
            try:
                self.log = open(self.out / "metrics.jsonl", "a")    # noqa: SIM115 (closed by close())
            except OSError as exc:
                raise write_error(exc, self.out / "metrics.jsonl", "metrics.jsonl") from None
        started = time.perf_counter()
        self.engine.train()
        self.reporter.start(p)
        if data.eval is not None and loop.step == 0:
            loop.eval_base = loop.eval_final = self.evaluate()
        self.window_start = time.perf_counter()     # the logged rates count training steps only
        while loop.step < p.total_steps:
            order = self.epoch_order(loop.epoch)
            mine, keep = dist.epoch_share(order, self.world, done=loop.step_in_epoch * p.global_batch)
            micro = zip(batches(data.train, mine, t.batch_size, self.pad), keep.split(t.batch_size))
            epoch_done = False
            while loop.step < p.total_steps and not epoch_done:
                self.window.append(self.step([b for _, b in zip(range(t.grad_accum), micro)]))
                loop.step += 1
                loop.step_in_epoch += 1
                epoch_done = loop.step_in_epoch == p.steps_per_epoch
                self.after_step(epoch_done, received)
        if data.eval is not None and loop.last_eval_step != loop.step:
            loop.eval_final = self.evaluate()
        if self.sampler is not None:
            self.sampler.finish(dist.inner(self.engine), self.autocast)
        self.reporter.finish()
        return time.perf_counter() - started

    def epoch_order(self, epoch: int) -> torch.Tensor:
        """The training examples' order in ``epoch``; with data.group_by_length each
        micro-batch (on every worker) holds examples of similar length."""
        train, sizes = self.data.train, None
        if self.cfg.data.group_by_length:
            sizes = datalib.lengths(train)
        if sizes is None:
            return datalib.epoch_order(len(train), seed=self.cfg.seed, epoch=epoch)
        return datalib.length_grouped_order(sizes, seed=self.cfg.seed, epoch=epoch,
                                            group=self.t.batch_size * self.world.size)

    def step(self, group: list[tuple[tuple[torch.Tensor, torch.Tensor], torch.Tensor]]) -> Step:
        """One optimizer step over ``group``'s micro-batches (this worker's share: each a
        batch and which of its rows count). Nothing is read back to the host, except
        under ``train.on_nan: skip``, which must know before the optimizer steps."""
        cfg, t, world, scaler, device = self.cfg, self.t, self.world, self.scaler, self.p.device
        lr = self.optimizer.param_groups[0]["lr"]            # the schedule moves it on after this step
        group = [(x, ignore_rows(cfg.task, y, keep), keep) for (x, y), keep in group]
        count = sum(loss_items(cfg.task, y) for _, y, _ in group)                # targets are on the host
        if world.distributed:      # the count over all workers stays on the device: no host sync
            total = world.sum_tensor(torch.tensor(float(count), dtype=torch.float64, device=device))
            scale = (world.size / total.clamp(min=1.0)).float()
        else:
            scale = 1.0 / max(1.0, count)
        loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        items = 0
        for i, (inputs, target, keep) in enumerate(group):
            ids = inputs["input_ids"] if isinstance(inputs, dict) else inputs      # on the host
            items += ids[keep].numel() if self.p.unit == "tokens" else int(keep.sum())
            inputs = to_device(inputs, device)
            with dist.gradient_sync(self.engine, world, enabled=i == len(group) - 1):
                with self.autocast(), sharing_dropout(cfg.lora.dropout_shared):
                    if self.head is not None:
                        loss = lm_loss.loss_sum(self.engine, self.head, inputs, target, device) * scale
                    else:
                        output = forward(self.engine, inputs)
                        loss = loss_fn(cfg.task, output, target.to(device), reduction="sum") * scale
                scaler.scale(loss).backward()
            loss_sum += loss.detach().double() / world.size
        scaler.unscale_(self.optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, t.clip_grad_norm or float("inf"))
        grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm
        loss_sum = world.sum_tensor(loss_sum)
        finite = torch.isfinite(loss_sum) & (torch.isfinite(grad_norm) | scaler.is_enabled())
        done = Step(loss=loss_sum, grad_norm=grad_norm.detach(), finite=finite, items=items, lr=lr)
        if t.on_nan == "skip" and not bool(finite):          # the one per-step read, asked for
            self.loop.skipped += 1
        else:
            self._optimizer_step()
        scaler.update()
        self.schedule.step()
        self.optimizer.zero_grad(set_to_none=True)
        return done

    def _optimizer_step(self) -> None:
        try:
            self.scaler.step(self.optimizer)
        except RuntimeError as exc:          # e.g. Adam's first step at lr 1e38: lr / 0.1 > float32
            if "overflow" not in str(exc):
                raise
            raise TrainingError(f"the optimizer step overflowed at step {self.loop.step + 1} ({exc})",
                                where="train.lr", fix=f"lower train.lr (it is {self.t.lr:g})") from None

    def after_step(self, epoch_done: bool, received: list[int]) -> None:
        """The cadence after a step: log, evaluate, checkpoint, stop on a signal. One
        worker sees a signal at once; several agree on one where they meet anyway (a log,
        evaluation or checkpoint step), so they all stop after the same step."""
        p, t, loop, data = self.p, self.t, self.loop, self.data
        log = loop.step % t.log_every == 0 or loop.step == p.total_steps
        evaluate = data.eval is not None and (bool(t.eval_every and loop.step % t.eval_every == 0)
                                              or (epoch_done and not t.eval_every))
        save = bool(t.save_every and loop.step % t.save_every == 0)
        if epoch_done:
            loop.epoch, loop.step_in_epoch = loop.epoch + 1, 0
        meet = log or evaluate or save
        if not meet and (self.world.distributed or not received):
            self.reporter.step(loop.step, loop.epoch, None)
            return
        row = self.settle(log)
        self.reporter.step(loop.step, loop.epoch, row)
        aside = time.perf_counter()
        if evaluate:
            loop.eval_final = self.evaluate()
        saved_at = self.checkpoint() if save else None
        self.window_start += time.perf_counter() - aside     # evaluation and checkpoints are not steps
        stopping = self.world.sum([float(bool(received))])[0] > 0 if self.world.distributed else bool(received)
        if stopping:
            self.reporter.finish()
            raise Interrupted(received[0] if received else signal.SIGTERM, loop.step, saved_at or self.checkpoint())

    def settle(self, log: bool) -> dict | None:
        """Read the steps since the last read back to the host: stop on a non-finite one
        (``on_nan: stop``), add them to the log window, and with ``log`` write the row."""
        p, t, loop = self.p, self.t, self.loop
        steps, self.window = self.window, []
        if steps:
            values = torch.stack([torch.stack([s.loss.double().cpu(), s.grad_norm.double().cpu(),
                                               s.finite.double().cpu()]) for s in steps]).tolist()
            first = loop.step - len(steps) + 1
            for i, (loss, grad_norm, finite) in enumerate(values):
                if finite:
                    loop.window_loss += loss
                elif t.on_nan == "stop":
                    last = ckpt.checkpoints(self.out) if self.world.is_main else []
                    kept = f"; the last good checkpoint is {last[-1].path}" if last else ""
                    what = "loss" if loss != loss or abs(loss) == float("inf") else "gradient norm"
                    raise TrainingError(
                        f"the {what} became non-finite at step {first + i}{kept}", where="train",
                        fix="lower train.lr, set train.clip_grad_norm, use dtype: float32, "
                            "or train.on_nan: skip to skip such steps")
            loop.window_items += self.world.sum([sum(s.items for s in steps)])[0] if self.world.distributed \
                else sum(s.items for s in steps)
            self.last_grad_norm, self.last_lr = values[-1][1], steps[-1].lr
        if not log:
            return None
        elapsed = time.perf_counter() - self.window_start
        loop.last_loss = loop.window_loss / ((loop.step - 1) % t.log_every + 1)
        row = {"step": loop.step, "epoch": round(loop.step / p.steps_per_epoch, 4), "loss": loop.last_loss,
               "lr": self.last_lr, "grad_norm": self.last_grad_norm,
               f"{p.unit}_per_s": loop.window_items / elapsed if elapsed > 0 else None}
        if loop.skipped:
            row["skipped_steps"] = loop.skipped
        self.write_row(row)
        loop.window_loss, loop.window_items, self.window_start = 0.0, 0, time.perf_counter()
        return row

    # --- beside the steps ----------------------------------------------------------------

    def evaluate(self) -> dict:
        """Held-out metrics. ddp: each worker evaluates its share and the sums are added
        up; fsdp: every worker runs every batch, since each forward needs all shards."""
        world, data, loop = self.world, self.data, self.loop
        started = time.perf_counter()
        sharded = world.distributed and world.strategy == "ddp"
        order = datalib.by_length(data.eval)              # longest first: batches of similar length
        mine = dist.shard(order, world) if sharded else order
        metrics = evaluate(dist.inner(self.engine), batches(data.eval, mine, self.t.batch_size, self.pad),
                           self.cfg.task, num_classes=data.num_classes, device=self.p.device,
                           autocast=self.autocast, total=world.sum_tensor if sharded else None,
                           head_only=not (world.distributed and world.strategy == "fsdp"))
        row = {"step": loop.step, "epoch": round(loop.step / self.p.steps_per_epoch, 4),
               **{f"eval_{k}": v for k, v in metrics.items() if k not in ("confusion", "n")}}
        self.write_row(row)
        self.reporter.evaluated(row)
        if self.sampler is not None:
            self.reporter.sampled(self.sampler.take(dist.inner(self.engine), loop.step, self.autocast))
        self.eval_seconds += time.perf_counter() - started
        loop.last_eval_step = loop.step
        return metrics

    def write_row(self, row: dict) -> None:
        if self.log is not None:
            try:
                self.log.write(json.dumps(row) + "\n")
                self.log.flush()
                if self.board is not None:
                    self.board.add(row)
            except OSError as exc:
                raise write_error(exc, self.out / "metrics.jsonl", "metrics.jsonl") from None

    def adapter_tensors(self) -> dict[str, torch.Tensor]:
        """The adapter's tensors whole, under their file keys (every worker takes part)."""
        tensors = dist.full_tensors(self.engine, self.keys.values())
        return {k: tensors[n] for k, n in self.keys.items()}

    def trainer_state(self) -> dict:
        """Optimizer, schedule, scaler, RNG and loop state, whole (every worker takes part)."""
        return {"optimizer": dist.full_optimizer_state(self.optimizer), "schedule": self.schedule.state_dict(),
                "scaler": self.scaler.state_dict(), "rng": self.world.gather(rng_state()),
                "loop": dict(self.loop.__dict__)}

    def checkpoint(self) -> Path:
        self.settle(log=False)                # a non-finite step is never saved
        started = time.perf_counter()
        tensors, state = self.adapter_tensors(), self.trainer_state()
        path = self.world.on_main(lambda: ckpt.save_checkpoint(
            self.out, step=self.loop.step, epoch=self.loop.epoch, adapter_config=self.adapter_config,
            adapter_tensors=tensors, state=state, config=self.saved_config, workers=self.world.size,
            keep_last=self.t.keep_last, inputs=self.inputs))
        self.checkpoint_seconds += time.perf_counter() - started
        return path

    def save_adapter(self) -> tuple[Path, int]:
        """Write output_dir/adapter; its path and size in bytes. If that fails, the trained
        state is kept in output_dir/unsaved-adapter.pt (plain torch.save) and a SaveError
        says where; ``--resume`` then writes the adapter from it."""
        self.settle(log=False)
        tensors, state = self.adapter_tensors(), self.trainer_state()

        def write() -> tuple[Path, int]:
            try:
                adapter_dir = write_adapter(self.out / "adapter", self.adapter_config, tensors)
            except Exception as exc:
                cause = write_error(exc, self.out / "adapter", "the adapter") if isinstance(exc, OSError) else exc
                raise self.keep_unsaved(cause, tensors, state) from exc
            remove(self.out / ckpt.UNSAVED)        # written by an earlier try, now superseded
            return adapter_dir, (adapter_dir / WEIGHTS_NAME).stat().st_size

        return self.world.on_main(write)

    def keep_unsaved(self, exc: Exception, tensors: dict[str, torch.Tensor], state: dict) -> SaveError:
        """Keep the trained state after writing the adapter failed with ``exc``; the error to raise."""
        cause = exc.what if isinstance(exc, UserError) else f"{type(exc).__name__}: {exc}"
        where, kept_path = str(self.out / "adapter"), self.out / ckpt.UNSAVED
        try:
            kept = ckpt.save_unsaved(self.out, step=self.loop.step, epoch=self.loop.epoch,
                                     adapter_config=self.adapter_config, adapter_tensors=tensors, state=state,
                                     config=self.saved_config, workers=self.world.size)
        except Exception as again:
            last = ckpt.checkpoints(self.out)
            why = write_error(again, kept_path, "it").what.removeprefix("cannot write it: ") \
                if isinstance(again, OSError) else f"{type(again).__name__}: {again}"
            return SaveError(
                f"training finished, but the adapter could not be written ({cause}), nor a copy of its "
                f"tensors ({why})", where=where, kept=None,
                fix="fix the cause, then " + (f"run the same command with --resume to go on from {last[-1].path}"
                                              if last else "train again") + "; nothing half-written was left behind")
        return SaveError(f"training finished, but the adapter could not be written ({cause}); the trained "
                         f"tensors and the training state are kept in {kept}", where=where, kept=kept,
                         fix="fix the cause, then run the same command with --resume: it writes the adapter "
                             "from that copy")

    def close(self) -> None:
        if self.board is not None:
            self.board.close()
            self.board = None
        if self.log is not None:
            try:
                self.log.close()
            except OSError:     # its last write failed already, and said so
                pass
            self.log = None
