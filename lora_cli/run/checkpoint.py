"""Resumable training checkpoints, written atomically.

    output_dir/checkpoints/step_<N>/
        adapter/               the adapter at step N (the usual adapter files)
        trainer_state.pt       optimizer, schedule, grad scaler, RNG states (one per
                               worker), loop position
        trainer_state.json     step, epoch, number of workers, the run's config, and a
                               content fingerprint of its data files and base weights

Everything is stored whole (sharded optimizer state is gathered first), so a checkpoint
resumes on any number of workers and under either strategy.

    output_dir/unsaved-adapter.pt

is the same state in one ``torch.save`` file, written only when a finished run could not
write its adapter: it keeps the trained tensors, and ``--resume`` reads it like a
checkpoint of the last step (and writes the adapter).

A checkpoint directory is built under a temporary name, every file fsynced, then
renamed into place: a ``step_N`` directory is complete or absent, never half-written.
``trainer_state.pt`` holds only tensors and plain containers, so it is read back with
``torch.load(weights_only=True)``. Both state files are checked when read
(:func:`validate_info`, :func:`validate_state`) and against the resumed run before any
of it is loaded (:func:`check_position`, :func:`states_for`): a checkpoint that is
damaged, or written by something else, is one UserError naming what is wrong.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import pickle
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import UserError
from ..lora.adapter import Adapter, parse_adapter, read_adapter, write_adapter
from ..lora.checks import parse_json
from ..lora.files import put_in_place, remove, temp_path, write_atomic, write_error, write_synced
from .rng import rng_problem

DIRNAME = "checkpoints"
UNSAVED = "unsaved-adapter.pt"
_STEP_DIR = re.compile(r"step_(\d+)")


@dataclass
class LoopState:
    """Where the training loop is, and what it has accumulated since the last log line."""

    step: int = 0
    epoch: int = 0              # epoch the next step belongs to
    step_in_epoch: int = 0      # optimizer steps already done in that epoch
    window_loss: float = 0.0    # summed step losses since the last log row
    window_items: int = 0
    skipped: int = 0            # steps skipped for a non-finite loss (on_nan: skip)
    eval_base: dict | None = None
    eval_final: dict | None = None
    last_eval_step: int | None = None
    last_loss: float | None = None


@dataclass
class Checkpoint:
    path: Path
    step: int


def checkpoints(output_dir: str | os.PathLike) -> list[Checkpoint]:
    """Complete checkpoints of a run, oldest first."""
    root = Path(output_dir) / DIRNAME
    found = []
    for d in root.iterdir() if root.is_dir() else ():
        m = _STEP_DIR.fullmatch(d.name)
        if m and d.is_dir() and (d / "trainer_state.json").exists():
            found.append(Checkpoint(d, int(m.group(1))))
    return sorted(found, key=lambda c: c.step)


def save_checkpoint(output_dir: str | os.PathLike, *, step: int, epoch: int, adapter_config: dict,
                    adapter_tensors: dict[str, torch.Tensor], state: dict, config: dict, workers: int = 1,
                    keep_last: int | None, inputs: dict | None = None) -> Path:
    """Write ``checkpoints/step_<N>`` atomically; prune to the newest ``keep_last``.

    ``state`` holds the optimizer, schedule, scaler and loop state dicts and ``rng``, a
    list of RNG states, one per worker; ``inputs`` the :func:`input_fingerprints` of the run.
    """
    root = Path(output_dir) / DIRNAME
    final = root / f"step_{step}"
    tmp = temp_path(final)
    try:
        root.mkdir(parents=True, exist_ok=True)
        remove(tmp)
        tmp.mkdir()
        write_adapter(tmp / "adapter", adapter_config, adapter_tensors)
        write_synced(tmp / "trainer_state.pt", lambda f: torch.save(state, f))
        info = {"step": step, "epoch": epoch, "workers": workers, "config": config,
                **({"inputs": inputs} if inputs else {})}
        write_synced(tmp / "trainer_state.json", lambda f: f.write(json.dumps(info, indent=2).encode()))
        put_in_place(tmp, final)
    except OSError as exc:
        remove(tmp)
        raise write_error(exc, final, f"the checkpoint of step {step}") from None
    except BaseException:
        remove(tmp)
        raise
    if keep_last:
        for old in checkpoints(output_dir)[:-keep_last]:
            remove(old.path)
    return final


@dataclass
class Restored:
    """A checkpoint read back: the adapter, the trainer state and trainer_state.json."""

    adapter: Adapter
    state: dict
    info: dict
    path: Path

    @property
    def loop(self) -> LoopState:
        known = {f.name for f in dataclasses.fields(LoopState)}   # keys a later version adds are ignored
        return LoopState(**{k: v for k, v in self.state["loop"].items() if k in known})

    @property
    def rng(self) -> list[dict]:
        """One RNG state per worker that wrote the checkpoint."""
        rng = self.state["rng"]
        return rng if isinstance(rng, list) else [rng]


def save_unsaved(output_dir: str | os.PathLike, *, step: int, epoch: int, adapter_config: dict,
                 adapter_tensors: dict[str, torch.Tensor], state: dict, config: dict, workers: int = 1) -> Path:
    """Keep what :func:`save_checkpoint` would, in one ``torch.save`` file (no safetensors,
    no numpy, no directory): the fallback when a finished run cannot write its adapter."""
    path = Path(output_dir) / UNSAVED
    info = {"step": step, "epoch": epoch, "workers": workers, "config": config}
    payload = {"info": info, "state": state, "adapter_config": adapter_config,
               "adapter": {k: v.detach().cpu() for k, v in adapter_tensors.items()}}
    write_atomic(path, lambda f: torch.save(payload, f))
    return path


def unsaved(output_dir: str | os.PathLike) -> Checkpoint | None:
    """The kept state of a run whose adapter could not be written, if there is one."""
    path = Path(output_dir) / UNSAVED
    return Checkpoint(path, int(read_info(Checkpoint(path, -1))["step"])) if path.is_file() else None


def _at_its_step(ckpt: Checkpoint, info) -> Checkpoint:
    """The unsaved-adapter file has no step in its name: its own info says which."""
    step = info.get("step") if isinstance(info, dict) else None
    return dataclasses.replace(ckpt, step=step if isinstance(step, int) and not isinstance(step, bool) else -1)


def _read_unsaved(ckpt: Checkpoint) -> dict:
    try:
        payload = torch.load(ckpt.path, map_location="cpu", weights_only=True)
        if not isinstance(payload, dict) or not {"info", "state", "adapter_config", "adapter"} <= payload.keys():
            raise ValueError("not a lora-cli unsaved-adapter file")
    except Exception as exc:     # an untrusted file: whatever torch.load fails with, the file is at fault
        raise UserError(f"cannot be read: {str(exc)[:200]}", where=str(ckpt.path),
                        fix="delete it to resume from the newest checkpoint, or train again") from None
    return payload


def read_checkpoint(ckpt: Checkpoint) -> Restored:
    """Read a checkpoint (or the unsaved-adapter file) without touching any model; every
    file is checked."""
    if ckpt.path.is_file():
        payload = _read_unsaved(ckpt)
        ckpt = _at_its_step(ckpt, payload["info"])
        info, state = validate_info(payload["info"], ckpt), validate_state(payload["state"], ckpt)
        try:
            adapter = parse_adapter(payload["adapter_config"], payload["adapter"], source=str(ckpt.path))
        except UserError as exc:
            raise _unreadable(ckpt, exc.what) from None
        return Restored(adapter=adapter, state=state, info=info, path=ckpt.path)
    info = read_info(ckpt)
    path = ckpt.path / "trainer_state.pt"
    if not path.is_file():
        raise _unreadable(ckpt, "trainer_state.pt is missing")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        from ..lora.weight_files import is_pickle

        found = re.search(r"GLOBAL ([\w.]+)", str(exc))
        if found is None and not is_pickle(path):
            raise _unreadable(ckpt, "trainer_state.pt is truncated or corrupt (not a PyTorch file)") from None
        refs = f" (it references {found.group(1)})" if found else ""
        raise _unreadable(ckpt, f"trainer_state.pt is not a plain state file: unpickling it would run "
                                f"code{refs}, and lora-cli never does that") from None
    except Exception as exc:     # an untrusted file: whatever torch.load fails with, the file is at fault
        detail = (str(exc).strip().splitlines() or ["the file ended early" if isinstance(exc, EOFError)
                                                    else type(exc).__name__])[0][:200]
        raise _unreadable(ckpt, f"trainer_state.pt is truncated or corrupt ({detail})") from None
    state = validate_state(state, ckpt)
    try:
        adapter = read_adapter(ckpt.path / "adapter")
    except UserError as exc:
        raise _unreadable(ckpt, exc.what) from None
    return Restored(adapter=adapter, state=state, info=info, path=ckpt.path)


def read_info(ckpt: Checkpoint) -> dict:
    """trainer_state.json of a checkpoint (step, epoch, workers, config), checked."""
    if ckpt.path.is_file():
        info = _read_unsaved(ckpt)["info"]
        return validate_info(info, _at_its_step(ckpt, info))
    try:
        info = parse_json((ckpt.path / "trainer_state.json").read_bytes(), "trainer_state.json")
    except OSError as exc:
        raise _unreadable(ckpt, f"trainer_state.json: {exc.strerror or exc}") from None
    except ValueError as exc:
        raise _unreadable(ckpt, str(exc)) from None
    return validate_info(info, ckpt)


def _unreadable(ckpt: Checkpoint, detail: str) -> UserError:
    return UserError(f"checkpoint cannot be read: {detail}", where=str(ckpt.path),
                     fix="delete this checkpoint directory to resume from the one before it")


def is_count(v, minimum: int = 0) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= minimum


def is_scalar(v) -> bool:
    if isinstance(v, torch.Tensor):
        return v.numel() == 1 and not v.is_complex() and bool(torch.isfinite(v).all())
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return False
    try:
        return math.isfinite(float(v))
    except OverflowError:
        return False


def show_value(value) -> str:
    text = repr(value) if not isinstance(value, torch.Tensor) else f"a tensor of shape {tuple(value.shape)}"
    return text if len(text) <= 60 else text[:57] + "..."


def validate_info(info, ckpt: Checkpoint) -> dict:
    """trainer_state.json, checked: an object whose ``step`` is its directory's, with an
    integer ``epoch`` >= 0, ``workers`` >= 1 (absent: 1) and the run's ``config`` (an
    object, checked field by field when the resume compares it). Other keys pass: later
    versions add some."""
    if not isinstance(info, dict):
        raise _unreadable(ckpt, f"trainer_state.json holds a JSON {type(info).__name__}, not an object")
    problems = []
    if info.get("step") != ckpt.step or not is_count(info.get("step")):
        problems.append(f"step must be {ckpt.step} (the directory's), got {show_value(info.get('step'))}")
    if not is_count(info.get("epoch")):
        problems.append(f"epoch must be an integer >= 0, got {show_value(info.get('epoch'))}")
    if not is_count(info.get("workers", 1), 1) or info.get("workers", 1) > 1 << 20:
        problems.append(f"workers must be an integer from 1 to {1 << 20:,}, got {show_value(info.get('workers'))}")
    if not isinstance(info.get("config"), dict):
        problems.append(f"config must be an object (the run's config), got {show_value(info.get('config'))}")
    if problems:
        raise _unreadable(ckpt, "trainer_state.json: " + "; ".join(problems))
    return info


_LOOP_FIELDS = {   # LoopState field -> check, in words
    "step": (is_count, "an integer >= 0"),
    "epoch": (is_count, "an integer >= 0"),
    "step_in_epoch": (is_count, "an integer >= 0"),
    "window_loss": (is_scalar, "a finite number"),
    "window_items": (is_count, "an integer >= 0"),
    "skipped": (is_count, "an integer >= 0"),
    "eval_base": (lambda v: v is None or _is_metrics(v), "null or metrics with a finite loss"),
    "eval_final": (lambda v: v is None or _is_metrics(v), "null or metrics with a finite loss"),
    "last_eval_step": (lambda v: v is None or is_count(v), "null or an integer >= 0"),
    "last_loss": (lambda v: v is None or is_scalar(v), "null or a finite number"),
}


def _is_metrics(v) -> bool:
    return (isinstance(v, dict) and all(isinstance(k, str) for k in v) and is_scalar(v.get("loss"))
            and not isinstance(v.get("loss"), torch.Tensor)
            and all(isinstance(x, (int, float, list)) and not isinstance(x, bool) for x in v.values()))


def validate_state(state, ckpt: Checkpoint) -> dict:
    """trainer_state.pt (as a weights_only load returns it), checked: an object with the
    optimizer state (``state`` by parameter index, ``param_groups`` naming the indices),
    the schedule and grad-scaler state objects, one RNG state per worker (each one that
    torch, Python and numpy accept) and the loop position (:class:`LoopState`'s fields,
    typed; its ``step`` the checkpoint's). Whether they fit the resumed run is checked
    later, by :func:`check_position` and :func:`states_for`."""
    def bad(detail: str) -> UserError:
        return _unreadable(ckpt, f"trainer_state.pt: {detail}")

    if not isinstance(state, dict):
        raise bad(f"holds {show_value(state)}, not an object of trainer states")
    odd = _odd_tensor(state)
    if odd is not None:
        raise bad(f"holds a {odd} tensor; a trainer state holds only plain dense tensors")
    missing = [k for k in ("optimizer", "schedule", "scaler", "rng", "loop") if k not in state]
    if missing:
        raise bad(f"{', '.join(missing)} missing")
    opt = state["optimizer"]
    if not (isinstance(opt, dict) and isinstance(opt.get("state"), dict) and isinstance(opt.get("param_groups"), list)
            and opt["param_groups"] and all(isinstance(g, dict) for g in opt["param_groups"])):
        raise bad("optimizer must be an object with 'state' and a non-empty list of 'param_groups'")
    indices = [i for g in opt["param_groups"]
               for i in (g.get("params") if isinstance(g.get("params"), list) else [None])]
    if not all(is_count(i) for i in indices) or indices != list(range(len(indices))):   # as torch numbers them
        raise bad("optimizer param_groups must number the parameters 0, 1, 2, ... in order")
    for i, entry in opt["state"].items():
        if i not in set(indices) or not isinstance(entry, dict) or not all(isinstance(k, str) for k in entry):
            raise bad(f"optimizer state {show_value(i)} is not the state of a parameter in its groups")
    for name in ("schedule", "scaler"):
        if not isinstance(state[name], dict) or not all(isinstance(k, str) for k in state[name]):
            raise bad(f"{name} must be an object, got {show_value(state[name])}")
    rng = state["rng"] if isinstance(state["rng"], list) else [state["rng"]]
    if not rng:
        raise bad("rng holds no random state")
    for n, one in enumerate(rng):
        problem = rng_problem(one)
        if problem:
            raise bad(f"rng state {n}: {problem}")
    loop = state["loop"]
    if not isinstance(loop, dict):
        raise bad(f"loop must be an object, got {show_value(loop)}")
    for key, (ok, expect) in _LOOP_FIELDS.items():
        if key in loop and not ok(loop[key]):
            raise bad(f"loop.{key} must be {expect}, got {show_value(loop[key])}")
    if loop.get("step") != ckpt.step:
        raise bad(f"loop.step must be {ckpt.step} (the directory's), got {show_value(loop.get('step'))}")
    return state


def _odd_tensor(tree, depth: int = 0) -> str | None:
    """What kind of tensor in ``tree`` (nested dicts, lists, tuples) is not a plain dense
    CPU one (sparse, meta, quantized, ...), or None."""
    if isinstance(tree, torch.Tensor):
        kind = ([str(tree.layout).removeprefix("torch.")] if tree.layout is not torch.strided else []) + \
            ["quantized"] * tree.is_quantized + ["nested"] * tree.is_nested + \
            ([tree.device.type] if tree.device.type != "cpu" else [])
        return " ".join(kind) or None
    if depth > 32:
        return "deeply nested"
    children = tree.values() if isinstance(tree, dict) else tree if isinstance(tree, (list, tuple)) else ()
    return next((odd for odd in (_odd_tensor(c, depth + 1) for c in children) if odd is not None), None)


def clean_partial(output_dir: str | os.PathLike) -> None:
    """Remove checkpoint directories a killed run left half-written."""
    root = Path(output_dir) / DIRNAME
    for d in root.glob(".step_*.tmp*") if root.is_dir() else ():   # .step_N.tmp-PID-RAND (.step_N.tmp before)
        remove(d)


def trim_metrics(path: Path, step: int) -> None:
    """Keep only the log rows of steps <= ``step`` (the resumed run writes the rest again);
    a last line cut short by a kill is dropped."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            row = json.loads(line)
        except (ValueError, RecursionError):     # cut short by a kill, or not lora-cli's
            continue
        if isinstance(row, dict) and isinstance(row.get("step"), int) and row["step"] <= step:
            kept.append(line)
    try:
        write_atomic(path, lambda f: f.write("".join(k + "\n" for k in kept).encode()))
    except OSError as exc:
        raise write_error(exc, path, "metrics.jsonl") from None

