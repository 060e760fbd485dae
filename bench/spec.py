"""What every run shares: model sizes, LoRA targets, AdamW settings, and the FLOP model
behind the "ideal" ratios. No torch here, so the runner stays light.

For a linear layer (in=k, out=d) over N tokens (BENCHMARK.md, "The physics"):

    floor (frozen, forward + input grad)   4 N k d
    full fine-tuning (+ weight grad)       6 N k d
    LoRA (floor + two thin matmuls)        4 N k d + 6 N r (k + d)

Summed over a model, with F = sum k*d over every Linear (lm_head included, all of them
pay forward + input grad in every variant) and R = sum r*(k + d) over the adapted ones:

    ideal ours/full  = (4F + 6R) / 6F = 2/3 + R/F
    ideal ours/floor = (4F + 6R) / 4F = 1 + 1.5 R/F

Ignored, because they are the same work in every variant: attention's QK^T and AV
matmuls, norms, activations, embedding lookups, the loss; ignored as well: the optimizer
(elementwise, but proportional to trainable parameters: large only for full). Both push
measured ratios towards 1; they are what "floor" measures beyond 4F.
"""

from __future__ import annotations

ADAMW = {"lr": 1e-3, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.01, "foreach": True}

# Llama shapes. tiny is for the tests only.
SIZES = {
    "tiny": dict(hidden=64, layers=2, intermediate=128, heads=4, vocab=256, batch=2, seq=32),
    "S": dict(hidden=512, layers=4, intermediate=1376, heads=8, vocab=2048, batch=8, seq=128),
    "M": dict(hidden=768, layers=12, intermediate=2048, heads=12, vocab=8192, batch=4, seq=256),
}
TARGETS = {
    "all": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "qv": ["q_proj", "v_proj"],
}


def llama_linears(size: str) -> list[tuple[str, int, int]]:
    """(leaf name, in, out) of every nn.Linear of LlamaForCausalLM, lm_head last."""
    s = SIZES[size]
    h, i = s["hidden"], s["intermediate"]       # num_key_value_heads == heads: k, v are (h, h)
    layer = [("q_proj", h, h), ("k_proj", h, h), ("v_proj", h, h), ("o_proj", h, h),
             ("gate_proj", h, i), ("up_proj", h, i), ("down_proj", i, h)]
    return layer * s["layers"] + [("lm_head", h, s["vocab"])]


def ideal(linears: list[tuple[str, int, int]], adapted: list[str], rank: int) -> dict:
    """Ideal ours/full and ours/floor step-time ratios from the FLOP model above."""
    F = sum(k * d for _, k, d in linears)
    R = sum(rank * (k + d) for name, k, d in linears if name in adapted)
    return {"ours_over_full": 2 / 3 + R / F, "ours_over_floor": 1 + 1.5 * R / F,
            "linear_flops_per_token_fwd": 2 * F, "lora_flops_per_token_fwd": 2 * R}
