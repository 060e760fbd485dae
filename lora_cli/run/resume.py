"""Resuming a run: from which checkpoint, with which config, and whether it still is the
same run.

A resumed run continues exactly where the checkpoint left off and ends as an
uninterrupted run would. So it is refused when it could not:

  * a config field that cannot change mid-run changed (RESUMABLE_CHANGES lists those
    that may; on another number of workers grad_accum is rescaled to keep the global
    batch, or the resume is refused when no whole number does);
  * the data files or the base weights changed since the checkpoint was written (their
    content fingerprints are in trainer_state.json; ``--allow-changed-data`` accepts it);
  * the checkpoint's state does not fit the run: its loop position, its adapter, its
    optimizer, schedule and scaler states are checked against the run's before anything
    is loaded.
"""

from __future__ import annotations

import hashlib
import math
import os
from dataclasses import replace as dc_replace
from pathlib import Path

import torch

from ..errors import UserError
from . import checkpoint as ckpt
from .checkpoint import Restored, is_scalar, show_value
from .config import Config, config_from_dict, diff_fields
from .distributed import global_batch

# Config fields a resumed run may change; any other change is refused. grad_accum changes
# with the number of workers, so that the global batch stays the checkpoint's; output_dir
# when the run's folder was moved or copied (the checkpoint is read from the new one).
RESUMABLE_CHANGES = ("output_dir", "device", "train.epochs", "train.max_steps", "train.log_every", "train.eval_every",
                     "train.save_every", "train.keep_last", "train.resume", "train.on_nan", "train.strategy",
                     "train.num_threads")


def resume_config(info: dict, cfg: Config, workers: int, where: Path) -> tuple[Config, list[str]]:
    """The config to resume a checkpoint with (``info`` is its trainer_state.json) on
    ``workers`` workers, and notes on what changed.

    Changes that cannot happen mid-run are refused. On another number of workers the
    global batch (batch_size x grad_accum x workers) must stay the same: grad_accum is
    rescaled to keep it, or the resume is refused when no whole grad_accum does.
    """
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


def resume_point(out: Path, cfg: Config, resume: bool) -> tuple[ckpt.Checkpoint, dict] | None:
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


def check_inputs(cfg: Config, start: tuple[ckpt.Checkpoint, dict] | None,
                  allow_changed: bool) -> tuple[dict | None, list[str]]:
    """Fingerprints of the run's data files and base weights (when it writes checkpoints or
    resumes from one), and notes; resuming after one of them changed is refused unless
    ``allow_changed``."""
    if start is None and not cfg.train.save_every:
        return None, []
    files = {"data.train": cfg.data.train, "data.eval": cfg.data.eval, "model.base": cfg.model.base,
             "model.hf": cfg.model.hf}
    inputs = input_fingerprints(files)
    notes = changed_inputs(start[1], inputs, start[0].path, allow=allow_changed) if start else []
    return inputs, notes


def check_position(restored: Restored, steps_per_epoch: int, model: torch.nn.Module) -> None:
    """The checkpoint must be a point this run passes: ``step`` = ``epoch`` x
    steps_per_epoch + ``step_in_epoch``, with ``step_in_epoch`` < steps_per_epoch, and its
    adapter scaled as the run's LoRA layers are (the config's lora.alpha)."""
    from ..lora.inject import lora_layers

    loop, fix = restored.loop, "delete this checkpoint directory to resume from the one before it"
    if loop.step_in_epoch >= steps_per_epoch or loop.epoch * steps_per_epoch + loop.step_in_epoch != loop.step:
        raise UserError(f"the checkpoint does not fit this run: trainer_state.pt: the loop position (step "
                        f"{loop.step}, epoch {loop.epoch}, step {loop.step_in_epoch} in it) is not one of this run, "
                        f"which has {steps_per_epoch} steps per epoch", where=str(restored.path), fix=fix)
    layers = lora_layers(model)
    for path, update in restored.adapter.updates.items():
        layer = layers.get(path)
        if layer is not None and not (math.isclose(update.alpha, layer.alpha) and
                                      math.isclose(update.scaling, layer.scaling)):
            raise UserError(f"the checkpoint does not fit this run: its adapter scales '{path}' by "
                            f"{update.scaling:g} (alpha {update.alpha:g}), the run by {layer.scaling:g} "
                            f"(lora.alpha {layer.alpha:g})", where=str(restored.path / "adapter"), fix=fix)


def _kind(value):
    """What a state entry is, for comparing a saved state with a fresh one."""
    if isinstance(value, torch.Tensor):     # the schedule and the scaler keep plain numbers
        return "tensor"
    if value is None or isinstance(value, (bool, str)):
        return type(value).__name__
    if is_scalar(value):
        return "number"
    if isinstance(value, (list, tuple)):
        return ("list", tuple(_kind(v) for v in value))
    return "other"


def _same(a, b) -> bool:
    """Equal settings: numbers by value (a tuple and a list alike), the rest by ==."""
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, bool) or isinstance(b, bool) or a is None or b is None:
        return a is b
    if is_scalar(a) and is_scalar(b) and not isinstance(a, torch.Tensor) and not isinstance(b, torch.Tensor):
        return float(a) == float(b)
    return type(a) is type(b) and not isinstance(a, torch.Tensor) and a == b


def _state_of_one_step(optimizer: torch.optim.Optimizer) -> dict | None:
    """The per-parameter state ``optimizer``'s class keeps, taken from a copy that made one
    step on a (2, 2) parameter (None if that cannot be done)."""
    import inspect

    try:
        takes = inspect.signature(type(optimizer)).parameters
        param = torch.nn.Parameter(torch.zeros(2, 2))
        scratch = type(optimizer)([param], **{k: v for k, v in optimizer.defaults.items() if k in takes})
        param.grad = torch.ones(2, 2)
        scratch.step()
        return scratch.state_dict()["state"].get(0, {})
    except Exception:
        return None


def states_for(restored: Restored, optimizer: torch.optim.Optimizer, schedule,
               scaler) -> tuple[dict, dict, dict | None]:
    """The optimizer, schedule and scaler states of a checkpoint, checked against the
    fresh ones of the resumed run: the same parameter groups and sizes, every state
    tensor shaped as its parameter, the same settings (the config's: only the scheduled
    lr moves), the schedule at the loop's step from the same base lr. Keys the run does
    not have are left out; an empty scaler state (a run without float16 on CUDA) gives
    None: the scaler starts fresh."""
    def bad(detail: str) -> UserError:
        return UserError(f"the checkpoint does not fit this run: trainer_state.pt: {detail}", where=str(restored.path),
                         fix="delete this checkpoint directory to resume from the one before it, or start a "
                             "new run with --overwrite")

    saved, live = restored.state["optimizer"], optimizer.state_dict()
    if len(saved["param_groups"]) != len(live["param_groups"]):
        raise bad(f"{len(saved['param_groups'])} optimizer parameter groups, the run has {len(live['param_groups'])}")
    # torch pairs the saved ids with this run's parameters group by group, in order
    params = {i: p for g_saved, g in zip(saved["param_groups"], optimizer.param_groups)
              for i, p in zip(g_saved["params"], g["params"])}
    for g_saved, g_live in zip(saved["param_groups"], live["param_groups"]):
        if len(g_saved["params"]) != len(g_live["params"]):
            raise bad(f"an optimizer group of {len(g_saved['params'])} parameters, the run's has "
                      f"{len(g_live['params'])}")
        for key, value in g_live.items():
            got = g_saved.get(key, "missing")
            if key == "lr":
                ok = is_scalar(got) and not isinstance(got, torch.Tensor) and got >= 0
            else:
                ok = key == "params" or _same(got, value)
            if not ok:
                raise bad(f"optimizer setting {key!r} is {show_value(got)}, the run's is {show_value(value)}")
    reference = _state_of_one_step(optimizer)      # what this optimizer keeps per parameter, for a (2, 2) one
    for i, entry in saved["state"].items():
        if i not in params:
            raise bad(f"optimizer state for parameter {i}, which no parameter group lists")
        shape = tuple(params[i].shape)      # whole, also for a sharded parameter: the state is stored whole
        for key, ref in (reference or {}).items() if entry else ():   # an empty state starts afresh
            value = entry.get(key, ...)
            if isinstance(ref, torch.Tensor) and ref.dim() == 2:      # shaped like its parameter
                ok = isinstance(value, torch.Tensor) and tuple(value.shape) == shape and not value.is_complex()
                expect = f"a tensor of the parameter's shape {shape}"
            elif isinstance(ref, torch.Tensor) or is_scalar(ref):    # a count, like Adam's step
                ok = (is_scalar(value) and (not isinstance(value, torch.Tensor) or value.is_floating_point()))
                expect = "a count (a number, or a one-element float tensor)"
            else:                                                     # None: SGD without momentum
                ok = value is None or (isinstance(value, torch.Tensor) and tuple(value.shape) == shape)
                expect = f"null or a tensor of the parameter's shape {shape}"
            if not ok:
                raise bad(f"optimizer state {key!r} of parameter {i} is "
                          f"{'missing' if value is ... else show_value(value)}, not {expect}")
    sched_live = schedule.state_dict()
    sched = {}
    for key, value in sched_live.items():
        got = restored.state["schedule"].get(key, ...)
        if key == "lr_lambdas":
            ok = isinstance(got, list) and len(got) == len(value) and all(x is None for x in got)
        elif key == "base_lrs":
            ok = _same(got, value)
        else:
            ok = _kind(got) == _kind(value)
        if not ok:
            raise bad(f"schedule {key!r} is {show_value(got if got is not ... else 'missing')}, not like {value!r}")
        sched[key] = got
    if sched.get("last_epoch") != restored.loop.step:
        raise bad(f"the schedule is at step {sched.get('last_epoch')}, the loop at step {restored.loop.step}")
    scaler_saved, scaler_live = restored.state["scaler"], scaler.state_dict()
    if not scaler_saved or not scaler_live:
        return saved, sched, None
    for key, value in scaler_live.items():
        if _kind(scaler_saved.get(key, ...)) != _kind(value):
            raise bad(f"grad scaler {key!r} is {show_value(scaler_saved.get(key, 'missing'))}")
    return saved, sched, {k: scaler_saved[k] for k in scaler_live}


SAMPLES, SAMPLE_BYTES = 64, 64 * 2**10
WHOLE_LIMIT = 64 * 2**20            # base weight files up to this size are hashed whole


WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")


def _sha256_file(path: Path, *, sampled: bool) -> str:
    """sha256 of a file's bytes, streamed in 1 MiB reads; with ``sampled`` (and a file over
    WHOLE_LIMIT), of its size and SAMPLES blocks of SAMPLE_BYTES at evenly spaced offsets,
    the first and the last included."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        size = os.fstat(fh.fileno()).st_size
        if sampled and size > WHOLE_LIMIT:
            h.update(f"sampled {size}".encode())
            for i in range(SAMPLES):
                fh.seek((size - SAMPLE_BYTES) * i // (SAMPLES - 1))
                h.update(fh.read(SAMPLE_BYTES))
        else:
            for block in iter(lambda: fh.read(2**20), b""):
                h.update(block)
    return h.hexdigest()


def input_fingerprints(files: dict[str, str | None]) -> dict[str, dict]:
    """``{key: {"path", "sha256"}}`` for a run's inputs, e.g. ``{"data.train": "train.csv",
    "model.base": "base.safetensors", "model.hf": "models/llama"}`` (None values are skipped;
    a folder counts by its config.json and weight files).

    Data files are hashed whole: one edited row anywhere changes what the run trains on,
    and the run reads every byte of them anyway. Base weights are hashed whole up to
    WHOLE_LIMIT (64 MiB); above it, by their size and 64 blocks of 64 KiB spread over the
    file: another checkpoint of the same model differs in nearly every block, while a full
    hash of a 15 GB base would add many seconds to every start and resume. An edit of a
    few bytes between the samples of a large base goes unseen (as it does for the
    adapter's base fingerprint, which samples tensor values). Modification times are not
    used: copying or downloading the same file again changes them, not the run.
    """
    out = {}
    for key, value in files.items():
        if not value:
            continue
        path = Path(value)
        weights = key.startswith("model.")
        try:
            if path.is_dir():
                h = hashlib.sha256()
                for f in sorted(path.iterdir()):
                    if f.is_file() and (f.suffix in WEIGHT_SUFFIXES or f.name == "config.json"):
                        h.update(f"{f.name}\0{_sha256_file(f, sampled=weights)}\0".encode())
                digest = h.hexdigest()
            else:
                digest = _sha256_file(path, sampled=weights)
        except OSError as exc:
            raise UserError(f"cannot read it to fingerprint the run's inputs: {exc.strerror}", where=str(path),
                            fix=f"check the file {key} names") from None
        out[key] = {"path": str(path.resolve()), "sha256": digest}
    return out


def changed_inputs(info: dict, current: dict[str, dict], where: str | os.PathLike, *,
                   allow: bool) -> list[str]:
    """Compare a checkpoint's recorded inputs (``info`` is its trainer_state.json) with
    ``current``; return notes. An input whose content changed (at the same path, or
    read from another one) is a UserError naming it, unless ``allow``. A checkpoint without fingerprints (written by
    an older lora-cli) passes with a note; one whose record is malformed does not."""
    recorded = info.get("inputs")
    if recorded is None:
        return ["the checkpoint records no fingerprint of the data and base (an older lora-cli wrote it): "
                "they cannot be checked for changes"]
    valid = isinstance(recorded, dict) and all(
        isinstance(v, dict) and isinstance(v.get("path"), str) and isinstance(v.get("sha256"), str)
        for v in recorded.values())
    if not valid:
        raise UserError("checkpoint cannot be read: trainer_state.json has a malformed 'inputs' record",
                        where=str(where), fix="delete this checkpoint directory to resume from the one before it")
    changed = [f"{key} ({now['path']}" + (f", was {recorded[key]['path']})" if recorded[key]["path"] != now["path"]
                                          else ")")
               for key, now in current.items() if key in recorded and recorded[key]["sha256"] != now["sha256"]]
    if not changed:
        return []
    names = ", ".join(changed)
    if not allow:
        raise UserError(f"cannot resume: {names} changed since the checkpoint was written, so the resumed run "
                        "would not continue the same run", where=str(where),
                        fix="restore the original file, start a new run with --overwrite, or pass "
                            "--allow-changed-data to continue on the new content")
    return [f"resuming with a changed {names} (--allow-changed-data): the rest of the run trains on the "
            "new content"]
