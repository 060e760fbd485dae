"""DoRA: weight-decomposed LoRA (Liu et al. 2024), without ever building B @ A.

For a Linear with frozen W (out, in), bias b, LoRA factors A (r, in), B (out, r), scale s
and a trained magnitude m (out,):

    y = (m / n) * (x W^T + s dropout(x) A^T B^T) + b        n_i = ||W_i + s (B A)_i||   (row norms)

m starts at the row norms of W, so a fresh adapter (B = 0) computes what the base does.
As in the paper (section 4.3) and PEFT, n is a constant in backward: gradients reach m,
A and B through the scaled sum only.

The row norms come from the low-rank identity, never from the (out, in) matrix W + s B A:

    n_i^2 = ||W_i||^2 + 2 s ((W A^T) * B)_i.sum() + s^2 ((B (A A^T)) * B)_i.sum()

||W_i||^2 is computed once (W is frozen; it is recomputed only if W changes in place);
each step then costs one thin matmul W A^T (out, r) and O(out r^2) more. The forward is
the LoRA kernel's single pass of x through W (:func:`lora_cli.lora.kernel.lora_linear`)
followed by one per-column scale: no second pass of the input through W, as PEFT makes.

Dropout: the scale multiplies the undropped base output x W^T, and dropout only touches
the LoRA branch, exactly as in plain LoRA. PEFT instead applies (m / n - 1) to W applied
to the *dropped* input (a second matmul), which has the same expectation but more noise
and twice the base-weight work. The two agree exactly at dropout 0 (tested against PEFT).

Merging folds everything into W: W' = (m / n) * (W + s B A), rows for a Linear, columns
for a Conv1D's (in, out) weight. Unmerging divides by the factor kept at merge time and
subtracts s B A again. Embeddings have no DoRA here: they are refused at injection.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .kernel import lora_linear
from .layers import LoraLinear

MAGNITUDE = "lora_magnitude_vector"     # the parameter's name, and PEFT's file key suffix


@torch.no_grad()
def weight_sq_norms(weight: torch.Tensor, layout: str) -> torch.Tensor:
    """||W_i||^2 per output row, float32 (out,); ``weight`` in its own layout."""
    dim = 1 if layout == "linear" else 0                  # Conv1D keeps W as (in, out)
    return torch.linalg.vector_norm(weight, dim=dim, dtype=torch.float32).square()


@torch.no_grad()
def dora_norms(weight: torch.Tensor, w_sq: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
               scaling: float) -> torch.Tensor:
    """Row norms of W + s B A (float32, (out,)) from the low-rank identity (module
    docstring); ``weight`` is (out, in) (a transposed view for Conv1D), ``w_sq`` its
    squared row norms. No (out, in) temporary is built."""
    with torch.autocast(weight.device.type, enabled=False):
        A32, B32 = A.float(), B.float()                              # (r, in), (out, r)
        wa = (weight @ A.t().to(weight.dtype)).float()              # (out, r)
        gram = A32 @ A32.t()                                         # (r, r)
        cross = (wa * B32).sum(1)                                    # (out,)
        quad = ((B32 @ gram) * B32).sum(1)                           # (out,)
        return (w_sq + (2 * scaling) * cross + (scaling * scaling) * quad).clamp_min_(0).sqrt_()


def dora_merged(weight: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scaling: float,
                magnitude: torch.Tensor, layout: str) -> tuple[torch.Tensor, torch.Tensor]:
    """((m / n) * (W + s B A) in float32 and ``weight``'s layout, the factor m / n (out,)).
    Here the sum is built anyway, so n is its exact row norm."""
    w = weight.float().t() if layout == "conv1d" else weight.float()      # (out, in)
    full = w + (B.float() @ A.float()) * scaling                          # (out, in)
    factor = magnitude.float() / torch.linalg.vector_norm(full, dim=1)    # (out,)
    full.mul_(factor[:, None])
    return (full.t() if layout == "conv1d" else full), factor


class DoraLinear(LoraLinear):
    """``y = (m / ||W + s B A||_row) * (x W^T + s dropout(x) A^T B^T) + b`` over a frozen
    Linear or Conv1D (see the module docstring)."""

    def __init__(self, base: nn.Module, rank: int, alpha: float, dropout: float = 0.0,
                 use_rslora: bool = False, fan_in_fan_out: bool = False):
        super().__init__(base, rank, alpha, dropout, use_rslora, fan_in_fan_out)
        self._w_sq_key = None
        self._w_sq = None
        self._merge_factor = None
        self.lora_magnitude_vector = nn.Parameter(self._weight_sq().sqrt())      # (out,) float32

    @property
    def lora_names(self) -> tuple[str, ...]:
        return (*super().lora_names, MAGNITUDE)

    def _weight_sq(self) -> torch.Tensor:
        """||W_i||^2, computed once per state of W (recomputed if W is replaced or changed)."""
        w = self.weight
        key = (w.data_ptr(), w._version, w.dtype, w.device, self.merged)
        if self._w_sq_key != key:
            self._w_sq, self._w_sq_key = weight_sq_norms(w, self.layout), key
        return self._w_sq

    def weight_norm(self) -> torch.Tensor:
        """||W + s B A||_row (out,), float32, no gradient."""
        weight = self.weight.t() if self.fan_in_fan_out else self.weight      # (out, in)
        return dora_norms(weight, self._weight_sq(), self.lora_A, self.lora_B, self.scaling)

    def forward(self, x: torch.Tensor) -> torch.Tensor:          # x: (..., in) -> (..., out)
        weight = self.weight.t() if self.fan_in_fan_out else self.weight   # (out, in)
        if self.merged:
            return F.linear(x, weight, self.bias)
        z = lora_linear(x, weight, None, self.lora_A, self.lora_B, self.scaling,
                        self.dropout if self.training else 0.0)           # (..., out)
        factor = (self.lora_magnitude_vector / self.weight_norm()).to(z.dtype)   # (out,)
        if self.bias is None:
            return z * factor
        return torch.addcmul(self.bias.to(z.dtype), z, factor)

    @torch.no_grad()
    def merged_weight(self) -> torch.Tensor:
        merged, self._merge_factor = dora_merged(self.weight, self.lora_A, self.lora_B, self.scaling,
                                                 self.lora_magnitude_vector, self.layout)
        if not torch.isfinite(merged).all():
            raise FloatingPointError(
                f"merging DoRA into a {tuple(self.weight.shape)} weight gave non-finite values; "
                "the adapter weights are probably diverged, or a row of the weight is zero")
        return merged.to(self.weight.dtype)

    @torch.no_grad()
    def unmerge(self) -> None:
        """W = W' / (m / n) - s B A, with the factor kept at merge time."""
        if not self.merged:
            return
        factor = self._merge_factor[:, None] if self.layout == "linear" else self._merge_factor[None, :]
        wide = self.weight.to(torch.promote_types(self.weight.dtype, torch.float32))
        self.weight.copy_((wide / factor - self.delta_weight()).to(self.weight.dtype))
        self.merged = False

    def extra_repr(self) -> str:
        return super().extra_repr() + ", dora=True"
