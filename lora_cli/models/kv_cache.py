"""A key/value cache for the built-in ``gpt``: generation linear in length, not quadratic.

:class:`~lora_cli.models.gpt.GPT`'s own ``forward`` recomputes every position on every
call. :func:`cached_forward` runs the same modules (so LoRA layers injected into them
take part unchanged) over only the new tokens, keeping each layer's keys and values:

    prefill   ids (B, T) at positions 0..T-1        -> logits (B, T, V), cache holds T
    step      ids (B, 1) at position  T             -> logits (B, 1, V), cache holds T + 1

Rows may be left-padded (batched generation): ``valid`` (B, T) marks real tokens, a row's
positions count its real tokens only, and no query attends to a pad key, so a padded row
computes what it would alone.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ..errors import ModelError
from .gpt import GPT, apply_rotary


@dataclass
class KVCache:
    """Per layer, the keys and values of every position so far, each (B, H, T, D)."""

    keys: list[torch.Tensor] = field(default_factory=list)
    values: list[torch.Tensor] = field(default_factory=list)
    valid: torch.Tensor | None = None         # (B, T) bool: real tokens (False on left padding)
    positions: torch.Tensor | None = None     # (B,) the next position of each row

    @property
    def length(self) -> int:
        return 0 if self.valid is None else self.valid.shape[1]


def _attend(attn, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, layer: int, cache: KVCache,
            mask: torch.Tensor) -> torch.Tensor:
    """``attn`` (an Attention module) over the new tokens ``x`` (B, T, C), appending their
    keys and values to the cache."""
    B, T, C = x.shape
    q = attn.q_proj(x).view(B, T, attn.n_head, attn.head_dim).transpose(1, 2)   # (B, H, T, D)
    k = attn.k_proj(x).view(B, T, attn.n_head, attn.head_dim).transpose(1, 2)   # (B, H, T, D)
    v = attn.v_proj(x).view(B, T, attn.n_head, attn.head_dim).transpose(1, 2)   # (B, H, T, D)
    q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
    if layer < len(cache.keys):
        k = torch.cat([cache.keys[layer], k], dim=2)                            # (B, H, S, D)
        v = torch.cat([cache.values[layer], v], dim=2)
        cache.keys[layer], cache.values[layer] = k, v
    else:
        cache.keys.append(k)
        cache.values.append(v)
    y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)                 # (B, H, T, D)
    return attn.o_proj(y.transpose(1, 2).contiguous().view(B, T, C))            # (B, T, C)


@torch.no_grad()
def cached_forward(model: GPT, ids: torch.Tensor, cache: KVCache, valid: torch.Tensor | None = None) -> torch.Tensor:
    """Logits (B, T, V) of the new tokens ``ids`` (B, T), given what ``cache`` holds;
    the cache is extended in place. ``valid`` (B, T) marks real tokens (default: all)."""
    B, T = ids.shape
    valid = torch.ones(B, T, dtype=torch.bool, device=ids.device) if valid is None else valid.bool()
    start = cache.positions if cache.positions is not None else torch.zeros(B, dtype=torch.long, device=ids.device)
    positions = start[:, None] + valid.long().cumsum(1) - valid.long()          # (B, T): real tokens count
    if int(positions.max()) >= model.max_seq_len:
        raise ModelError(f"generation reached the model's max_seq_len ({model.max_seq_len})",
                         where="--max-new-tokens", fix="use a shorter prompt or fewer new tokens")
    old = cache.length
    cache.valid = valid if cache.valid is None else torch.cat([cache.valid, valid], dim=1)   # (B, S)
    cache.positions = start + valid.long().sum(1)
    S = cache.valid.shape[1]
    # query t (at cache index old + t) sees key s when s <= old + t and s is real (or s is itself)
    q_index = torch.arange(old, old + T, device=ids.device)[:, None]           # (T, 1)
    k_index = torch.arange(S, device=ids.device)[None, :]                      # (1, S)
    mask = (k_index <= q_index)[None] & (cache.valid[:, None, :] | (k_index == q_index)[None])   # (B, T, S)
    mask = mask[:, None]                                                        # (B, 1, T, S)
    x = model.embed_tokens(ids)                                                 # (B, T, C)
    cos = model.rope_cos[positions].to(x.dtype)[:, None]                        # (B, 1, T, D)
    sin = model.rope_sin[positions].to(x.dtype)[:, None]
    for i, block in enumerate(model.layers):
        x = x + _attend(block.self_attn, block.input_layernorm(x), cos, sin, i, cache, mask)
        x = x + block.mlp(block.post_attention_layernorm(x))                    # (B, T, C)
    return model.lm_head(model.norm(x))                                         # (B, T, V)
