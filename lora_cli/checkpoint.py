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
``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import random
import re
import signal
from dataclasses import dataclass
from pathlib import Path

import torch

from .adapter import Adapter, parse_adapter, read_adapter, write_adapter
from .errors import UserError
from .files import fsync_dir, remove, temp_path, write_atomic, write_synced

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
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step_{step}"
    tmp = temp_path(final)
    tmp.mkdir()
    try:
        write_adapter(tmp / "adapter", adapter_config, adapter_tensors)
        write_synced(tmp / "trainer_state.pt", lambda f: torch.save(state, f))
        _maybe_fault("ckpt-write", step)
        info = {"step": step, "epoch": epoch, "workers": workers, "config": config,
                **({"inputs": inputs} if inputs else {})}
        write_synced(tmp / "trainer_state.json", lambda f: f.write(json.dumps(info, indent=2).encode()))
        if final.exists():
            remove(final)
        os.replace(tmp, final)
        fsync_dir(root)
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
        return LoopState(**self.state["loop"])

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


def _read_unsaved(ckpt: Checkpoint) -> dict:
    try:
        payload = torch.load(ckpt.path, map_location="cpu", weights_only=True)
        if not isinstance(payload, dict) or not {"info", "state", "adapter_config", "adapter"} <= payload.keys():
            raise ValueError("not a lora-cli unsaved-adapter file")
    except (OSError, ValueError, RuntimeError, EOFError, pickle.UnpicklingError) as exc:
        raise UserError(f"cannot be read: {exc}", where=str(ckpt.path),
                        fix="delete it to resume from the newest checkpoint, or train again") from None
    return payload


def read_checkpoint(ckpt: Checkpoint) -> Restored:
    """Read a checkpoint (or the unsaved-adapter file) without touching any model."""
    if ckpt.path.is_file():
        payload = _read_unsaved(ckpt)
        adapter = parse_adapter(payload["adapter_config"], payload["adapter"], source=str(ckpt.path))
        return Restored(adapter=adapter, state=payload["state"], info=payload["info"], path=ckpt.path)
    info = read_info(ckpt)
    try:
        state = torch.load(ckpt.path / "trainer_state.pt", map_location="cpu", weights_only=True)
        adapter = read_adapter(ckpt.path / "adapter")
    except (OSError, ValueError, RuntimeError, UserError) as exc:
        raise _unreadable(ckpt, exc.what if isinstance(exc, UserError) else str(exc)) from None
    return Restored(adapter=adapter, state=state, info=info, path=ckpt.path)


def read_info(ckpt: Checkpoint) -> dict:
    """trainer_state.json of a checkpoint: step, epoch, workers, config."""
    if ckpt.path.is_file():
        return _read_unsaved(ckpt)["info"]
    try:
        return json.loads((ckpt.path / "trainer_state.json").read_text())
    except (OSError, ValueError) as exc:       # JSONDecodeError is a ValueError
        raise _unreadable(ckpt, str(exc)) from None


def _unreadable(ckpt: Checkpoint, detail: str) -> UserError:
    return UserError(f"checkpoint cannot be read: {detail}", where=str(ckpt.path),
                     fix="delete this checkpoint directory to resume from the one before it")


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
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict) and row.get("step", 0) <= step:
            kept.append(line)
    write_atomic(path, lambda f: f.write("".join(k + "\n" for k in kept).encode()))


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
