"""LoRA+ (Hayou et al. 2024): the B factors learn faster than the A factors.

With lr for A (and everything else that trains) and lr x R for every B (``lora_B``, and
an embedding's ``lora_embedding_B``), the update B @ A learns efficiently at large
width; the paper suggests R around 16. It only groups the parameters for the optimizer:
no per-step cost, and any torch optimizer takes the groups.
"""

from __future__ import annotations

from torch import nn

from .layers import LoraLayer


def loraplus_param_groups(model: nn.Module, lr: float, ratio: float) -> list[dict]:
    """Optimizer parameter groups: ``[{"params": the rest, "lr": lr}, {"params": the B
    factors, "lr": lr * ratio}]``, over the parameters that require grad, in model order.

    B factors are found by module type (each LoRA layer's second factor), never by name
    matching; the model may be sharded in place (FSDP2) but not wrapped (pass DDP's
    ``.module``).
    """
    if not ratio > 0:
        raise ValueError(f"the LoRA+ ratio must be > 0, got {ratio}")
    b_names = {f"{path}.{layer.lora_names[1]}" if path else layer.lora_names[1]
               for path, layer in model.named_modules() if isinstance(layer, LoraLayer)}
    rest, fast = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (fast if name in b_names else rest).append(p)
    return [{"params": rest, "lr": lr}, {"params": fast, "lr": lr * ratio}]
