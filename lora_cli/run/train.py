"""The training loop over the trainable tensors, in one process or on several workers.

    for each optimizer step:
        N = loss items (rows, or target tokens) in the step's micro-batches, on all workers
        grad_accum micro-batches: loss = summed task loss / N, backward
            (with W workers: x W, as their gradients are averaged on the last micro-batch)
        clip the gradient norm, optimizer step, schedule step, zero grads (set to None)

so a step's gradient is that of the mean loss over all its items, however they are
split into micro-batches and workers. The data order of epoch e is a permutation that
depends only on (seed, e); with W workers each reads every W-th example of it (see
:func:`lora_cli.run.distributed.epoch_share`), so a step sees batch_size x grad_accum x W
examples either way. The loop reports through a :class:`Reporter` (the CLI draws the
progress display) and writes ``metrics.jsonl``; it never prints. Only rank 0 writes files.
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
from dataclasses import replace as dc_replace
from pathlib import Path
from typing import Protocol

import torch

from . import checkpoint as ckpt
from .. import data as datalib
from . import distributed as dist
from ..lora.adapter import WEIGHTS_NAME, adapter_keys, load_adapter_weights, write_adapter
from ..lora.adapter_config import adapter_config
from .config import Config, config_to_dict, dump_config
from .distributed import SINGLE, World
from ..errors import OutputError, UserError
from .evaluate import evaluate, forward, ignore_rows, loss_fn, loss_items
from ..lora.files import remove, remove_stale_temps, write_atomic, write_error
from .lock import run_lock
from ..lora.kernel import shared_dropout
from ..lora.inject import AdaptSummary, summarize
from .build import Built, autocast_for, batches, build, cpu_threads, resolve_device
from .meta import adapter_metadata, peft_fields

OWNED = ("adapter", "config.yaml", "metrics.jsonl", ckpt.DIRNAME, ckpt.UNSAVED)   # what a run writes into output_dir
LEFTOVERS = ("config.yaml", "metrics.jsonl")   # what a run leaves that ends before its first checkpoint


class TrainingError(UserError):
    """Training cannot go on (a non-finite loss, say)."""


class SaveError(TrainingError):
    """A finished run could not write its adapter. ``kept`` is where its trained state
    went instead (``lora-train CONFIG --resume`` writes the adapter from it), or None."""

    def __init__(self, what: str, *, where: str, fix: str, kept: Path | None):
        super().__init__(what, where=where, fix=fix)
        self.kept = kept


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

    @property
    def train_seconds(self) -> float:
        """Of ``seconds``, spent in training steps."""
        return self.seconds - self.eval_seconds - self.checkpoint_seconds


def global_batch(cfg: Config, workers: int) -> int:
    return cfg.train.batch_size * cfg.train.grad_accum * workers


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


def prepare_output_dir(path: Path, overwrite: bool, inputs: list[str] = ()) -> list[str]:
    """Make ``path`` ready for a new run; return notes on what was there.

    A folder that holds a run's results (its adapter, checkpoints, or the kept state of a
    run that could not write its adapter) or files lora-cli did not write is refused
    unless ``overwrite``, which removes only what a run owns. A folder holding only what a
    run that ended before its first checkpoint leaves (config.yaml, metrics.jsonl,
    temporary files, a lock file) is reused without ``overwrite``: that run produced
    nothing to lose, so a failed or interrupted first run never blocks the same command.
    A file the run reads (``inputs``: its config, data, base) is never removed or
    overwritten: an output_dir where a run would write over one is refused.
    """
    if path.exists() and not path.is_dir():
        raise UserError("output_dir exists and is a file", where=str(path), fix="choose another output_dir")
    notes = []
    if path.is_dir():
        _refuse_to_overwrite_inputs(path, inputs)
        results, foreign, leftovers = _contents(path)
        if (results or foreign) and not overwrite:
            raise _occupied(path, results, foreign)
        if overwrite:
            for name in OWNED:
                remove(path / name)
        elif leftovers:
            notes.append(f"{path} held only what a run that stopped before its first checkpoint leaves "
                         f"({', '.join(leftovers)}): starting afresh")
        for name in leftovers:
            remove(path / name)
        remove_stale_temps(path, names=OWNED)
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / ".write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as exc:
        raise UserError(f"output_dir cannot be written: {exc.strerror}", where=str(path),
                        fix="choose a folder you can write to") from None
    return notes


def _refuse_to_overwrite_inputs(path: Path, inputs: list[str]) -> None:
    """A UserError if a run writing into ``path`` would replace a file it reads: the
    user's own config.yaml, say, when output_dir is the config's folder."""
    mine = {(path / name).resolve(): name for name in OWNED}
    for file in inputs:
        target = Path(file).resolve()
        hit = mine.get(target) or next((n for p, n in mine.items() if p in target.parents), None)
        if hit:
            raise UserError(f"output_dir/{hit} is where a run writes its {hit}, and it holds {file}, which this "
                            "run reads", where=str(path), fix="set output_dir to a folder of its own")


def _contents(path: Path) -> tuple[list[str], list[str], list[str]]:
    """What an existing output_dir holds: (results of a run, files lora-cli did not
    write, leftovers of a run that stopped before its first checkpoint). Hidden files
    (temporary files, a lock) are none of these."""
    results, foreign, leftovers = [], [], []
    for entry in sorted(path.iterdir()):
        name = entry.name
        if name == ckpt.DIRNAME and entry.is_dir():     # none complete: at most a write cut short
            (results if ckpt.checkpoints(path) else leftovers).append(name)
        elif name in ("adapter", ckpt.UNSAVED):
            results.append(name)
        elif name in LEFTOVERS and entry.is_file():
            leftovers.append(name)
        elif not name.startswith("."):
            foreign.append(name)
    return results, foreign, leftovers


def _occupied(path: Path, results: list[str], foreign: list[str]) -> UserError:
    """The error for an output_dir a new run would overwrite."""
    new = "or set output_dir=<new folder>"
    if ckpt.UNSAVED in results:
        return UserError(f"output_dir holds the trained state of a run that could not write its adapter "
                         f"({path / ckpt.UNSAVED})", where=str(path),
                         fix=f"pass --resume to write the adapter from it, --overwrite to start over, {new}")
    if "adapter" in results:
        return UserError("output_dir holds a trained adapter", where=str(path),
                         fix=f"pass --overwrite to replace its run, {new}")
    if results:
        newest = ckpt.checkpoints(path)[-1].path.name
        return UserError(f"output_dir holds checkpoints of an unfinished run (newest: {newest})", where=str(path),
                         fix=f"pass --resume to continue it, --overwrite to start over, {new}")
    shown = ", ".join(foreign[:5]) + (", ..." if len(foreign) > 5 else "")
    return UserError(f"output_dir holds files lora-cli did not write: {shown}", where=str(path),
                     fix=f"pass --overwrite to write the run beside them (only lora-cli's own files are "
                         f"replaced), {new}")


class Interrupted(Exception):
    """SIGINT or SIGTERM arrived: the current step was finished and checkpointed."""

    def __init__(self, signum: int, step: int, checkpoint: Path):
        super().__init__(f"interrupted by signal {signum} after step {step}")
        self.signum, self.step, self.checkpoint = signum, step, checkpoint

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


# Config fields a resumed run may change; any other change is refused. grad_accum changes
# with the number of workers, so that the global batch stays the checkpoint's.
RESUMABLE_CHANGES = ("device", "train.epochs", "train.max_steps", "train.log_every", "train.eval_every",
                     "train.save_every", "train.keep_last", "train.resume", "train.on_nan", "train.strategy",
                     "train.num_threads")


def resume_config(info: dict, cfg: Config, workers: int, where: Path) -> tuple[Config, list[str]]:
    """The config to resume a checkpoint with (``info`` is its trainer_state.json) on
    ``workers`` workers, and notes on what changed.

    Changes that cannot happen mid-run are refused. On another number of workers the
    global batch (batch_size x grad_accum x workers) must stay the same: grad_accum is
    rescaled to keep it, or the resume is refused when no whole grad_accum does.
    """
    from .config import config_from_dict, diff_fields

    old = config_from_dict(info["config"], source=str(where), check_files=False)
    saved_workers = int(info.get("workers", 1))
    notes = []
    if saved_workers != workers:
        want = global_batch(old, saved_workers)
        if global_batch(cfg, workers) != want:
            per_step = cfg.train.batch_size * workers
            if cfg.train.grad_accum != old.train.grad_accum or want % per_step:
                how = (f"train.grad_accum {cfg.train.grad_accum} makes it "
                       f"{global_batch(cfg, workers)}" if cfg.train.grad_accum != old.train.grad_accum
                       else f"batch_size {cfg.train.batch_size} x {workers} workers does not divide {want}")
                raise UserError(
                    f"cannot resume on {workers} worker(s): the checkpoint was trained with {want} examples per "
                    f"step (batch_size {old.train.batch_size} x grad_accum {old.train.grad_accum} x "
                    f"{saved_workers} workers), and {how}", where=str(where),
                    fix=f"resume on a number of workers that divides {want // cfg.train.batch_size}, or set "
                        f"train.grad_accum so that batch_size x grad_accum x workers = {want}")
            cfg = dc_replace(cfg, train=dc_replace(cfg.train, grad_accum=want // per_step))
        notes.append(f"resuming on {workers} worker(s) instead of {saved_workers}: grad_accum "
                     f"{old.train.grad_accum} -> {cfg.train.grad_accum} keeps {want} examples per step")
    changed = [f for f in diff_fields(old, cfg) if f != "train.grad_accum" or saved_workers == workers]
    fixed = [f for f in changed if f not in RESUMABLE_CHANGES]
    if fixed:
        raise UserError(f"cannot resume with a changed {', '.join(fixed)}: the checkpoint was trained "
                        "with other values", where=str(where),
                        fix="restore those config values, or start a new run with --overwrite")
    return cfg, notes + [f"resuming with a changed {f}" for f in changed]


def _resume_point(out: Path, cfg: Config, resume: bool) -> tuple[ckpt.Checkpoint, dict] | None:
    """The newest complete checkpoint to resume from (and its trainer_state.json), if any:
    the kept state of a run that could not write its adapter comes first."""
    if not (resume or cfg.train.resume == "auto"):
        return None
    kept = ckpt.unsaved(out)
    if kept is not None:
        return kept, ckpt.read_info(kept)
    ckpt.clean_partial(out)
    found = ckpt.checkpoints(out)
    if found:
        return found[-1], ckpt.read_info(found[-1])
    if resume:
        raise UserError("no complete checkpoint to resume from", where=str(out / ckpt.DIRNAME),
                        fix="run without --resume; set train.save_every to write checkpoints")
    return None


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
    it is never overwritten.
    """
    reporter = (reporter or _Silent()) if world.is_main else _Silent()
    out = Path(cfg.output_dir)
    with dist.peer_failures(world), contextlib.ExitStack() as held:
        world.on_main(lambda: _own_output_dir(held, out))
        start = world.on_main(lambda: _resume_point(out, cfg, resume))

        def setup() -> tuple[Plan, list[str]]:
            c, notes = (cfg, []) if start is None else resume_config(start[1], cfg, world.size, start[0].path)
            p = prepared if prepared is not None and c is cfg else plan(c, search_path=search_path, world=world)
            _check_strategy(p)
            return p, notes

        p, notes = world.on_all(setup)
        inputs, changed = world.on_main(lambda: _check_inputs(p.cfg, start, allow_changed_data))
        notes = [*notes, *changed]
        restored = world.on_main(lambda: ckpt.read_checkpoint(start[0])) if start else None
        created = None     # the folder this run made (None: output_dir existed, or a resume)
        if restored is None:
            read = [f for f in (config_file, p.cfg.data.train, p.cfg.data.eval, p.cfg.model.base, p.cfg.model.hf) if f]
            started, created = world.on_main(lambda: _start_output_dir(out, p.cfg, overwrite, read))
            notes = [*notes, *started]
        else:
            world.on_all(lambda: (ckpt.check_position(restored, p.steps_per_epoch, p.built.model),
                                  load_adapter_weights(p.built.model, restored.adapter)))
        run = _Run(p, out, reporter, inputs)
        if restored is not None:
            notes = [f"resuming from {restored.path} (step {restored.loop.step})", *notes, *run.restore(restored)]
        p.built.notes.extend(notes)
        try:
            with _stop_on_signals() as received:      # a signal while saving waits for the save
                seconds = run.loop_over_data(received)
                adapter_dir, adapter_bytes = run.save_adapter()
        except (OutputError, SaveError) as exc:   # a full disk: a new run with nothing to resume leaves nothing
            run.close()
            if isinstance(exc, SaveError) and exc.kept is not None:
                raise
            if world.is_main and ckpt.checkpoints(out):
                if not isinstance(exc, SaveError):          # a SaveError says how to go on already
                    exc.fix += "; then continue from the last checkpoint with --resume"
            elif restored is None and world.is_main:
                _discard_output_dir(out, created)
            raise
        finally:
            run.close()
    if not world.distributed:
        p.built.model.to("cpu")
    loop, base = run.loop, p.cfg.model.base or p.cfg.model.hf
    return TrainResult(output_dir=out, adapter_dir=adapter_dir, steps=loop.step,
                       epochs=loop.step / p.steps_per_epoch, seconds=seconds, train_loss=loop.last_loss,
                       eval_base=loop.eval_base, eval_final=loop.eval_final, summary=p.summary,
                       adapter_bytes=adapter_bytes, base_bytes=_size_on_disk(base) if base else None,
                       notes=p.built.notes, world=world, global_batch=p.global_batch,
                       gradient_bytes=run.gradient_bytes, weight_bytes=run.weight_bytes,
                       eval_seconds=run.eval_seconds, checkpoint_seconds=run.checkpoint_seconds)


class _Run:
    """One run on this worker: the model as a step calls it (itself, DDP over it, or
    sharded in place), optimizer, schedule, scaler, the loop position, and the files
    rank 0 writes (metrics.jsonl, checkpoints, the adapter)."""

    def __init__(self, p: Plan, out: Path, reporter: Reporter, inputs: dict | None = None):
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
        self.params = [q for q in self.engine.parameters() if q.requires_grad]
        self.optimizer = make_optimizer(cfg, self.params)
        self.schedule = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: lr_factor(s, total=p.total_steps, warmup=t.warmup_steps, kind=t.scheduler))
        self.autocast = autocast_for(p.device, cfg.dtype)
        self.scaler = torch.amp.GradScaler(p.device.type, enabled=cfg.dtype == "float16" and p.device.type == "cuda")
        self.pad = self.data.tokenizer.pad_id if self.data.tokenizer is not None else None
        self.loop = ckpt.LoopState()
        self.log = None                                     # metrics.jsonl, opened when the loop starts
        self.eval_seconds = self.checkpoint_seconds = 0.0   # time spent beside the training steps
        torch.manual_seed(cfg.seed + world.rank)            # dropout masks differ between workers

    def restore(self, restored: ckpt.Restored) -> list[str]:
        """Continue from a checkpoint (its adapter is already in the model); notes."""
        notes = []
        optimizer, schedule, scaler = ckpt.states_for(restored, self.optimizer, self.schedule, self.scaler)
        self.optimizer.load_state_dict(dist.shard_optimizer_state(self.optimizer, optimizer))
        self.schedule.load_state_dict(schedule)
        if scaler is not None:
            self.scaler.load_state_dict(scaler)
        self.loop = restored.loop
        if len(restored.rng) == self.world.size:
            ckpt.set_rng_state(restored.rng[self.world.rank])
        else:
            torch.manual_seed(self.cfg.seed + self.world.rank + 7919 * self.loop.step)
            if self.cfg.lora.dropout > 0:
                notes.append(f"the checkpoint holds the random state of {len(restored.rng)} worker(s), not "
                             f"{self.world.size}: dropout masks from here on differ from an uninterrupted run")
        self.world.on_main(lambda: ckpt.trim_metrics(self.out / "metrics.jsonl", self.loop.step))
        return notes

    def loop_over_data(self, received: list[int]) -> float:
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
        window_start = time.perf_counter()     # the logged rates count training steps only
        while loop.step < p.total_steps:
            order = datalib.epoch_order(len(data.train), seed=self.cfg.seed, epoch=loop.epoch)
            mine, keep = dist.epoch_share(order, self.world, done=loop.step_in_epoch * p.global_batch)
            micro = zip(batches(data.train, mine, t.batch_size, self.pad), keep.split(t.batch_size))
            while loop.step < p.total_steps:
                group = [b for _, b in zip(range(t.grad_accum), micro)]
                items, grad_norm, lr, stopping = self.step(group, received)
                loop.window_items += items
                loop.step += 1
                loop.step_in_epoch += 1
                row = None
                if loop.step % t.log_every == 0 or loop.step == p.total_steps:
                    elapsed = time.perf_counter() - window_start
                    loop.last_loss = loop.window_loss / ((loop.step - 1) % t.log_every + 1)
                    row = {"step": loop.step, "epoch": round(loop.step / p.steps_per_epoch, 4),
                           "loss": loop.last_loss, "lr": lr, "grad_norm": grad_norm,
                           f"{p.unit}_per_s": loop.window_items / elapsed if elapsed > 0 else None}
                    if loop.skipped:
                        row["skipped_steps"] = loop.skipped
                    self.write_row(row)
                    loop.window_loss, loop.window_items, window_start = 0.0, 0, time.perf_counter()
                self.reporter.step(loop.step, loop.epoch, row)
                aside = time.perf_counter()
                if data.eval is not None and t.eval_every and loop.step % t.eval_every == 0:
                    loop.eval_final = self.evaluate()
                epoch_done = loop.step_in_epoch == p.steps_per_epoch
                if epoch_done:
                    loop.epoch, loop.step_in_epoch = loop.epoch + 1, 0
                    if data.eval is not None and not t.eval_every:
                        loop.eval_final = self.evaluate()
                saved_at = self.checkpoint() if t.save_every and loop.step % t.save_every == 0 else None
                window_start += time.perf_counter() - aside     # evaluation and checkpoints are not steps
                if stopping:
                    self.reporter.finish()
                    raise Interrupted(received[0] if received else signal.SIGTERM, loop.step,
                                      saved_at or self.checkpoint())
                if epoch_done:
                    break
        if data.eval is not None and loop.last_eval_step != loop.step:
            loop.eval_final = self.evaluate()
        self.reporter.finish()
        shared_dropout.clear()   # it holds the last dropped activation
        return time.perf_counter() - started

    def step(self, group: list[tuple[tuple[torch.Tensor, torch.Tensor], torch.Tensor]], received: list[int]
             ) -> tuple[int, float, float, bool]:
        """One optimizer step over ``group``'s micro-batches (this worker's share: each a
        batch and which of its rows count); its mean loss over all workers goes to the
        loop's window.

        Returns the step's items (rows or tokens) over all workers, the gradient norm
        before clipping, the learning rate the step used, and whether any worker
        received a stop signal.
        """
        cfg, t, world, scaler = self.cfg, self.t, self.world, self.scaler
        lr = self.optimizer.param_groups[0]["lr"]            # the schedule moves it on after this step
        group = [(x, ignore_rows(cfg.task, y, keep), keep) for (x, y), keep in group]
        n_items = max(1.0, world.sum([sum(loss_items(cfg.task, y) for _, y, _ in group)])[0])
        loss_sum, items = 0.0, 0
        for i, (inputs, target, keep) in enumerate(group):
            inputs, target = inputs.to(self.p.device), target.to(self.p.device)
            with dist.gradient_sync(self.engine, world, enabled=i == len(group) - 1):
                with self.autocast():
                    output = forward(self.engine, inputs)
                    loss = loss_fn(cfg.task, output, target, reduction="sum") * (world.size / n_items)
                scaler.scale(loss).backward()
            loss_sum += float(loss.detach()) / world.size
            items += inputs[keep].numel() if self.p.unit == "tokens" else int(keep.sum())
        scaler.unscale_(self.optimizer)
        grad_norm = dist.grad_norm(torch.nn.utils.clip_grad_norm_(self.params, t.clip_grad_norm or float("inf")))
        loss_sum, items, stopping = world.sum([loss_sum, items, float(bool(received))])
        finite = math.isfinite(loss_sum) and (scaler.is_enabled() or math.isfinite(grad_norm))
        if not finite and t.on_nan == "stop":
            last = ckpt.checkpoints(self.out) if world.is_main else []
            kept = f"; the last good checkpoint is {last[-1].path}" if last else ""
            raise TrainingError(
                f"the {'loss' if not math.isfinite(loss_sum) else 'gradient norm'} became non-finite "
                f"at step {self.loop.step + 1}{kept}", where="train",
                fix="lower train.lr, set train.clip_grad_norm, use dtype: float32, "
                    "or train.on_nan: skip to skip such steps")
        if finite:
            try:
                scaler.step(self.optimizer)
            except RuntimeError as exc:          # e.g. Adam's first step at lr 1e38: lr / 0.1 > float32
                if "overflow" not in str(exc):
                    raise
                raise TrainingError(f"the optimizer step overflowed at step {self.loop.step + 1} ({exc})",
                                    where="train.lr", fix=f"lower train.lr (it is {t.lr:g})") from None
            self.loop.window_loss += loss_sum
        else:
            self.loop.skipped += 1
        scaler.update()
        self.schedule.step()
        self.optimizer.zero_grad(set_to_none=True)
        return int(items), grad_norm, lr, stopping > 0

    def evaluate(self) -> dict:
        """Held-out metrics. ddp: each worker evaluates its share and the sums are added
        up; fsdp: every worker runs every batch, since each forward needs all shards."""
        world, data, loop = self.world, self.data, self.loop
        started = time.perf_counter()
        sharded = world.distributed and world.strategy == "ddp"
        order = torch.arange(len(data.eval))
        mine = dist.shard(order, world) if sharded else order
        metrics = evaluate(dist.inner(self.engine), batches(data.eval, mine, self.t.batch_size, self.pad),
                           self.cfg.task, num_classes=data.num_classes, device=self.p.device,
                           autocast=self.autocast, total=world.sum_tensor if sharded else None)
        row = {"step": loop.step, "epoch": round(loop.step / self.p.steps_per_epoch, 4),
               **{f"eval_{k}": v for k, v in metrics.items() if k not in ("confusion", "n")}}
        self.write_row(row)
        self.eval_seconds += time.perf_counter() - started
        self.reporter.evaluated(row)
        loop.last_eval_step = loop.step
        return metrics

    def write_row(self, row: dict) -> None:
        if self.log is not None:
            try:
                self.log.write(json.dumps(row) + "\n")
                self.log.flush()
            except OSError as exc:
                raise write_error(exc, self.out / "metrics.jsonl", "metrics.jsonl") from None

    def adapter_tensors(self) -> dict[str, torch.Tensor]:
        """The adapter's tensors whole, under their file keys (every worker takes part)."""
        tensors = dist.full_tensors(self.engine, self.keys.values())
        return {k: tensors[n] for k, n in self.keys.items()}

    def trainer_state(self) -> dict:
        """Optimizer, schedule, scaler, RNG and loop state, whole (every worker takes part)."""
        return {"optimizer": dist.full_optimizer_state(self.optimizer), "schedule": self.schedule.state_dict(),
                "scaler": self.scaler.state_dict(), "rng": self.world.gather(ckpt.rng_state()),
                "loop": dict(self.loop.__dict__)}

    def checkpoint(self) -> Path:
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
        if self.log is not None:
            try:
                self.log.close()
            except OSError:     # its last write failed already, and said so
                pass
            self.log = None


def _own_output_dir(held: contextlib.ExitStack, out: Path) -> None:
    """Take output_dir's lock until ``held`` closes, and clear what killed runs left there."""
    held.enter_context(run_lock(out))
    remove_stale_temps(out, names=OWNED)
    remove_stale_temps(out / ckpt.DIRNAME)


def _check_inputs(cfg: Config, start: tuple[ckpt.Checkpoint, dict] | None,
                  allow_changed: bool) -> tuple[dict | None, list[str]]:
    """Fingerprints of the run's data files and base weights (when it writes checkpoints or
    resumes from one), and notes; resuming after one of them changed is refused unless
    ``allow_changed``."""
    if start is None and not cfg.train.save_every:
        return None, []
    files = {"data.train": cfg.data.train, "data.eval": cfg.data.eval, "model.base": cfg.model.base,
             "model.hf": cfg.model.hf}
    inputs = ckpt.input_fingerprints(files)
    notes = ckpt.changed_inputs(start[1], inputs, start[0].path, allow=allow_changed) if start else []
    return inputs, notes


def _start_output_dir(out: Path, cfg: Config, overwrite: bool, inputs: list[str]) -> tuple[list[str], Path | None]:
    """Prepare output_dir and write config.yaml there; returns notes, and the top-most
    folder this created (None when output_dir existed). A failure leaves no folder behind."""
    created = next((p for p in reversed([out, *out.parents]) if not p.exists()), None)
    try:
        notes = prepare_output_dir(out, overwrite, inputs=inputs)
        write_atomic(out / "config.yaml", lambda f: f.write(dump_config(cfg).encode()))
    except OSError as exc:
        _discard_output_dir(out, created)
        raise write_error(exc, out / "config.yaml", "config.yaml") from None
    except BaseException:
        if created is not None:
            remove(created)
        raise
    return notes, created


def _discard_output_dir(out: Path, created: Path | None) -> None:
    """Undo a run that could not be written: remove the folder it created, or else what
    it wrote into an existing output_dir."""
    if created is not None:
        remove(created)
    else:
        for name in OWNED:
            remove(out / name)


def _size_on_disk(path: str) -> int:
    """A file's size, or the weight files' total of a model directory."""
    p = Path(path)
    if p.is_dir():
        return sum(f.stat().st_size for f in p.iterdir() if f.suffix in (".safetensors", ".bin"))
    return p.stat().st_size

