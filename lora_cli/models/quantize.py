"""A quantized frozen base (``model.quantize``, QLoRA's recipe), with torchao's tensors.

    nf4    4-bit NormalFloat in blocks of 64 weights, the blocks' scales quantized again
           to 8 bits (double quantization): about 0.52 bytes a weight, 1/8 of float32
    int8   8-bit integers with one float scale per output channel: about 1/4 of float32

Every frozen 2-D Linear weight (the adapted layers' and the others', ``lm_head`` included)
is replaced by a torchao tensor that dequantizes to ``dtype`` where it is used, so the
matmuls run in the compute dtype and the backward pass reaches the input; the LoRA
weights stay float32 and trainable. Embeddings, norms and biases are kept as they are.
The quantization is lossy (NF4: about 9 % relative error per weight matrix), which is why
``lora-merge`` merges into the original float base file, never into this copy.

Layers are quantized one by one, each float weight freed as its quantized copy takes its
place, so the float base is held once (as loaded) and shrinks as the walk goes.
"""

from __future__ import annotations

import contextlib
import io
import logging
import warnings

import torch
from torch import nn

from ..errors import ConfigError

BLOCK = 64             # NF4 weights per block (one scale each)
SCALER_BLOCK = 256     # scales per second-level block, at most (a divisor of their count)


def _torchao():
    """torchao's NF4 and int8 pieces, imported quietly (it reports optional CUDA kernels it cannot load)."""
    try:
        with warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()):
            warnings.simplefilter("ignore")
            previous = logging.root.manager.disable
            logging.disable(logging.WARNING)
            try:
                from torchao.quantization import Int8WeightOnlyConfig, quantize_
                from torchao.quantization.quantize_.workflows.nf4.nf4_tensor import to_nf4
            finally:
                logging.disable(previous)
    except ImportError:
        raise ConfigError(["model.quantize: needs the torchao package, which is not installed"],
                          fix='install the extra: pip install -e ".[quant]" (or pip install torchao), '
                              "or set model.quantize: null") from None
    return to_nf4, quantize_, Int8WeightOnlyConfig


def quantizable(name: str, module: nn.Module) -> bool:
    """A frozen 2-D weight of a Linear (or LoRA-wrapped Linear) layer."""
    from ..lora.layers import LoraLinear
    w = getattr(module, "weight", None)
    return (isinstance(module, (nn.Linear, LoraLinear)) and isinstance(w, nn.Parameter) and w.dim() == 2
            and not w.requires_grad and not is_quantized(w))


def is_quantized(t: torch.Tensor) -> bool:
    return type(t).__module__.startswith("torchao")


def stored_bytes(t: torch.Tensor) -> int:
    """Bytes a (possibly quantized) tensor keeps: the sum of its inner tensors for torchao's."""
    if is_quantized(t):
        names, _ = t.__tensor_flatten__()
        return sum(stored_bytes(getattr(t, n)) for n in names)
    return t.numel() * t.element_size()


def _nf4(weight: torch.Tensor, to_nf4) -> torch.Tensor:
    scales = weight.numel() // BLOCK
    scaler_block = max(d for d in range(1, SCALER_BLOCK + 1) if scales % d == 0)
    return to_nf4(weight, BLOCK, scaler_block)


def _int8(weight: torch.Tensor, quantize_, config) -> torch.Tensor:
    holder = nn.Linear(weight.shape[1], weight.shape[0], bias=False, device="meta")
    holder.weight = nn.Parameter(weight, requires_grad=False)
    quantize_(holder, config())
    return holder.weight


def quantize_model(model: nn.Module, kind: str, dtype: torch.dtype) -> list[str]:
    """Replace every frozen Linear weight of ``model`` by its ``kind`` quantized copy
    (computed in ``dtype``), layer by layer; notes for the user (layers left in float)."""
    to_nf4, quantize_, config = _torchao()
    kept: list[str] = []
    seen: set[int] = set()
    for name, module in list(model.named_modules()):
        if not quantizable(name, module) or id(module.weight) in seen:
            continue
        weight = module.weight
        seen.add(id(weight))
        if kind == "nf4" and weight.numel() % BLOCK:
            kept.append(name)
            continue
        w = weight.detach().to(dtype)
        q = _nf4(w, to_nf4) if kind == "nf4" else _int8(w, quantize_, config)
        module.weight = nn.Parameter(q, requires_grad=False)
        for other in model.modules():                  # tied uses (lm_head = embed_tokens) stay tied
            if other is not module and getattr(other, "weight", None) is weight and isinstance(other, nn.Linear):
                other.weight = module.weight
        del weight, w
    if kept:
        return [f"model.quantize {kind}: {len(kept)} layers whose weight count is not a multiple of {BLOCK} "
                f"stay in {str(dtype).removeprefix('torch.')} ({', '.join(kept[:3])}{'...' if len(kept) > 3 else ''})"]
    return []
