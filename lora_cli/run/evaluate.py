"""Losses and metrics per task, and the held-out evaluation of a model over batches.

    regression       output (B, 1) or (B,) vs y (B,):     mse (the loss), mae, r2
    classification   logits (B, C) vs class ids (B,):    cross-entropy, accuracy, macro-F1
    causal_lm        logits (B, T, V) vs labels (B, T):  token cross-entropy (labels of
                     -100 are ignored), perplexity, token accuracy
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from . import lm_loss

IGNORE = -100


def forward(model: nn.Module, inputs) -> torch.Tensor:
    """The model's prediction tensor (Hugging Face outputs carry it as ``.logits``)."""
    return lm_loss.model_output(model, inputs)


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

    def add_sums(self, loss_sum: float, correct: int, n: int) -> None:
        """Add a causal LM batch already reduced (by :func:`lm_loss.tally`)."""
        self.loss_sum, self.correct, self.n = self.loss_sum + loss_sum, self.correct + correct, self.n + n

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
             total: Callable[[torch.Tensor], torch.Tensor] | None = None, head_only: bool = True) -> dict:
    """Metrics of ``model`` over ``batches`` of (inputs, targets), in eval mode.

    With several workers each passes its own share of the batches and ``total`` (a sum
    over workers), so every worker gets the metrics of the whole set. The model's
    train/eval mode is restored afterwards. A causal LM runs its head only on the target
    tokens (:mod:`lm_loss`) unless ``head_only`` is False (a model sharded by fsdp).
    """
    was_training = model.training
    model.eval()
    tally = _Tally(task, num_classes)
    where = lm_loss.head_of(model) if task == "causal_lm" and head_only else None
    try:
        for inputs, target in batches:
            inputs = {k: v.to(device) for k, v in inputs.items()} if isinstance(inputs, dict) else inputs.to(device)
            with autocast():
                if where is not None:
                    tally.add_sums(*lm_loss.tally(model, where, inputs, target, device))
                    continue
                output = forward(model, inputs)
            tally.add(output, target.to(device))
    finally:
        model.train(was_training)
    if total is not None:
        tally.combine(total)
    return tally.result()



