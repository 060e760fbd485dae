"""Injection: swapping LoRA layers in at the targeted modules and freezing the rest.

Which modules are targeted is :mod:`lora_cli.lora.targets`' business. After injection only the LoRA tensors, and what the user asked for (``bias``,
``modules_to_save``), require grad. Base tensors keep their state-dict names.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from torch import nn

from .errors import AdapterError, TargetError
from .dora import DoraLinear
from .layers import LoraLayer, is_conv1d, is_linear, wrap
from .names import ALL_LINEAR, BIAS_CHOICES
from .targets import in_layers, layer_index, pattern_value, resolve_modules_to_save, resolve_targets


@dataclass
class LoraSpec:
    """How a model was adapted: the options, and the module paths they resolved to."""

    rank: int
    alpha: float
    dropout: float = 0.0
    use_rslora: bool = False
    bias: str = "none"
    targets: list[str] = field(default_factory=list)          # adapted module paths
    modules_to_save: list[str] = field(default_factory=list)  # fully trained module paths
    use_dora: bool = False                                    # DoRA layers (lora_cli.lora.dora) on Linear/Conv1D
    layers_to_transform: list[int] | None = None              # as given (PEFT's field); targets hold the result
    layers_pattern: list[str] | str | None = None


@dataclass
class AdaptedModule:
    """One row of the adaptation report."""

    name: str
    kind: str              # "linear", "conv1d", "embedding", or "full" (modules_to_save)
    shape: tuple[int, ...]
    rank: int | None
    trainable: int         # trainable parameters this module adds
    scale: float | None = None   # s = alpha / r (or alpha / sqrt(r)) of its update


@dataclass
class AdaptSummary:
    """Trainable vs total parameters and the per-module table, for the CLI to render."""

    trainable: int
    total: int
    modules: list[AdaptedModule]

    @property
    def percent(self) -> float:
        return 100.0 * self.trainable / self.total if self.total else 0.0


# --- matching -------------------------------------------------------------------------


# --- injection ------------------------------------------------------------------------

def lora_layers(model: nn.Module) -> dict[str, LoraLayer]:
    """The LoRA layers of a model, by dotted path."""
    return {path: m for path, m in model.named_modules() if isinstance(m, LoraLayer)}


def get_spec(model: nn.Module) -> LoraSpec | None:
    """The LoraSpec of an adapted model, or None for a plain one. Every LoRA layer holds
    it, so a wrapper around the model (DDP, FSDP, a user's own) keeps it."""
    return next((m.spec for m in model.modules() if isinstance(m, LoraLayer) and m.spec is not None), None)


def apply_lora(model: nn.Module, *, rank: int, alpha: float,
               target_modules: str | Sequence[str] = ALL_LINEAR, dropout: float = 0.0,
               use_rslora: bool = False, bias: str = "none", modules_to_save: Sequence[str] = (),
               exclude_modules: Sequence[str] = (), use_dora: bool = False,
               rank_pattern: Mapping[str, int] | None = None, alpha_pattern: Mapping[str, float] | None = None,
               layers_to_transform: int | Sequence[int] | None = None,
               layers_pattern: str | Sequence[str] | None = None) -> nn.Module:
    """Adapt ``model`` in place with LoRA (DoRA with ``use_dora``) and freeze everything
    else; returns it.

    ``rank_pattern`` / ``alpha_pattern`` give some modules their own rank / alpha (PEFT's
    matching: :func:`~lora_cli.lora.targets.pattern_value`); ``layers_to_transform``
    keeps only the targets in those layer indices (found after ``layers_pattern``, as
    PEFT does: :func:`~lora_cli.lora.targets.layer_index`).
    """
    targets = resolve_targets(model, target_modules, exclude_modules)
    if layers_to_transform is not None:
        kept = [p for p in targets if in_layers(p, layers_to_transform, layers_pattern)]
        if not kept:
            raise TargetError(f"layers_to_transform {layers_to_transform} keeps none of the {len(targets)} targeted "
                              f"modules (e.g. '{targets[0]}': layer {layer_index(targets[0], layers_pattern)})",
                              where="lora.layers_to_transform",
                              fix="give layer indices the model has, and lora.layers_pattern as the name of its "
                                  "layer list (layers, h, blocks)")
        targets = kept
    saved = resolve_modules_to_save(model, modules_to_save, targets)
    spec = LoraSpec(rank=rank, alpha=alpha, dropout=dropout, use_rslora=use_rslora, bias=bias,
                    targets=targets, modules_to_save=saved, use_dora=use_dora,
                    layers_to_transform=None if layers_to_transform is None else (
                        [layers_to_transform] if isinstance(layers_to_transform, int) else list(layers_to_transform)),
                    layers_pattern=layers_pattern if layers_pattern is None or isinstance(layers_pattern, str)
                    else list(layers_pattern))
    ranks = {p: int(pattern_value(rank_pattern, p, rank)) for p in targets}
    alphas = {p: float(pattern_value(alpha_pattern, p, alpha)) for p in targets}
    return inject(model, spec, ranks=ranks, alphas=alphas)


def inject(model: nn.Module, spec: LoraSpec, ranks: dict[str, int] | None = None,
           alphas: dict[str, float] | None = None) -> nn.Module:
    """Swap LoRA layers in at ``spec.targets`` (exact paths) and set requires_grad.

    ``ranks`` / ``alphas`` optionally give a per-module rank / alpha (rank and alpha patterns).
    """
    if get_spec(model) is not None or lora_layers(model):
        raise TargetError("this model already has LoRA layers",
                          fix="merge or remove the existing adapter before adding another")
    if spec.bias not in BIAS_CHOICES:
        raise TargetError(f"bias must be one of {', '.join(BIAS_CHOICES)}, got {spec.bias!r}", where="lora.bias")
    ranks = {path: (ranks or {}).get(path, spec.rank) for path in spec.targets}
    for path, rank in ranks.items():      # check everything before changing anything
        shape = tuple(model.get_submodule(path).weight.shape)
        # B @ A can never exceed rank min(out, in); a rank beyond max(out, in) cannot
        # even make A or B full rank, so it is surely a mistake.
        if rank > max(shape):
            raise TargetError(f"rank {rank} is larger than '{path}' allows ({shape}: at most {max(shape)})",
                              where="lora.rank", fix=f"use lora.rank <= {max(shape)}, or exclude '{path}'")
        if spec.use_dora and not is_linear(model.get_submodule(path)):
            raise TargetError(f"DoRA is not available for '{path}' ({type(model.get_submodule(path)).__name__}): "
                              "only Linear and Conv1D layers have a DoRA form here", where="lora.use_dora",
                              fix=f"exclude '{path}' from lora.target_modules, or set lora.use_dora: false")
    for path, rank in ranks.items():
        module = model.get_submodule(path)
        alpha = (alphas or {}).get(path, spec.alpha)
        if spec.use_dora:
            layer = DoraLinear(module, rank, alpha, spec.dropout, spec.use_rslora,
                               fan_in_fan_out=is_conv1d(module))
        else:
            layer = wrap(module, rank=rank, alpha=alpha, dropout=spec.dropout, use_rslora=spec.use_rslora)
        set_submodule(model, path, layer)
    _set_trainable(model, spec)
    for layer in lora_layers(model).values():
        layer.spec = spec
    return model


def set_submodule(model: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, leaf = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, module)


def _set_trainable(model: nn.Module, spec: LoraSpec) -> None:
    for p in model.parameters():
        p.requires_grad_(False)
    layers = lora_layers(model)
    for layer in layers.values():
        for p in layer.lora_parameters:
            p.requires_grad_(True)
    for path, module in trainable_biases(model, spec).items():
        module.bias.requires_grad_(True)
    for path in spec.modules_to_save:
        for p in model.get_submodule(path).parameters():
            p.requires_grad_(True)


def trainable_biases(model: nn.Module, spec: LoraSpec) -> dict[str, nn.Module]:
    """Modules whose bias is trained under ``spec.bias``: none, all, or the adapted ones
    only (``spec.targets``: before injection as after), never inside modules_to_save."""
    if spec.bias == "none":
        return {}
    modules = dict(model.named_modules())
    paths = spec.targets if spec.bias == "lora_only" else list(modules)
    return {path: modules[path] for path in paths
            if isinstance(getattr(modules[path], "bias", None), nn.Parameter)
            and not any(path == s or path.startswith(s + ".") for s in spec.modules_to_save)}


def trained_tensors(model: nn.Module, spec: LoraSpec) -> list[str]:
    """State-dict keys of the tensors besides the LoRA factors that train under ``spec``
    (and that an adapter holds): its trained biases, and every tensor of its
    modules_to_save. The same before injection and after it."""
    keys = [f"{p}.bias" if p else "bias" for p in trainable_biases(model, spec)]
    return keys + [f"{p}.{n}" for p in spec.modules_to_save for n in model.get_submodule(p).state_dict()]


# --- the report -----------------------------------------------------------------------

def summarize(model: nn.Module) -> AdaptSummary:
    """Trainable and total parameter counts and one row per adapted or saved module."""
    params = {id(p): p for p in model.parameters()}.values()
    total = sum(p.numel() for p in params)
    trainable = sum(p.numel() for p in params if p.requires_grad)
    rows = []
    for path, layer in lora_layers(model).items():
        count = sum(p.numel() for p in layer.lora_parameters)
        rows.append(AdaptedModule(path, layer.layout, tuple(layer.weight.shape), layer.rank, count, layer.scaling))
    spec = get_spec(model)
    for path in spec.modules_to_save if spec else ():
        module = model.get_submodule(path)
        weight = getattr(module, "weight", None)
        shape = tuple(weight.shape) if weight is not None else ()
        rows.append(AdaptedModule(path, "full", shape, None, sum(p.numel() for p in module.parameters())))
    return AdaptSummary(trainable=trainable, total=total, modules=rows)


def require_spec(model: nn.Module) -> LoraSpec:
    spec = get_spec(model)
    if spec is None:
        raise AdapterError("this model has no LoRA adapter", fix="call apply_lora() or load_adapter() first")
    return spec
