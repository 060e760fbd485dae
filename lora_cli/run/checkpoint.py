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
import hashlib
import json
import math
import os
import pickle
import random
import re
import signal
from dataclasses import dataclass
from pathlib import Path

import torch

from ..lora.adapter import Adapter, parse_adapter, read_adapter, write_adapter
from ..errors import UserError
from ..lora.files import put_in_place, remove, temp_path, write_atomic, write_error, write_synced

DIRNAME = "checkpoints"
UNSAVED = "unsaved-adapter.pt"
_STEP_DIR = re.compile(r"step_(\d+)")

# Fault injection for the resume tests: "ckpt-write:N" kills this process with SIGKILL
# halfway through writing the checkpoint of step N. Unset in normal use.
_FAULT_ENV = "LORA_CLI_FAULT"


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


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": _py_state(random.getstate())}
    if torch.cuda.is_available():      # this worker's own GPU: another machine may have fewer
        state["cuda"] = torch.cuda.get_rng_state()
    try:
        import numpy
        state["numpy"] = _py_state(numpy.random.get_state(legacy=False))
    except ImportError:
        pass
    return state


def _py_state(state):
    """RNG states as plain lists/dicts (weights_only loads no tuples of arbitrary objects)."""
    if isinstance(state, tuple):
        return {"__tuple__": [_py_state(s) for s in state]}
    if isinstance(state, dict):
        return {k: _py_state(v) for k, v in state.items()}
    if hasattr(state, "tolist"):
        return state.tolist()
    return state


def _py_unstate(state):
    if isinstance(state, dict) and "__tuple__" in state:
        return tuple(_py_unstate(s) for s in state["__tuple__"])
    if isinstance(state, dict):
        return {k: _py_unstate(v) for k, v in state.items()}
    if isinstance(state, list):
        return tuple(_py_unstate(s) for s in state)
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(_py_unstate(state["python"]))
    if "cuda" in state and torch.cuda.is_available():
        if isinstance(state["cuda"], (list, tuple)):     # written by lora-cli <= 0.1: every GPU's
            torch.cuda.set_rng_state_all(state["cuda"])
        else:
            torch.cuda.set_rng_state(state["cuda"])
    if "numpy" in state:
        import numpy
        numpy.random.set_state(_numpy_state(_py_unstate(state["numpy"])))


def _numpy_state(state):
    import numpy
    if isinstance(state, dict):   # legacy=False form: {'bit_generator': ..., 'state': {...}}
        inner = state.get("state", {})
        if isinstance(inner.get("key"), tuple):
            inner = {**inner, "key": numpy.array(inner["key"], dtype=numpy.uint32)}
            state = {**state, "state": inner}
    return state


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
        _maybe_fault("ckpt-write", step)
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


def _maybe_fault(point: str, step: int) -> None:
    if os.environ.get(_FAULT_ENV) == f"{point}:{step}":
        os.kill(os.getpid(), signal.SIGKILL)


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
        info = json.loads((ckpt.path / "trainer_state.json").read_bytes().decode("utf-8"))
    except OSError as exc:
        raise _unreadable(ckpt, f"trainer_state.json: {exc.strerror or exc}") from None
    except RecursionError:
        raise _unreadable(ckpt, "trainer_state.json is nested too deeply") from None
    except ValueError as exc:       # JSONDecodeError, UnicodeDecodeError, an integer of 5000 digits
        raise _unreadable(ckpt, f"trainer_state.json is not valid JSON ({exc})") from None
    return validate_info(info, ckpt)


def _unreadable(ckpt: Checkpoint, detail: str) -> UserError:
    return UserError(f"checkpoint cannot be read: {detail}", where=str(ckpt.path),
                     fix="delete this checkpoint directory to resume from the one before it")


def _is_int(v, minimum: int = 0) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= minimum


def _is_number(v) -> bool:
    if isinstance(v, torch.Tensor):
        return v.numel() == 1 and not v.is_complex() and bool(torch.isfinite(v).all())
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return False
    try:
        return math.isfinite(float(v))
    except OverflowError:
        return False


def _show(value) -> str:
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
    if info.get("step") != ckpt.step or not _is_int(info.get("step")):
        problems.append(f"step must be {ckpt.step} (the directory's), got {_show(info.get('step'))}")
    if not _is_int(info.get("epoch")):
        problems.append(f"epoch must be an integer >= 0, got {_show(info.get('epoch'))}")
    if not _is_int(info.get("workers", 1), 1) or info.get("workers", 1) > 1 << 20:
        problems.append(f"workers must be an integer from 1 to {1 << 20:,}, got {_show(info.get('workers'))}")
    if not isinstance(info.get("config"), dict):
        problems.append(f"config must be an object (the run's config), got {_show(info.get('config'))}")
    if problems:
        raise _unreadable(ckpt, "trainer_state.json: " + "; ".join(problems))
    return info


_LOOP_FIELDS = {   # LoopState field -> check, in words
    "step": (_is_int, "an integer >= 0"),
    "epoch": (_is_int, "an integer >= 0"),
    "step_in_epoch": (_is_int, "an integer >= 0"),
    "window_loss": (_is_number, "a finite number"),
    "window_items": (_is_int, "an integer >= 0"),
    "skipped": (_is_int, "an integer >= 0"),
    "eval_base": (lambda v: v is None or _is_metrics(v), "null or metrics with a finite loss"),
    "eval_final": (lambda v: v is None or _is_metrics(v), "null or metrics with a finite loss"),
    "last_eval_step": (lambda v: v is None or _is_int(v), "null or an integer >= 0"),
    "last_loss": (lambda v: v is None or _is_number(v), "null or a finite number"),
}


def _is_metrics(v) -> bool:
    return (isinstance(v, dict) and all(isinstance(k, str) for k in v) and _is_number(v.get("loss"))
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
        raise bad(f"holds {_show(state)}, not an object of trainer states")
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
    if not all(_is_int(i) for i in indices) or indices != list(range(len(indices))):   # as torch numbers them
        raise bad("optimizer param_groups must number the parameters 0, 1, 2, ... in order")
    for i, entry in opt["state"].items():
        if i not in set(indices) or not isinstance(entry, dict) or not all(isinstance(k, str) for k in entry):
            raise bad(f"optimizer state {_show(i)} is not the state of a parameter in its groups")
    for name in ("schedule", "scaler"):
        if not isinstance(state[name], dict) or not all(isinstance(k, str) for k in state[name]):
            raise bad(f"{name} must be an object, got {_show(state[name])}")
    rng = state["rng"] if isinstance(state["rng"], list) else [state["rng"]]
    if not rng:
        raise bad("rng holds no random state")
    for n, one in enumerate(rng):
        problem = _rng_problem(one)
        if problem:
            raise bad(f"rng state {n}: {problem}")
    loop = state["loop"]
    if not isinstance(loop, dict):
        raise bad(f"loop must be an object, got {_show(loop)}")
    for key, (ok, expect) in _LOOP_FIELDS.items():
        if key in loop and not ok(loop[key]):
            raise bad(f"loop.{key} must be {expect}, got {_show(loop[key])}")
    if loop.get("step") != ckpt.step:
        raise bad(f"loop.step must be {ckpt.step} (the directory's), got {_show(loop.get('step'))}")
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


def _rng_problem(state) -> str | None:
    """Why an RNG state cannot be restored (tried on fresh generators), or None."""
    if not isinstance(state, dict) or "torch" not in state or "python" not in state:
        return "must be an object with 'torch' and 'python' states"
    try:
        t = state["torch"]
        if not isinstance(t, torch.Tensor) or t.dtype != torch.uint8 or t.dim() != 1:
            return "torch: must be a 1-D uint8 tensor"
        torch.Generator().set_state(t)
        random.Random().setstate(_py_unstate(state["python"]))
        if "cuda" in state:
            cuda = state["cuda"] if isinstance(state["cuda"], (list, tuple)) else [state["cuda"]]
            if not all(isinstance(c, torch.Tensor) and c.dtype == torch.uint8 for c in cuda):
                return "cuda: must be uint8 tensors"
        if "numpy" in state:
            try:
                import numpy
            except ImportError:
                return None
            numpy.random.RandomState().set_state(_numpy_state(_py_unstate(state["numpy"])))
    except (TypeError, ValueError, KeyError, IndexError, RuntimeError, OverflowError, AttributeError) as exc:
        return f"not a state the generator accepts ({str(exc).strip()[:120] or type(exc).__name__})"
    return None


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
    if _is_number(value):
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
    if _is_number(a) and _is_number(b) and not isinstance(a, torch.Tensor) and not isinstance(b, torch.Tensor):
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
                ok = _is_number(got) and not isinstance(got, torch.Tensor) and got >= 0
            else:
                ok = key == "params" or _same(got, value)
            if not ok:
                raise bad(f"optimizer setting {key!r} is {_show(got)}, the run's is {_show(value)}")
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
            elif isinstance(ref, torch.Tensor) or _is_number(ref):    # a count, like Adam's step
                ok = (_is_number(value) and (not isinstance(value, torch.Tensor) or value.is_floating_point()))
                expect = "a count (a number, or a one-element float tensor)"
            else:                                                     # None: SGD without momentum
                ok = value is None or (isinstance(value, torch.Tensor) and tuple(value.shape) == shape)
                expect = f"null or a tensor of the parameter's shape {shape}"
            if not ok:
                raise bad(f"optimizer state {key!r} of parameter {i} is "
                          f"{'missing' if value is ... else _show(value)}, not {expect}")
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
            raise bad(f"schedule {key!r} is {_show(got if got is not ... else 'missing')}, not like {value!r}")
        sched[key] = got
    if sched.get("last_epoch") != restored.loop.step:
        raise bad(f"the schedule is at step {sched.get('last_epoch')}, the loop at step {restored.loop.step}")
    scaler_saved, scaler_live = restored.state["scaler"], scaler.state_dict()
    if not scaler_saved or not scaler_live:
        return saved, sched, None
    for key, value in scaler_live.items():
        if _kind(scaler_saved.get(key, ...)) != _kind(value):
            raise bad(f"grad scaler {key!r} is {_show(scaler_saved.get(key, 'missing'))}")
    return saved, sched, {k: scaler_saved[k] for k in scaler_live}


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


# --- what a run reads: a resumed run must read the same ------------------------------------

WHOLE_LIMIT = 64 * 2**20            # base weight files up to this size are hashed whole
SAMPLES, SAMPLE_BYTES = 64, 64 * 2**10
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
