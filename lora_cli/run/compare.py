"""Base against adapted on held-out data (``lora-eval``), and merged against unmerged
(``lora-merge --verify``).

Both rebuild the model from the adapter alone (its :class:`~lora_cli.run.meta.RunMeta`),
or from the training config; a class_path model only as the user allowed
(:func:`lora_cli.run.meta.model_code`).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..errors import UserError
from ..lora.adapter import load_adapter, read_adapter
from ..lora.model_folder import shard_files
from ..lora.safetensors_io import SafetensorsReader
from ..lora.weight_files import DTYPES, read_state_dict
from ..models.quantize import quantize_model
from .build import autocast_for, batches, build_base, load_heldout, resolve_device
from .config import load_config
from .evaluate import evaluate, forward
from .meta import RunMeta, config_from_adapter, fingerprint_shapes, model_code, with_base


@dataclass
class Comparison:
    """Metrics of the base and of the adapted (or merged) model on the same data."""

    task: str
    data: str
    base: dict
    adapted: dict
    adapted_label: str

    def delta(self) -> dict:
        return {k: self.adapted[k] - v for k, v in self.base.items()
                if isinstance(v, (int, float)) and k != "n" and k in self.adapted}

    def as_dict(self) -> dict:
        return {"task": self.task, "data": self.data, "base": self.base, self.adapted_label: self.adapted,
                "delta": self.delta()}


def _is_config(source: Path) -> bool:
    return source.is_file() and source.suffix in (".yaml", ".yml")


def _source(source: str | os.PathLike, code=None, *, base: str | None = None, data: str | None = None):
    """(config, adapter, folder to import a class_path model from) from an adapter path
    (its class_path allowed by ``code``), or from a training config and its output (the
    config's folder, as in training). ``base`` and ``data`` replace what the adapter
    names (see :func:`lora_cli.run.build.config_from_adapter`)."""

    source = Path(source)
    if _is_config(source):
        cfg = load_config(source, check_files=False)
        adapter_dir = Path(cfg.output_dir) / "adapter"
        if not adapter_dir.exists():
            raise UserError("the config's run has no adapter yet", where=str(adapter_dir),
                            fix=f"run lora-train {source} first, or pass the adapter directory")
        return (with_base(cfg, base) if base else cfg), read_adapter(adapter_dir), str(source.resolve().parent)
    adapter = read_adapter(source)
    return (config_from_adapter(adapter, code, base=base, data=data), adapter,
            code.folder if code is not None else None)


def model_code_for(source: str | os.PathLike, choice):
    """The model code evaluating ``source`` needs, as ``choice`` (a CodeChoice: the user's
    flags) allows it; None when it needs none. Nothing is imported. A training config
    brings its own model.class_path, imported from its folder as in training."""

    source = Path(source)
    if _is_config(source):
        if choice.given:
            raise UserError(f"{' and '.join(choice.given)} are for adapters: a training config's own "
                            "model.class_path is used, imported from the config's folder as in training",
                            where=choice.given[0], fix="leave them out, or pass the adapter directory")
        return None
    return model_code(read_adapter(source), choice)


def _heldout(cfg, adapter, data: str | None, *, any_split: bool = False):
    """Held-out data read as the adapter's run read its data: with its label map and
    feature columns (none for an adapter another tool wrote)."""
    run = RunMeta.of(adapter)
    return load_heldout(cfg, data, label_map=run.label_map if run else None, features=run.features if run else None,
                        any_split=any_split)


def compare(source: str | os.PathLike, *, data: str | None = None, merged: str | None = None,
            base: str | None = None, batch_size: int | None = None, check_base: bool = True,
            code=None) -> Comparison:
    """Evaluate the base model and base+adapter (or a merged checkpoint) on held-out data.

    ``source`` is an adapter directory / .safetensors file (the model is rebuilt from
    its saved metadata) or a training config (its output_dir's adapter is used). An
    adapter's class_path model is built only as ``code`` (see :func:`model_code_for`)
    allows; without it such an adapter is a UserError. ``base`` is the base's weights
    (or model directory) when they are no longer where the adapter says.
    """

    cfg, adapter, search = _source(source, code, base=base, data=data)
    held = _heldout(cfg, adapter, data)
    device = resolve_device(cfg.device)
    autocast = autocast_for(device, cfg.dtype)
    size = batch_size or cfg.train.batch_size
    pad = held.tokenizer.pad_id if held.tokenizer is not None else None

    def run(model: nn.Module) -> dict:
        model.to(device)
        order = torch.arange(len(held.eval))
        return evaluate(model, batches(held.eval, order, size, pad), cfg.task,
                        num_classes=held.num_classes, device=device, autocast=autocast)

    # sizes are checked before anything is allocated; with --ignore-fingerprint only the model's size
    model, _, _ = build_base(cfg, held, search_path=search, expect=fingerprint_shapes(adapter), exact=check_base)
    if cfg.model.quantize:      # the base the adapter was trained on; the adapter is checked against the float one
        quantize_model(model, cfg.model.quantize, DTYPES[cfg.dtype])
        base_metrics = run(model)
        del model
        model, _, _ = build_base(cfg, held, search_path=search, expect=fingerprint_shapes(adapter), exact=check_base)
        if not merged:
            load_adapter(model, adapter, check_base=check_base)
            quantize_model(model, cfg.model.quantize, DTYPES[cfg.dtype])
            return Comparison(task=cfg.task, data=held.eval.source, base=base_metrics, adapted=run(model),
                              adapted_label=f"adapted ({cfg.model.quantize} base)")
    else:
        base_metrics = run(model)
    if merged:
        fresh, _, _ = build_base(cfg, held, search_path=search, weights=merged)
        adapted, label = run(fresh), "merged"
    else:
        model.to("cpu")
        load_adapter(model, adapter, check_base=check_base)
        adapted, label = run(model), "adapted"
    return Comparison(task=cfg.task, data=held.eval.source, base=base_metrics, adapted=adapted,
                      adapted_label=label)


@dataclass
class Verification:
    """Largest output difference between base+adapter and the merged weights."""

    max_abs_diff: float
    tolerance: float
    batches: int

    @property
    def ok(self) -> bool:
        return self.max_abs_diff <= self.tolerance


TOLERANCE = {torch.float32: 1e-4, torch.float64: 1e-6, torch.bfloat16: 5e-2, torch.float16: 5e-3}


def verify_merge(adapter_path: str | os.PathLike, base: str | os.PathLike, merged: str | os.PathLike, *,
                 data: str | None = None, code=None, max_batches: int = 4, batch_size: int = 8) -> Verification:
    """Run a few batches through base+adapter and through the merged weights; see
    :func:`prepare_verification`, which does the first half."""
    return prepare_verification(adapter_path, base, data=data, code=code, max_batches=max_batches,
                                batch_size=batch_size)(merged)


@torch.no_grad()
def prepare_verification(adapter_path: str | os.PathLike, base: str | os.PathLike, *, data: str | None = None,
                         code=None, max_batches: int = 4,
                         batch_size: int = 8) -> Callable[[str | os.PathLike], Verification]:
    """The first half of :func:`verify_merge`, done before anything is merged: read the
    adapter, rebuild its config for ``base`` (a class_path model only as ``code``, a
    ModelCode from :func:`lora_cli.run.build.model_code`, allows), load the inputs and
    build base+adapter. The inputs are ``data``, else the data the adapter names (its
    eval file, else its training file: any inputs tell whether two models compute the
    same function). Returns the second half, which takes the merged checkpoint; a
    UserError here means nothing was written yet.

    The tolerance is relative to the outputs' scale and looser for a merged checkpoint
    stored in a lower precision than float32.
    """

    adapter = read_adapter(adapter_path)
    cfg = config_from_adapter(adapter, code, base=base, data=data)
    held = _heldout(cfg, adapter, data, any_split=True)
    search = code.folder if code is not None else None
    adapted, _, _ = build_base(cfg, held, search_path=search, weights=str(base))
    load_adapter(adapted, adapter, check_base=False)
    adapted.eval()
    pad = held.tokenizer.pad_id if held.tokenizer is not None else None

    @torch.no_grad()
    def verify(merged: str | os.PathLike) -> Verification:
        merged_model, _, _ = build_base(cfg, held, search_path=search, weights=str(merged))
        merged_model.eval()
        dtypes = stored_float_dtypes(merged)
        tol = max(TOLERANCE.get(d, 1e-4) for d in dtypes) if dtypes else 1e-4
        worst, scale, n = 0.0, 1.0, 0
        for x, _ in batches(held.eval, torch.arange(len(held.eval)), batch_size, pad):
            a, b = forward(adapted, x).float(), forward(merged_model, x).float()
            worst = max(worst, float((a - b).abs().max()))
            scale = max(scale, float(a.abs().max()))
            n += 1
            if n >= max_batches:
                break
        return Verification(max_abs_diff=worst, tolerance=tol * scale, batches=n)
    return verify


def stored_float_dtypes(path: str | os.PathLike) -> set[torch.dtype]:
    """The floating dtypes a weights file (or model directory) stores its tensors in."""

    path = Path(path)
    if path.is_dir() or path.suffix == ".safetensors":
        files = shard_files(path) if path.is_dir() else [path]
        dtypes = {d for f in files for _, d in SafetensorsReader(f).specs.values()}
    else:
        dtypes = {t.dtype for t in read_state_dict(path).values()}
    return {d for d in dtypes if d.is_floating_point}
