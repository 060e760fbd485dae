"""Folding adapters into base weights.

For each adapted module, with adapters i = 1..n weighted w_i (1.0 for a single one):

    W' = W + sum_i w_i * s_i * B_i @ A_i        (transposed for Conv1D and embeddings)

computed in float32 and cast once to W's dtype; a non-finite result is an error.
Tensors no adapter touches are passed through as the same objects (bit for bit), and
``modules_to_save`` / trained-bias tensors replace theirs.

Everything here works one tensor at a time (:class:`Merger`), so a caller can stream a
large checkpoint through it without holding two copies of the model
(:mod:`lora_cli.lora.merge_files` does, for files on disk).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn

from .adapter import Adapter
from .errors import AdapterError
from .inject import lora_layers, set_submodule


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
        set_submodule(model, path, module)
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
        for adapter, w in zip(self.adapters, weights):
            if any(u.magnitude is not None for u in adapter.updates.values()) and (len(adapters) > 1 or w != 1):
                raise AdapterError("a DoRA adapter is merged alone and at weight 1: its update rescales the "
                                   "weight, so it does not add up with others", where=adapter.source,
                                   fix="merge the DoRA adapter on its own, without --weights")
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
            if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
                raise AdapterError(f"the adapter's '{key}' (a trained bias or module) holds values that are "
                                   f"non-finite in {tensor.dtype}",
                                   fix="the adapter has diverged weights (or they overflow the base's dtype); "
                                       "check its training loss")
        items = self.updates.get(key)
        if not items:
            return tensor
        merged = tensor.to(torch.promote_types(tensor.dtype, torch.float32))
        if merged is tensor:
            merged = merged.clone()   # never write into the caller's tensor
        for w, update in items:
            if update.magnitude is not None:   # DoRA: not additive (checked alone, weight 1, in __init__)
                merged = update.apply(merged)
            else:
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

