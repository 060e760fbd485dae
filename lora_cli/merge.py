"""Folding adapters into base weights.

For each adapted module, with adapters i = 1..n weighted w_i (1.0 for a single one):

    W' = W + sum_i w_i * s_i * B_i @ A_i        (transposed for Conv1D and embeddings)

computed in float32 and cast once to W's dtype; a non-finite result is an error.
Tensors no adapter touches are passed through as the same objects (bit for bit), and
``modules_to_save`` / trained-bias tensors replace theirs.

Everything here works one tensor at a time (:func:`merge_tensor`), so a caller can
stream a large checkpoint through it without holding two copies of the model.
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
from torch import nn

from .adapter import Adapter, check_fingerprint
from .errors import AdapterError, UserError
from .files import fsync_dir, remove, write_error, write_synced
from .inject import SPEC_ATTR, _set_submodule, lora_layers
from .streaming import INDEX_NAME, SafetensorsReader, SafetensorsWriter, shard_files

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def merge_adapter(model: nn.Module) -> nn.Module:
    """Fold every LoRA layer of ``model`` into its base weight and put the plain module
    back in its place; returns the model, which then has no LoRA modules left.

    Every merged weight is computed and checked before any is written, so a failure
    (non-finite values) leaves the model exactly as it was.
    """
    layers = lora_layers(model)
    try:
        merged = {path: layer.merged_weight() for path, layer in layers.items() if not layer.merged}
    except FloatingPointError as exc:
        raise AdapterError(str(exc), fix="the adapter has diverged weights; check its training loss") from None
    for path, layer in layers.items():
        if path in merged:
            with torch.no_grad():
                layer.weight.copy_(merged.pop(path))
            layer.merged = True
        module = layer.unload()
        for p in module.parameters():
            p.requires_grad_(False)
        _set_submodule(model, path, module)
    if hasattr(model, SPEC_ATTR):
        delattr(model, SPEC_ATTR)
    return model


class Merger:
    """Merges one or more adapters into base tensors, one tensor at a time.

    ``check(shapes)`` verifies up front that every adapted module and every replaced
    tensor exists in the base with the right shape; ``__call__(key, tensor)`` returns the
    merged tensor (the input object itself when nothing changes it).
    """

    def __init__(self, adapters: Sequence[Adapter], weights: Sequence[float] | None = None):
        if not adapters:
            raise ValueError("Merger needs at least one adapter")
        weights = [1.0] * len(adapters) if weights is None else [float(w) for w in weights]
        if len(weights) != len(adapters):
            raise AdapterError(f"{len(weights)} weights given for {len(adapters)} adapters",
                               where="--weights", fix="give one weight per adapter")
        self.adapters, self.weights = list(adapters), weights
        self.updates: dict[str, list] = {}        # base key -> [(weight, update), ...]
        self.replacements: dict[str, torch.Tensor] = {}
        self.new_modules: set[str] = set()        # modules_to_save the base may lack (a new head)
        self.added: dict[str, torch.Tensor] = {}  # set by check(): tensors to add to the base
        for adapter, w in zip(self.adapters, weights):
            if adapter.config.get("task_type") == "SEQ_CLS":   # a classifier's head is new to its base
                self.new_modules |= set(adapter.config.get("modules_to_save") or [])
            for path, update in adapter.updates.items():
                self.updates.setdefault(f"{path}.weight", []).append((w, update))
            for key, t in adapter.replacements.items():
                if key in self.replacements:
                    raise AdapterError(f"two adapters both replace '{key}' (modules_to_save or bias)",
                                       where=adapter.source, fix="merge them one at a time")
                self.replacements[key] = t

    def check(self, shapes: Mapping[str, Sequence[int]], where: str = "") -> None:
        """Every target must exist in the base with the shape the adapter expects.

        Tensors of a ``modules_to_save`` module the base does not have (the new head of
        a classifier made from a language model) are collected in ``added``.
        """
        problems = []
        self.added = {k: t for k, t in self.replacements.items() if k not in shapes and any(
            k.startswith(m + ".") or f".{m}." in f".{k}" for m in self.new_modules)}
        for key, items in self.updates.items():
            for _, update in items:
                if key not in shapes:
                    problems.append(f"'{key}' is not in the base")
                elif tuple(shapes[key]) != update.weight_shape():
                    problems.append(f"'{key}' is {tuple(shapes[key])} in the base, "
                                    f"the adapter expects {update.weight_shape()}")
        for key, t in self.replacements.items():
            if key in self.added:
                continue
            if key not in shapes:
                problems.append(f"'{key}' is not in the base")
            elif tuple(shapes[key]) != tuple(t.shape):
                problems.append(f"'{key}' is {tuple(shapes[key])} in the base, {tuple(t.shape)} in the adapter")
        if problems:
            shown = "\n".join(f"  {p}" for p in problems[:8])
            raise AdapterError(f"the adapter does not fit this base:\n{shown}", where=where,
                               fix="merge into the base the adapter was trained on")

    def touches(self, key: str) -> bool:
        return key in self.updates or key in self.replacements

    def __call__(self, key: str, tensor: torch.Tensor) -> torch.Tensor:
        if key in self.replacements:   # a module_to_save / bias, or the base weight PEFT saved
            tensor = self.replacements[key].to(dtype=tensor.dtype, device=tensor.device)
            if tensor.is_floating_point() and not torch.isfinite(tensor).all():
                raise AdapterError(f"the adapter's '{key}' (a trained bias or module) holds non-finite values",
                                   fix="the adapter has diverged weights; check its training loss")
        items = self.updates.get(key)
        if not items:
            return tensor
        merged = tensor.to(torch.promote_types(tensor.dtype, torch.float32))
        if merged is tensor:
            merged = merged.clone()   # never write into the caller's tensor
        for w, update in items:
            merged.add_(update.delta().to(merged.device), alpha=w)
        if not torch.isfinite(merged).all():
            raise AdapterError(f"merging into '{key}' gave non-finite values",
                               fix="the adapter has diverged weights; check its training loss")
        return merged.to(tensor.dtype)


def merge_state_dict(base: Mapping[str, torch.Tensor], adapters: Adapter | Sequence[Adapter],
                     weights: Sequence[float] | None = None) -> dict[str, torch.Tensor]:
    """A new state dict with the adapters folded in; ``base`` is left unchanged."""
    adapters = [adapters] if isinstance(adapters, Adapter) else list(adapters)
    merger = Merger(adapters, weights)
    merger.check({k: tuple(v.shape) for k, v in base.items()})
    return {**{key: merger(key, t) for key, t in base.items()}, **merger.added}


# --- whole checkpoints on disk ----------------------------------------------------------

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
    safetensors shards (other files in it, config and tokenizer, are copied). The inputs
    are never modified; the output is written beside its final place and renamed in.
    safetensors bases are streamed: one base tensor in memory at a time.
    """
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
    if out.resolve() == base.resolve():
        raise UserError("the output would overwrite the base", where=str(out), fix="choose another -o path")
    if out.exists() and not force:
        raise UserError("output already exists", where=str(out), fix="pass --force to replace it, or -o another path")
    if out.parent.exists() and not out.parent.is_dir():
        raise UserError(f"output cannot be written: {out.parent} is a file", where=str(out),
                        fix="choose another -o path")
    if not out.parent.exists():
        raise UserError(f"the folder {out.parent} does not exist", where=str(out),
                        fix="create it first, or choose another -o path")
    if not os.access(out.parent, os.W_OK):
        raise UserError(f"the folder {out.parent} is not writable", where=str(out), fix="choose another -o path")
    target_dtype = _DTYPES[dtype] if dtype else None
    merger = Merger(adapters, weights)

    if kind == "pt":
        from .models import read_state_dict
        state = read_state_dict(base)
        merger.check({k: tuple(v.shape) for k, v in state.items()}, where=str(base))
        tensors = lambda: state.items()   # noqa: E731
    else:
        if kind == "directory" and (base / "config.json").exists():
            from .models.hf import read_model_config
            read_model_config(base)     # copied into the output: refuse a damaged one up front
        readers = [SafetensorsReader(f) for f in (shard_files(base) if kind == "directory" else [base])]
        shapes = {k: spec[0] for r in readers for k, spec in r.specs.items()}
        merger.check(shapes, where=str(base))
        tensors = lambda: (kv for r in readers for kv in r)   # noqa: E731
    if check_base:
        for adapter in adapters:
            check_fingerprint(adapter, tensors(), where=str(base))

    changed: list[str] = []
    max_delta = 0.0

    def merged(key: str, t: torch.Tensor) -> torch.Tensor:
        nonlocal max_delta
        m = merger(key, t)
        if m is not t:
            changed.append(key)
            if key in merger.updates:
                max_delta = max(max_delta, float((m.float() - t.float()).abs().max()))
        return m.to(target_dtype) if target_dtype is not None and m.is_floating_point() else m

    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    remove(tmp)
    try:
        added = {k: merged(k, t) for k, t in merger.added.items()}
        if kind == "pt":
            write_synced(tmp, lambda f: torch.save({**{k: merged(k, t) for k, t in state.items()}, **added}, f))
            count = len(state) + len(added)
        elif kind == "safetensors":
            count = _write_streamed(readers[0], tmp, merged, target_dtype, extra=added)
        else:
            tmp.mkdir()
            count = sum(_write_streamed(r, tmp / r.path.name, merged, target_dtype,
                                        extra=added if r is readers[-1] else None) for r in readers)
            shards = {r.path.name for r in readers}
            for f in base.iterdir():
                if f.name not in shards and f.is_file():
                    shutil.copy2(f, tmp / f.name)
            _fix_index(tmp, added, readers[-1].path.name)
            _update_model_config(tmp, adapters)
        if out.exists():
            remove(out)
        os.replace(tmp, out)
        fsync_dir(out.parent)
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
    return MergeReport(output=out, format=kind, changed=changed, added=sorted(merger.added), max_delta=max_delta,
                       bytes=size, tensors=count)


def _write_streamed(reader: SafetensorsReader, path: Path, merged: Callable[[str, torch.Tensor], torch.Tensor],
                    dtype: torch.dtype | None, extra: Mapping[str, torch.Tensor] | None = None) -> int:
    """Stream one safetensors file through ``merged`` into ``path``, then ``extra``
    tensors; returns the tensor count."""
    def out_dtype(d: torch.dtype) -> torch.dtype:
        return dtype if dtype is not None and d.is_floating_point else d
    specs = {k: (shape, out_dtype(d)) for k, (shape, d) in reader.specs.items()}
    specs.update({k: (tuple(t.shape), t.dtype) for k, t in (extra or {}).items()})
    with SafetensorsWriter(path, specs, metadata=reader.metadata or {"format": "pt"}) as writer:
        for key in reader.keys:
            writer.write(key, merged(key, reader.get(key)))
        for key, t in (extra or {}).items():
            writer.write(key, t)
    return len(specs)


def _update_model_config(directory: Path, adapters: Sequence[Adapter]) -> None:
    """A classifier adapter merged into a language-model directory makes a classifier:
    say so in config.json (architecture and labels), so transformers loads it as one."""
    from .models.hf import read_model_config

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

