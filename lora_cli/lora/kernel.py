"""The LoRA Linear's hot path: forward and backward written out, and a cheap dropout.

For x (N, in), frozen W (out, in), b (out,), A (r, in), B (out, r), a keep-mask K (N, in)
(all ones without dropout) and s = scaling / (1 - p):

    forward     h   = (K * x) A^T                     (N, r)
                y   = x W^T + b + s h B^T             (N, out)    one addmm, then addmm_ in place
    backward    g_h = s g B                           (N, r)
                g_x = g W + K * (g_h A)               (N, in)     addmm_ in place when K is all ones
                g_A = g_h^T (K * x)                   (r, in)
                g_B = s g^T h                         (out, r)

Autograd on the plain expression pays for more: a separate (N, in) gradient for x from
the LoRA branch that it then adds to the base one, several small graph nodes per layer,
and a dropout that draws one float per element. Here the only (N, in) temporary is the
dropped input, and only when dropout is on.

Dropout draws its mask from 16-bit random lanes, four to a 64-bit draw, so the drop
probability is p rounded to 1/65536 (within 1e-5 of p) and the survivors are scaled by
exactly 1 / (1 - that). On a 2-core CPU a (1024, 512) mask takes 0.75 ms this way and
F.dropout 2.7 ms.

Each layer draws its own mask, as PEFT's do, unless the caller asks otherwise: inside
``with sharing_dropout():`` layers that read the very same input tensor (q, k and v;
gate and up) share one mask and one dropped copy, so the input is dropped once, not once
per layer. That is faster and lighter, and a different method (the three projections see
the same dropped features), so it is a choice: lora-train makes it with
``lora.dropout_shared``. The shared copy lives only inside the block.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator

import torch


def keep_mask(x: torch.Tensor, p: float) -> tuple[torch.Tensor, float]:
    """(keep (same shape as x, bool), effective p): each element kept with probability 1 - p."""
    if x.device.type != "cpu":   # accelerators draw Bernoulli masks fast already
        return torch.empty(x.shape, dtype=torch.bool, device=x.device).bernoulli_(1 - p), p
    n = x.numel()
    drop = round(p * 65536)                               # drop when a uniform 16-bit lane < drop
    draws = torch.empty(-(-n // 4), dtype=torch.int64).random_(-2**63, 2**63 - 1)   # 64 random bits
    lanes = draws.view(torch.int16)[:n]                   # (n,) uniform over [-32768, 32767]
    return (lanes >= drop - 32768).view(x.shape), drop / 65536


class SharedDropout:
    """Dropout that reuses the last mask when the same, unchanged input comes again.

    q, k and v (or gate and up) are called one after the other on the very same tensor;
    they get one mask and one dropped copy of it. Holds only the most recent input, and
    only while :func:`sharing_dropout` is active.
    """

    def __init__(self):
        self._key = None
        self._value = None

    @torch.no_grad()
    def __call__(self, source: torch.Tensor, x: torch.Tensor, p: float) -> tuple[torch.Tensor, torch.Tensor, float]:
        """(dropped x, unscaled; keep mask; effective p) for ``x``, the 2-D view of the
        layer input ``source``; the same unchanged ``source`` gets the same answer."""
        key = (source, source._version, p, x.dtype)
        if self._key is not None and self._key[0] is source and self._key[1:] == key[1:]:
            return self._value
        keep, p_eff = keep_mask(x, p)
        self._key, self._value = key, (torch.where(keep, x, 0), keep, p_eff)
        return self._value

    def clear(self) -> None:
        self._key = self._value = None


_SHARED: contextvars.ContextVar[SharedDropout | None] = contextvars.ContextVar("lora_cli_shared_dropout",
                                                                             default=None)


@contextlib.contextmanager
def sharing_dropout(enabled: bool = True) -> Iterator[SharedDropout | None]:
    """Within the block, LoRA layers that read the same input tensor share one dropout
    mask and one dropped copy of the input (see the module docstring); it is all dropped
    when the block ends. Yields the share (None with ``enabled=False``, which makes the
    block do nothing)."""
    if not enabled:
        yield None
        return
    share = SharedDropout()
    token = _SHARED.set(share)
    try:
        yield share
    finally:
        _SHARED.reset(token)
        share.clear()


def _dropped(x: torch.Tensor, x2: torch.Tensor, p: float) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(dropped x2, keep mask, effective p): shared when :func:`sharing_dropout` is on."""
    share = _SHARED.get()
    if share is not None:
        return share(x, x2, p)
    keep, p_eff = keep_mask(x2, p)
    return torch.where(keep, x2, 0), keep, p_eff


def packed(weight: torch.Tensor) -> bool:
    """A quantized base weight: a tensor subclass (torchao's NF4 or int8) that stands for a dense matrix."""
    return type(weight) not in (torch.Tensor, torch.nn.Parameter)


def dense(weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The matrix a weight stands for, in ``dtype``: a quantized one is dequantized for this use only
    (it stays packed in the model and in what backward saves)."""
    if not packed(weight):
        return weight
    undo = getattr(weight, "get_original_weight", None) or weight.dequantize   # NF4 / int8
    return undo().to(dtype)


class LoraLinearFunction(torch.autograd.Function):
    """y = x W^T + b + s ((K * x) A^T) B^T, with the backward above. 2-D inputs only."""

    @staticmethod
    def forward(ctx, x, weight, bias, lora_A, lora_B, scaling, dropped, keep):
        # x: (N, in); weight: (out, in); dropped: K * x (or x itself); keep: (N, in) bool or None
        w = dense(weight, x.dtype)                                                       # (out, in)
        out = torch.addmm(bias, x, w.t()) if bias is not None else x @ w.t()             # (N, out)
        h = dropped @ lora_A.t()                                                         # (N, r)
        out.addmm_(h, lora_B.t(), alpha=scaling)
        ctx.scaling = scaling
        ctx.save_for_backward(x if ctx.needs_input_grad[1] else None, weight, lora_A, lora_B, dropped, h, keep)
        return out

    @staticmethod
    def backward(ctx, g):                                                                # g: (N, out)
        x, weight, lora_A, lora_B, dropped, h, keep = ctx.saved_tensors
        s = ctx.scaling
        need_x, need_w, need_b, need_a, need_bb = ctx.needs_input_grad[:5]
        g_h = (g @ lora_B).mul_(s) if (need_x or need_a) else None                       # (N, r)
        g_x = g_w = g_b = g_a = g_bb = None
        if need_x:
            g_x = g @ dense(weight, g.dtype)                                             # (N, in)
            if keep is None:
                g_x.addmm_(g_h, lora_A)
            else:
                g_x.add_((g_h @ lora_A).mul_(keep))
        if need_w:
            g_w = g.t() @ x                                                              # (out, in)
        if need_b:
            g_b = g.sum(0)                                                               # (out,)
        if need_a:
            g_a = g_h.t() @ dropped                                                      # (r, in)
        if need_bb:
            g_bb = (g.t() @ h).mul_(s)                                                   # (out, r)
        return g_x, g_w, g_b, g_a, g_bb, None, None, None


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype a matmul on ``x`` runs in: autocast's, when autocast is on for x's device."""
    device = x.device.type
    try:
        if torch.is_autocast_enabled(device):
            return torch.get_autocast_dtype(device)
    except TypeError:   # torch < 2.4: no device argument
        if device == "cpu" and torch.is_autocast_cpu_enabled():
            return torch.get_autocast_cpu_dtype()
        if device == "cuda" and torch.is_autocast_enabled():
            return torch.get_autocast_gpu_dtype()
    return x.dtype


def lora_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, lora_A: torch.Tensor,
                lora_B: torch.Tensor, scaling: float, dropout: float) -> torch.Tensor:
    """LoRA Linear on x (..., in) -> (..., out); ``weight`` is (out, in) (a view for Conv1D)."""
    dtype = compute_dtype(x)
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1]).to(dtype)                                            # (N, in)
    if dropout:
        dropped, keep, p = _dropped(x, x2, dropout)
        scaling = scaling / (1.0 - p) if p < 1 else 0.0   # p = 1: the whole branch is dropped
    else:
        dropped, keep = x2, None
    with torch.autocast(x.device.type, enabled=False):
        out = LoraLinearFunction.apply(x2, weight if packed(weight) else weight.to(dtype), None if bias is None else bias.to(dtype),
                                       lora_A.to(dtype), lora_B.to(dtype), scaling, dropped, keep)
    return out.view(*lead, out.shape[-1])
