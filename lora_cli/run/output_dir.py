"""The output folder of a run: made ready, kept to one run, and cleaned up after a failure.

    output_dir/
        adapter/              the trained adapter
        config.yaml           the run's config, as validated
        metrics.jsonl         one row per log step and evaluation
        checkpoints/step_N/   resumable checkpoints (train.save_every)
        unsaved-adapter.pt    only when a finished run could not write its adapter
        .lora-cli.lock        held by the run while it runs (:mod:`lora_cli.run.lock`)

A new run refuses a folder holding a run's results (or files lora-cli did not write)
unless told to replace them, reuses one holding only what a run that ended before its
first checkpoint leaves, and never writes over a file the run itself reads.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

from ..errors import UserError
from ..lora.files import remove, remove_stale_temps, write_atomic, write_error
from . import checkpoint as ckpt
from .config import Config, dump_config
from .lock import run_lock

OWNED = ("adapter", "config.yaml", "metrics.jsonl", ckpt.DIRNAME, ckpt.UNSAVED,   # what a run writes into output_dir
         "samples.jsonl", "curves.png", "tensorboard")


LEFTOVERS = ("config.yaml", "metrics.jsonl", "samples.jsonl")   # what a run leaves that ends before its first checkpoint


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


def own_output_dir(held: contextlib.ExitStack, out: Path) -> None:
    """Take output_dir's lock until ``held`` closes, and clear what killed runs left there."""
    held.enter_context(run_lock(out))
    remove_stale_temps(out, names=OWNED)
    remove_stale_temps(out / ckpt.DIRNAME)


def start_output_dir(out: Path, cfg: Config, overwrite: bool, inputs: list[str]) -> tuple[list[str], Path | None]:
    """Prepare output_dir and write config.yaml there; returns notes, and the top-most
    folder this created (None when output_dir existed). A failure leaves no folder behind."""
    created = next((p for p in reversed([out, *out.parents]) if not p.exists()), None)
    try:
        notes = prepare_output_dir(out, overwrite, inputs=inputs)
        write_atomic(out / "config.yaml", lambda f: f.write(dump_config(cfg).encode()))
    except OSError as exc:
        discard_output_dir(out, created)
        raise write_error(exc, out / "config.yaml", "config.yaml") from None
    except BaseException:
        if created is not None:
            remove(created)
        raise
    return notes, created


def discard_output_dir(out: Path, created: Path | None) -> None:
    """Undo a run that could not be written: remove the folder it created, or else what
    it wrote into an existing output_dir."""
    if created is not None:
        remove(created)
    else:
        for name in OWNED:
            remove(out / name)
