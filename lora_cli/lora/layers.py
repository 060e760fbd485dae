"""LoRA layers: a frozen base weight plus a trainable low-rank update.

For a Linear layer with weight W (out, in) and bias b (out,):

    y = x W^T + b + s * dropout(x) A^T B^T

    A: (r, in)    Kaiming-uniform at start (a = sqrt(5), as nn.Linear)
    B: (out, r)   zero at start, so a fresh adapter computes exactly what the base does
    s = alpha / r             (alpha / sqrt(r) with rsLoRA)

The update B @ A is never materialized while training: the forward runs the two thin
matmuls x A^T (N, r) then (N, r) B^T, so the backward never forms an (out, in) weight
gradient. Only A and B (and whatever the user chose to train) get gradients.

GPT-2 style ``Conv1D`` layers keep W as (in, out) and compute x W + b; the same layer
handles them with ``fan_in_fan_out=True``. A and B keep their usual shapes either way.

For an Embedding with weight E (num, dim):

    y = E[x] + s * A^T[x] B^T          A: (r, num), B: (dim, r)

following PEFT's layout (there A starts at zero and B normal, the transpose of the
Linear convention, so the output is again unchanged at start).

The base tensors keep their names: a wrapped module still has ``weight`` and ``bias``,
so ``<path>.weight`` in a plain base state dict loads into an adapted model unchanged.
Merging is explicit: :meth:`merge` folds ``s * B @ A`` into W (in float32, cast once),
:meth:`unmerge` takes it out again; both are no-ops when already in that state.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .kernel import lora_linear
from .names import FACTORS

# nn.Module's own bookkeeping: a rebuilt module gets fresh ones
_MODULE_STATE = frozenset(vars(nn.Module()))


def lora_delta(A: torch.Tensor, B: torch.Tensor, scaling: float, layout: str) -> torch.Tensor:
    """s * B @ A in float32, laid out like the adapted weight: (out, in) for a Linear,
    (in, out) for a Conv1D, (num, dim) for an Embedding (whose A is (r, num), B (dim, r))."""
    delta = (B.float() @ A.float()) * scaling        # (out, in), or (dim, num)
    return delta if layout == "linear" else delta.t()


def lora_scaling(rank: int, alpha: float, use_rslora: bool = False) -> float:
    """The factor s applied to the low-rank update: alpha / r, or alpha / sqrt(r) (rsLoRA)."""
    return alpha / math.sqrt(rank) if use_rslora else alpha / rank


class LoraLayer(nn.Module):
    """What every LoRA layer shares: the wrapped module, the scale, merge bookkeeping.

    Subclasses set their two factors (``lora_A``/``lora_B``, or the embedding pair:
    names.FACTORS) and their ``layout``.
    """

    weight: nn.Parameter
    bias: nn.Parameter | None

    def __init__(self, base: nn.Module, rank: int, alpha: float, use_rslora: bool):
        super().__init__()
        if rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {rank}")
        if any(True for _ in base.children()) or set(base._parameters) - {"weight", "bias"}:
            raise TypeError(f"a {type(base).__name__} with sub-modules or other parameters than weight and bias "
                            "cannot be adapted")
        # Share the base's Parameter objects (and buffers): no copy, same state-dict names.
        self.weight = base.weight
        self.bias = getattr(base, "bias", None)
        for name, buffer in base.named_buffers(recurse=False):
            self.register_buffer(name, buffer, persistent=name not in base._non_persistent_buffers_set)
        self.rank = rank
        self.alpha = alpha
        self.use_rslora = use_rslora
        self.scaling = lora_scaling(rank, alpha, use_rslora)
        self.merged = False
        self.spec = None            # the LoraSpec of the whole adaptation, set by inject()
        # How to rebuild the wrapped module on unload: its class and its plain attributes
        # (in_features, padding_idx, ...), never its tensors, which live here.
        self._base_class = type(base)
        self._base_params = list(base._parameters)   # ["weight", "bias"], bias None when it has none
        self._base_attrs = {k: v for k, v in vars(base).items()
                            if k not in _MODULE_STATE and not isinstance(v, (torch.Tensor, nn.Module))}
        self.train(base.training)   # in the mode of the module it replaces: no dropout in an eval-mode model

    layout: str        # "linear", "conv1d" or "embedding" (see lora_cli.lora.names.LAYOUTS)

    @property
    def factors(self) -> tuple[nn.Parameter, nn.Parameter]:
        """(A, B), whatever their parameter names in this layout (names.FACTORS)."""
        a, b = FACTORS[self.layout]
        return getattr(self, a), getattr(self, b)

    @property
    def lora_names(self) -> tuple[str, ...]:
        """The names of this layer's adapter parameters: its two factors, plus DoRA's
        magnitude in a DoRA layer."""
        return FACTORS[self.layout]

    @property
    def lora_parameters(self) -> list[nn.Parameter]:
        """This layer's adapter parameters (what trains), in ``lora_names`` order."""
        return [getattr(self, name) for name in self.lora_names]

    def delta_weight(self) -> torch.Tensor:
        """s * B @ A in float32, laid out like ``weight`` (see :func:`lora_delta`)."""
        A, B = self.factors
        return lora_delta(A, B, self.scaling, self.layout)

    @torch.no_grad()
    def merge(self) -> None:
        """Fold s * B @ A into the base weight (float32 math, one cast). Idempotent."""
        if self.merged:
            return
        self.weight.copy_(self.merged_weight())
        self.merged = True

    @torch.no_grad()
    def merged_weight(self) -> torch.Tensor:
        """W + s * B @ A in (at least) float32, cast once to W's dtype; checked finite."""
        merged = self.weight.to(torch.promote_types(self.weight.dtype, torch.float32)) + self.delta_weight()
        if not torch.isfinite(merged).all():
            raise FloatingPointError(
                f"merging LoRA into a {tuple(self.weight.shape)} weight gave non-finite values; "
                "the adapter weights are probably diverged (check the training loss)"
            )
        return merged.to(self.weight.dtype)

    @torch.no_grad()
    def unmerge(self) -> None:
        """Take the update back out of the base weight. Idempotent.

        Exact up to float rounding: in float32 the round trip differs from the original
        weight by a few ulps; in bfloat16 by more, so keep the base for exactness.
        """
        if not self.merged:
            return
        wide = self.weight.to(torch.promote_types(self.weight.dtype, torch.float32))
        self.weight.copy_((wide - self.delta_weight()).to(self.weight.dtype))
        self.merged = False

    def unload(self) -> nn.Module:
        """A module of the wrapped class again, holding the current (merged or not) base
        weights: the same Parameter objects, so nothing is copied."""
        base = self._base_class.__new__(self._base_class)
        nn.Module.__init__(base)
        vars(base).update(self._base_attrs)
        for name in self._base_params:
            base.register_parameter(name, getattr(self, name))
        for name, buffer in self.named_buffers(recurse=False):
            base.register_buffer(name, buffer, persistent=name not in self._non_persistent_buffers_set)
        base.train(self.training)
        return base

    def extra_repr(self) -> str:
        return f"rank={self.rank}, alpha={self.alpha}, scaling={self.scaling:g}, merged={self.merged}"


class LoraLinear(LoraLayer):
    """``y = x W^T + b + s * dropout(x) A^T B^T`` over a frozen ``nn.Linear`` (or Conv1D)."""

    def __init__(
        self,
        base: nn.Module,
        rank: int,
        alpha: float,
        dropout: float = 0.0,
        use_rslora: bool = False,
        fan_in_fan_out: bool = False,
    ):
        super().__init__(base, rank, alpha, use_rslora)
        self.fan_in_fan_out = fan_in_fan_out
        in_features, out_features = self.weight.shape[::-1] if not fan_in_fan_out else self.weight.shape
        self.in_features, self.out_features = int(in_features), int(out_features)
        self.dropout = float(dropout)
        factory = {"device": self.weight.device, "dtype": torch.float32}
        self.lora_A = nn.Parameter(torch.empty(rank, self.in_features, **factory))   # (r, in)
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, rank, **factory))  # (out, r)
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:          # x: (..., in) -> (..., out)
        weight = self.weight.t() if self.fan_in_fan_out else self.weight   # (out, in)
        if self.merged:
            return F.linear(x, weight, self.bias)
        return lora_linear(x, weight, self.bias, self.lora_A, self.lora_B, self.scaling,
                           self.dropout if self.training else 0.0)

    @property
    def layout(self) -> str:
        return "conv1d" if self.fan_in_fan_out else "linear"


class LoraEmbedding(LoraLayer):
    """``y = E[x] + s * A^T[x] B^T`` over a frozen ``nn.Embedding``."""

    def __init__(self, base: nn.Embedding, rank: int, alpha: float, use_rslora: bool = False):
        super().__init__(base, rank, alpha, use_rslora)
        self.num_embeddings, self.embedding_dim = (int(n) for n in self.weight.shape)
        self.padding_idx = base.padding_idx
        self.max_norm = base.max_norm
        self.norm_type = base.norm_type
        self.scale_grad_by_freq = base.scale_grad_by_freq
        self.sparse = base.sparse
        factory = {"device": self.weight.device, "dtype": torch.float32}
        self.lora_embedding_A = nn.Parameter(torch.zeros(rank, self.num_embeddings, **factory))  # (r, num)
        self.lora_embedding_B = nn.Parameter(torch.empty(self.embedding_dim, rank, **factory))   # (dim, r)
        nn.init.normal_(self.lora_embedding_B)

    def _embed(self, ids: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, table, self.padding_idx, self.max_norm, self.norm_type,
                           self.scale_grad_by_freq, self.sparse)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:        # ids: (...)
        out = self._embed(ids, self.weight)                       # (..., dim)
        if self.merged:
            return out
        h = self._embed(ids, self.lora_embedding_A.t())           # (..., r)
        update = h @ self.lora_embedding_B.t()                    # (..., dim)
        return out + self.scaling * update.to(out.dtype)

    layout = "embedding"


def is_conv1d(module: nn.Module) -> bool:
    """GPT-2 style Conv1D (transformers.pytorch_utils.Conv1D): a Linear with W as (in, out)."""
    return type(module).__name__ == "Conv1D" and getattr(module, "weight", None) is not None \
        and module.weight.dim() == 2


def is_linear(module: nn.Module) -> bool:
    """A layer LoRA can adapt as a Linear: ``nn.Linear`` or a GPT-2 Conv1D."""
    return isinstance(module, nn.Linear) or is_conv1d(module)


def is_adaptable(module: nn.Module) -> bool:
    """Whether a LoRA layer exists for this module type."""
    return is_linear(module) or isinstance(module, nn.Embedding)


def wrap(module: nn.Module, *, rank: int, alpha: float, dropout: float = 0.0,
         use_rslora: bool = False) -> LoraLayer:
    """The LoRA layer for ``module``; its base tensors are shared, not copied."""
    if isinstance(module, nn.Embedding):
        return LoraEmbedding(module, rank, alpha, use_rslora)
    if is_linear(module):
        return LoraLinear(module, rank, alpha, dropout, use_rslora, fan_in_fan_out=is_conv1d(module))
    raise TypeError(f"no LoRA layer for {type(module).__name__}")
