"""Merging adapters into base checkpoints on disk: a ``.pt`` state dict, a
``.safetensors`` file, or a Hugging Face model folder of safetensors shards.

The inputs are never modified. safetensors bases are streamed, one tensor in memory at a
time (:mod:`lora_cli.lora.safetensors_io`), through :class:`~lora_cli.lora.merge.Merger`;
the output is written beside its place under a temporary name and renamed in whole. It
may not be, hold or lie inside an input, and ``force`` replaces only an earlier output of
its own kind (a file of that format, or a folder lora-merge wrote: it holds MERGE_MARKER).
A model folder's other files (config, tokenizer) are copied, and a classifier adapter
merged into a language model's folder rewrites its config.json to load as a classifier.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from .. import __version__
from .adapter import Adapter
from .errors import AdapterError, UserError
from .files import inside, put_in_place, remove, remove_stale_temps, temp_path, write_error, write_synced
from .fingerprint import check_fingerprint
from .merge import Merger
from .model_folder import INDEX_NAME, shard_files
from .safetensors_io import SafetensorsReader, SafetensorsWriter
from .weight_files import DTYPES


@dataclass
class MergeReport:
    """What lora-merge wrote and changed."""

    output: Path
    format: str                 # "pt", "safetensors" or "directory"
    changed: list[str]          # base keys whose tensors changed
    added: list[str]            # tensors the base did not have (a new classification head)
    max_delta: float            # largest |W' - W| over the changed tensors
    bytes: int                  # size of what was written
    tensors: int                # tensors written in all


PT_SUFFIXES = (".pt", ".pth", ".bin")


def default_output(base: Path) -> Path:
    """``<name>-merged.<ext>`` next to a file base; ``<dir>-merged`` next to a directory."""
    base = Path(base)
    if base.is_dir():
        return base.with_name(base.name + "-merged")
    return base.with_name(f"{base.stem}-merged{base.suffix}")


def merge_checkpoint(base: str | os.PathLike, adapters: Sequence[Adapter], out: str | os.PathLike | None = None,
                     *, weights: Sequence[float] | None = None, dtype: str | None = None,
                     force: bool = False, check_base: bool = True) -> MergeReport:
    """Fold ``adapters`` into the checkpoint at ``base`` and write the result to ``out``.

    ``base`` is a ``.pt`` state dict, a ``.safetensors`` file, or a model directory of
    safetensors shards (other files in it, config and tokenizer, are copied; none may be
    a symlink leading out of it). A file's output format follows the suffix of ``out``
    (``.safetensors``, or ``.pt``/``.pth``/``.bin`` for torch.save), a directory merges
    into a directory, marked as lora-merge's by ``MERGE_MARKER``. The inputs are never
    modified: the output may not be, contain or lie inside an input, the current
    directory or a folder above it, and ``force`` replaces only an earlier output of the
    same kind. The output is written beside its final place and renamed in; leftovers of
    killed merges there are removed first. A NaN or inf in the base, or a value the
    output dtype cannot hold, is refused. safetensors bases are streamed: one base
    tensor in memory at a time.
    """
    from .weight_files import check_finite, read_state_dict

    base = Path(base)
    if not base.exists():
        raise UserError("base checkpoint not found", where=str(base),
                        fix="give a .pt or .safetensors file, or a model directory")
    kind = "directory" if base.is_dir() else "safetensors" if base.suffix == ".safetensors" else \
        "pt" if base.suffix in PT_SUFFIXES else None
    if kind is None:
        raise UserError(f"unsupported base format {base.suffix!r}", where=str(base),
                        fix="use a .pt/.pth/.bin state dict, a .safetensors file, or a model directory")
    out = Path(out) if out is not None else default_output(base)
    _check_not_an_input(out, _inputs(base, adapters))
    out_format = _output_format(kind, out)
    _check_replaceable(out, out_format, force)
    if out.parent.exists() and not out.parent.is_dir():
        raise UserError(f"output cannot be written: {out.parent} is a file", where=str(out),
                        fix="choose another -o path")
    if not out.parent.exists():
        raise UserError(f"the folder {out.parent} does not exist", where=str(out),
                        fix="create it first, or choose another -o path")
    if not os.access(out.parent, os.W_OK):
        raise UserError(f"the folder {out.parent} is not writable", where=str(out), fix="choose another -o path")
    target_dtype = DTYPES[dtype] if dtype else None
    merger = Merger(adapters, weights)

    if kind == "pt":
        state = read_state_dict(base)
        check_finite(state.items(), where=str(base))
        merger.check({k: tuple(v.shape) for k, v in state.items()}, where=str(base))
        tensors = stored = lambda: state.items()   # noqa: E731
        readers = []
    else:
        if kind == "directory" and (base / "config.json").exists():
            from .model_folder import read_model_config
            read_model_config(base)     # copied into the output: refuse a damaged one up front
        readers = [SafetensorsReader(f) for f in (shard_files(base) if kind == "directory" else [base])]
        shapes = {k: spec[0] for r in readers for k, spec in r.specs.items()}
        merger.check(shapes, where=str(base))
        tensors = lambda: (kv for r in readers for kv in _finite(r))   # noqa: E731
        stored = lambda: (kv for r in readers for kv in r.stored())    # noqa: E731  (a fingerprint reads samples)
    copied = _other_files(base, {r.path.name for r in readers}) if kind == "directory" else []
    if check_base:
        for adapter in adapters:
            try:
                check_fingerprint(adapter, stored(), where=str(base))
            except AdapterError:
                for _ in tensors():   # a NaN/inf in the base is the likelier story: say that instead
                    pass
                raise
    if out_format == "safetensors" and kind == "pt":
        _check_safetensors_dtypes(state, target_dtype, out)

    changed: list[str] = []
    max_delta = 0.0

    def merged(key: str, t: torch.Tensor) -> torch.Tensor:
        nonlocal max_delta
        m = merger(key, t)
        if m is not t:
            changed.append(key)
            if key in merger.updates:
                max_delta = max(max_delta, float((m.float() - t.float()).abs().max()))
        if target_dtype is None or not m.is_floating_point() or m.dtype == target_dtype:
            return m
        cast = m.to(target_dtype)
        if not bool(torch.isfinite(cast).all()):
            raise UserError(f"'{key}' does not fit {dtype}: its largest |value| is {float(m.abs().max()):.4g}, "
                            f"above {torch.finfo(target_dtype).max:.4g}, and would become inf", where="--dtype",
                            fix="use --dtype bfloat16 (the range of float32) or float32")
        return cast

    remove_stale_temps(out.parent, names=[out.name])
    tmp = temp_path(out)
    try:
        added = {k: merged(k, t) for k, t in merger.added.items()}
        if out_format == "pt":
            merged_state = {**{k: merged(k, t) for k, t in tensors()}, **added}
            write_synced(tmp, lambda f: torch.save(merged_state, f))
            count = len(merged_state)
        elif out_format == "safetensors" and kind == "pt":
            count = _write_safetensors(tmp, {k: (tuple(t.shape), t.dtype) for k, t in state.items()},
                                       state.items(), merged, target_dtype, extra=added)
        elif out_format == "safetensors":
            count = _write_safetensors(tmp, readers[0].specs, _finite(readers[0]), merged, target_dtype,
                                       extra=added, metadata=readers[0].metadata)
        else:
            tmp.mkdir()
            count = sum(_write_safetensors(tmp / r.path.name, r.specs, _finite(r), merged, target_dtype,
                                           extra=added if r is readers[-1] else None, metadata=r.metadata)
                        for r in readers)
            for f in copied:
                shutil.copy2(f, tmp / f.name)   # a symlink inside the folder: its content
            _fix_index(tmp, added, readers[-1].path.name)
            _update_model_config(tmp, adapters)
            marker = {"written_by": "lora-merge", "version": __version__}
            write_synced(tmp / MERGE_MARKER, lambda f: f.write((json.dumps(marker) + "\n").encode()))
        put_in_place(tmp, out)
    except OSError as exc:
        remove(tmp)
        full = exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS)   # whichever file it names
        if not full and exc.filename and not os.fspath(exc.filename).startswith(os.fspath(tmp)):   # a read
            raise UserError(f"cannot read {exc.filename}: {exc.strerror or exc}", where=str(base),
                            fix="check the file, then merge again") from None
        raise write_error(exc, out, "the merged output") from None
    except BaseException:
        remove(tmp)
        raise
    size = sum(f.stat().st_size for f in out.iterdir()) if out.is_dir() else out.stat().st_size
    return MergeReport(output=out, format=out_format, changed=changed, added=sorted(merger.added),
                       max_delta=max_delta, bytes=size, tensors=count)


MERGE_MARKER = ".lora-merge.json"   # in a model folder lora-merge wrote: --force may replace that folder


def _output_format(kind: str, out: Path) -> str:
    """What ``out`` will hold: a file base's output format follows its suffix, a model
    directory merges into a directory; anything else is refused, never guessed."""
    suffix = out.suffix.lower()
    if kind == "directory":
        if suffix in (".safetensors", *PT_SUFFIXES):
            raise UserError(f"a model directory merges into a directory, not a {suffix} file", where=str(out),
                            fix="name -o without a weights suffix, e.g. -o merged-model")
        return "directory"
    if suffix == ".safetensors":
        return "safetensors"
    if suffix in PT_SUFFIXES:
        return "pt"
    raise UserError(f"unknown output format {out.suffix or '(no suffix)'!r}", where=str(out),
                    fix="name the output *.safetensors (preferred) or *.pt")


def _inputs(base: Path, adapters: Sequence[Adapter]) -> list[tuple[Path, str]]:
    """Every path the merge reads, with what it is: the base, each adapter (and the
    adapter_config.json beside an adapter given as its .safetensors file)."""
    from .adapter import CONFIG_NAME
    found = [(base, "the base")]
    for adapter in adapters:
        if adapter.source:
            path = Path(adapter.source)
            found.append((path, f"the adapter {adapter.source}"))
            if path.is_file() and (path.parent / CONFIG_NAME).exists():
                found.append((path.parent / CONFIG_NAME, f"the config of the adapter {adapter.source}"))
    return found


def _check_not_an_input(out: Path, inputs: list[tuple[Path, str]]) -> None:
    """The output may not be, hold or lie inside an input, the current directory or a folder above it."""
    real = Path(os.path.realpath(out))
    here = Path(os.path.realpath(os.getcwd()))
    if real == here or real in here.parents:
        what = "the current directory" if real == here else "a folder above the current directory"
        raise UserError(f"the output would replace {what}", where=str(out), fix="choose a new -o path")
    for path, label in inputs:
        resolved = Path(os.path.realpath(path))
        if resolved == real:
            raise UserError(f"the output would overwrite {label}", where=str(out), fix="choose another -o path")
        if real in resolved.parents:
            raise UserError(f"the output would replace a folder that holds {label} ({path})", where=str(out),
                            fix="choose another -o path")
        if resolved in real.parents:
            raise UserError(f"the output would be written inside {label} ({path}), and the inputs are never "
                            "modified", where=str(out), fix="choose a -o path outside it")


def _check_replaceable(out: Path, out_format: str, force: bool) -> None:
    """An existing output is replaced only with ``force``, and only if it is an earlier output of the same kind."""
    if not (out.exists() or out.is_symlink()):
        return
    if not force:
        raise UserError("output already exists", where=str(out), fix="pass --force to replace it, or -o another path")
    why = _not_replaceable(out, out_format)
    if why:
        raise UserError(f"--force replaces only an earlier output of lora-merge, and {why}", where=str(out),
                        fix="choose another -o path (or move this one away yourself)")


def _not_replaceable(out: Path, out_format: str) -> str | None:
    """Why ``out`` is not an earlier output of the same kind (None when it is one)."""
    if out_format == "directory":
        if not out.is_dir():
            return "this is a file, not a model folder"
        if not (out / MERGE_MARKER).is_file():
            return f"this folder has no {MERGE_MARKER}: lora-merge did not write it"
        return None
    if out.is_dir():
        return "this is a folder, not a file"
    if not out.is_file():
        return "this is not a regular file"
    try:
        with open(out, "rb") as fh:
            head = fh.read(8)
            if out_format == "pt":
                ok = head[:4] == b"PK\x03\x04" or head[:1] == b"\x80"     # torch.save: a zip, or a pickle
            else:
                length = int.from_bytes(head, "little") if len(head) == 8 else -1
                ok = 0 < length <= min(os.fstat(fh.fileno()).st_size - 8, 100 * 2**20) and \
                    isinstance(json.loads(fh.read(length)), dict)
    except (OSError, ValueError, UnicodeDecodeError):
        ok = False
    return None if ok else f"this is not a {'PyTorch' if out_format == 'pt' else 'safetensors'} file"


def _other_files(base: Path, shards: set[str]) -> list[Path]:
    """The files of a model directory to copy beside the merged shards (config,
    tokenizer, ...); a symlink among them that leads out of the directory is refused."""
    from .model_folder import RESOLVE_LINKS
    files = []
    for f in sorted(base.iterdir()):
        if f.name in shards or f.name == MERGE_MARKER:
            continue
        if f.is_symlink() and not inside(base, f):
            raise UserError(f"{f.name} is a symlink to {os.path.realpath(f)}, outside the model folder",
                            where=str(base), fix=RESOLVE_LINKS)
        if f.is_file():
            files.append(f)
    return files


def _finite(reader: SafetensorsReader):
    """The reader's tensors, each refused if it holds NaN or inf."""
    from .weight_files import check_finite
    for key, t in reader:
        check_finite([(key, t)], where=str(reader.path))
        yield key, t


def _check_safetensors_dtypes(state: Mapping[str, torch.Tensor], dtype: torch.dtype | None, out: Path) -> None:
    from .safetensors_io import DTYPE_CODES
    for key, t in state.items():
        d = dtype if dtype is not None and t.is_floating_point() else t.dtype
        if d not in DTYPE_CODES:
            raise UserError(f"'{key}' is {str(d).removeprefix('torch.')}, which lora-merge cannot write to "
                            "safetensors", where=str(out), fix="name the output *.pt")


def _write_safetensors(path: Path, specs: Mapping[str, tuple[tuple[int, ...], torch.dtype]], items,
                       merged: Callable[[str, torch.Tensor], torch.Tensor], dtype: torch.dtype | None,
                       extra: Mapping[str, torch.Tensor] | None = None, metadata: Mapping | None = None) -> int:
    """Stream ``items`` ((key, tensor) in the order of ``specs``) through ``merged`` into a
    safetensors file at ``path``, then ``extra`` tensors; returns the tensor count."""
    def out_dtype(d: torch.dtype) -> torch.dtype:
        return dtype if dtype is not None and d.is_floating_point else d
    out_specs = {k: (shape, out_dtype(d)) for k, (shape, d) in specs.items()}
    out_specs.update({k: (tuple(t.shape), t.dtype) for k, t in (extra or {}).items()})
    with SafetensorsWriter(path, out_specs, metadata=metadata or {"format": "pt"}) as writer:
        for key, t in items:
            writer.write(key, merged(key, t))
        for key, t in (extra or {}).items():
            writer.write(key, t)
    return len(out_specs)


def _update_model_config(directory: Path, adapters: Sequence[Adapter]) -> None:
    """A classifier adapter merged into a language-model directory makes a classifier:
    say so in config.json (architecture and labels), so transformers loads it as one."""
    from .model_folder import read_model_config

    config_file = directory / "config.json"
    meta = next((a.meta for a in adapters if a.config.get("task_type") == "SEQ_CLS"), None)
    if meta is None or not config_file.exists():
        return
    config = read_model_config(directory)
    config["architectures"] = [a.replace("ForCausalLM", "ForSequenceClassification")
                               for a in config.get("architectures") or []]
    label_map = meta.get("label_map")
    if label_map:
        config["id2label"] = {str(i): name for name, i in label_map.items()}
        config["label2id"] = dict(label_map)
    config_file.write_text(json.dumps(config, indent=2) + "\n")


def _fix_index(directory: Path, added: Mapping[str, torch.Tensor], last_shard: str) -> None:
    """Keep a shard index true: new tensors live in the last shard, and total_size
    follows a dtype change."""
    index = directory / INDEX_NAME
    if index.exists():
        data = json.loads(index.read_text())
        data.setdefault("weight_map", {}).update({k: last_shard for k in added})
        total = 0
        for f in set(data.get("weight_map", {}).values()):
            r = SafetensorsReader(directory / f)
            total += sum(torch.Size(shape).numel() * torch.empty((), dtype=d).element_size()
                         for shape, d in r.specs.values())
        data.setdefault("metadata", {})["total_size"] = total
        index.write_text(json.dumps(data, indent=2) + "\n")
