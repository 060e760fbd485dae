"""Losses and metrics per task, and the held-out evaluation of a model.

    regression       output (B, 1) or (B,) vs y (B,):     mse (the loss), mae, r2
    classification   logits (B, C) vs class ids (B,):    cross-entropy, accuracy, macro-F1
    causal_lm        logits (B, T, V) vs labels (B, T):  token cross-entropy (labels of
                     -100 are ignored), perplexity, token accuracy
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UserError

IGNORE = -100


def forward(model: nn.Module, inputs: torch.Tensor) -> torch.Tensor:
    """The model's prediction tensor (Hugging Face outputs carry it as ``.logits``)."""
    out = model(inputs)
    return out.logits if hasattr(out, "logits") else out


def loss_fn(task: str, output: torch.Tensor, target: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """The training loss of one batch: a scalar mean over its loss items (rows, or target
    tokens), or with ``reduction="sum"`` their sum. Targets marked by :func:`ignore_rows`
    (NaN for regression, IGNORE otherwise) count for nothing."""
    if task == "regression":
        pred = (output.squeeze(-1) if output.dim() == 2 and output.shape[-1] == 1 else output).float()
        keep = ~torch.isnan(target)
        err = torch.where(keep, pred - target.float().nan_to_num(), 0.0)     # no host sync
        total = (err * err).sum()
        return total if reduction == "sum" else total / keep.sum().clamp(min=1)
    if task == "classification":
        return F.cross_entropy(output.float(), target, ignore_index=IGNORE, reduction=reduction)
    logits = output.float().reshape(-1, output.shape[-1])            # (B*T, V)
    return F.cross_entropy(logits, target.reshape(-1), ignore_index=IGNORE, reduction=reduction)


def loss_items(task: str, target: torch.Tensor) -> int:
    """How many terms the batch's loss averages: target values, or target tokens."""
    if task == "regression":
        return int((~torch.isnan(target.float())).sum())
    return int((target != IGNORE).sum())


def ignore_rows(task: str, target: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """``target`` (B, ...) with the rows where ``keep`` (B,) is False taken out of the loss."""
    if bool(keep.all()):
        return target
    target = target.float().clone() if task == "regression" else target.clone()
    target[~keep] = float("nan") if task == "regression" else IGNORE
    return target


class _Tally:
    """Sums over batches, so metrics are exact over the whole set, not batch means."""

    def __init__(self, task: str, num_classes: int | None):
        self.task, self.n, self.loss_sum = task, 0, 0.0
        self.abs_sum = self.y_sum = self.y_sq_sum = 0.0
        self.correct = 0
        self.confusion = torch.zeros(num_classes or 0, num_classes or 0, dtype=torch.long)

    def add(self, output: torch.Tensor, target: torch.Tensor) -> None:
        output = output.float()
        if self.task == "regression":
            pred = output.squeeze(-1) if output.dim() == 2 and output.shape[-1] == 1 else output
            err = pred - target.float()
            self.loss_sum += float((err ** 2).sum())
            self.abs_sum += float(err.abs().sum())
            self.y_sum += float(target.float().sum())
            self.y_sq_sum += float((target.float() ** 2).sum())
            self.n += target.numel()
        elif self.task == "classification":
            self.loss_sum += float(F.cross_entropy(output, target, reduction="sum"))
            pred = output.argmax(-1)
            self.correct += int((pred == target).sum())
            k = self.confusion.shape[0]
            self.confusion += torch.bincount(target * k + pred, minlength=k * k).reshape(k, k).cpu()
            self.n += target.numel()
        else:
            logits, labels = output.reshape(-1, output.shape[-1]), target.reshape(-1)
            keep = labels != IGNORE
            self.loss_sum += float(F.cross_entropy(logits[keep], labels[keep], reduction="sum"))
            self.correct += int((logits[keep].argmax(-1) == labels[keep]).sum())
            self.n += int(keep.sum())

    _SUMS = ("n", "loss_sum", "abs_sum", "y_sum", "y_sq_sum", "correct")

    def combine(self, total: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """Replace every sum by ``total(sum)`` (the sum over all workers' tallies)."""
        flat = torch.tensor([float(getattr(self, k)) for k in self._SUMS] + self.confusion.flatten().tolist(),
                            dtype=torch.float64)
        flat = total(flat)
        for i, k in enumerate(self._SUMS):
            setattr(self, k, int(flat[i]) if k in ("n", "correct") else float(flat[i]))
        self.confusion = flat[len(self._SUMS):].round().long().reshape(self.confusion.shape)

    def result(self) -> dict:
        n = max(self.n, 1)
        if self.task == "regression":
            mse = self.loss_sum / n
            var = self.y_sq_sum / n - (self.y_sum / n) ** 2
            return {"loss": mse, "mse": mse, "mae": self.abs_sum / n,
                    "r2": 1.0 - mse / var if var > 0 else float("nan"), "n": self.n}
        if self.task == "classification":
            return {"loss": self.loss_sum / n, "accuracy": self.correct / n,
                    "macro_f1": macro_f1(self.confusion), "n": self.n,
                    "confusion": self.confusion.tolist()}
        loss = self.loss_sum / n
        return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "token_accuracy": self.correct / n,
                "n": self.n}


def macro_f1(confusion: torch.Tensor) -> float:
    """Unweighted mean of per-class F1 from a (true, predicted) confusion matrix."""
    c = confusion.double()
    tp = c.diag()
    precision = tp / c.sum(0).clamp(min=1)
    recall = tp / c.sum(1).clamp(min=1)
    f1 = 2 * precision * recall / (precision + recall).clamp(min=1e-12)
    return float(f1.mean()) if len(f1) else 0.0


@torch.no_grad()
def evaluate(model: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], task: str, *,
             num_classes: int | None = None, device: torch.device | str = "cpu",
             autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
             total: Callable[[torch.Tensor], torch.Tensor] | None = None) -> dict:
    """Metrics of ``model`` over ``batches`` of (inputs, targets), in eval mode.

    With several workers each passes its own share of the batches and ``total`` (a sum
    over workers), so every worker gets the metrics of the whole set. The model's
    train/eval mode is restored afterwards.
    """
    was_training = model.training
    model.eval()
    tally = _Tally(task, num_classes)
    try:
        for inputs, target in batches:
            inputs, target = inputs.to(device), target.to(device)
            with autocast():
                output = forward(model, inputs)
            tally.add(output, target)
    finally:
        model.train(was_training)
    if total is not None:
        tally.combine(total)
    return tally.result()


# --- base vs adapted (lora-eval) and merged vs unmerged (lora-merge --verify) -----------

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
    from ..lora.adapter import read_adapter
    from .config import load_config
    from .meta import config_from_adapter, with_base

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
    from ..lora.adapter import read_adapter
    from .meta import model_code

    source = Path(source)
    if _is_config(source):
        if choice.given:
            raise UserError(f"{' and '.join(choice.given)} are for adapters: a training config's own "
                            "model.class_path is used, imported from the config's folder as in training",
                            where=choice.given[0], fix="leave them out, or pass the adapter directory")
        return None
    return model_code(read_adapter(source), choice)


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
    from ..lora.adapter import load_adapter
    from .build import autocast_for, batches, build_base, load_heldout, resolve_device
    from .meta import fingerprint_shapes

    cfg, adapter, search = _source(source, code, base=base, data=data)
    meta = adapter.meta
    held = load_heldout(cfg, data, label_map=meta.get("label_map"), features=meta.get("features"))
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
    from ..lora.adapter import load_adapter, read_adapter
    from .build import batches, build_base, load_heldout
    from .meta import config_from_adapter

    adapter = read_adapter(adapter_path)
    cfg = config_from_adapter(adapter, code, base=base, data=data)
    meta = adapter.meta
    held = load_heldout(cfg, data, label_map=meta.get("label_map"), features=meta.get("features"), any_split=True)
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
    from ..models import read_state_dict
    from ..lora.safetensors_io import SafetensorsReader
    from ..lora.model_folder import shard_files

    path = Path(path)
    if path.is_dir() or path.suffix == ".safetensors":
        files = shard_files(path) if path.is_dir() else [path]
        dtypes = {d for f in files for _, d in SafetensorsReader(f).specs.values()}
    else:
        dtypes = {t.dtype for t in read_state_dict(path).values()}
    return {d for d in dtypes if d.is_floating_point}
