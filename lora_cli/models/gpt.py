"""A small Llama-style causal decoder, written to be read in one sitting.

    ids (B, T)
      -> embed_tokens                                  (B, T, C)
      -> n_layer x Block:
           x = x + self_attn(input_layernorm(x))       causal attention, rotary positions
           x = x + mlp(post_attention_layernorm(x))    SwiGLU
      -> norm -> lm_head                               (B, T, vocab)

Module names follow Llama/Hugging Face (``layers.N.self_attn.q_proj``,
``layers.N.mlp.gate_proj``, ``lm_head``...), so LoRA target lists written for Llama
models work here unchanged. Every projection is an ``nn.Linear`` without bias.
Positions are rotary (RoPE): nothing positional is stored in the state dict.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..errors import ModelError


def check_sizes(*, minimum: int = 1, **sizes) -> None:
    """A ModelError for the first size that is not an integer >= ``minimum``."""
    for name, value in sizes.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise ModelError(
                f"must be an integer >= {minimum}, got {value!r}",
                where=f"model.args.{name}",
                fix=f"set model.args.{name} to a whole number >= {minimum}",
            )


class RMSNorm(nn.Module):
    """``x / rms(x) * weight``, computed in float32 (as Llama)."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (..., C)
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return h.to(x.dtype) * self.weight


def rotary_tables(seq_len: int, head_dim: int, base: float = 10000.0) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables for rotary positions, each (seq_len, head_dim)."""
    inv_freq = 1.0 / base ** (torch.arange(0, head_dim, 2).float() / head_dim)  # (D/2,)
    angles = torch.outer(torch.arange(seq_len).float(), inv_freq)                # (T, D/2)
    angles = torch.cat([angles, angles], dim=-1)                                 # (T, D)
    return angles.cos(), angles.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate each (i, i + D/2) pair of ``x`` (B, H, T, D) by its position's angle."""
    x1, x2 = x.chunk(2, dim=-1)                      # (B, H, T, D/2) each
    rotated = torch.cat([-x2, x1], dim=-1)           # (B, H, T, D)
    return x * cos + rotated * sin


class Attention(nn.Module):
    """Multi-head causal self-attention with rotary positions."""

    def __init__(self, d_model: int, n_head: int, dropout: float):
        super().__init__()
        self.n_head = n_head
        self.head_dim = d_model // n_head
        self.dropout = dropout
        self.q_proj = nn.Linear(d_model, d_model, bias=False)
        self.k_proj = nn.Linear(d_model, d_model, bias=False)
        self.v_proj = nn.Linear(d_model, d_model, bias=False)
        self.o_proj = nn.Linear(d_model, d_model, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        B, T, C = x.shape
        # (B, T, C) -> (B, H, T, D)
        q = self.q_proj(x).view(B, T, self.n_head, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, T, self.n_head, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.n_head, self.head_dim).transpose(1, 2)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        y = F.scaled_dot_product_attention(      # mask (B, 1, T, T): causal inside each packed example
            q, k, v, attn_mask=mask, is_causal=mask is None, dropout_p=self.dropout if self.training else 0.0
        )                                                        # (B, H, T, D)
        y = y.transpose(1, 2).contiguous().view(B, T, C)         # (B, T, C)
        return self.o_proj(y)


class SwiGLU(nn.Module):
    """``down_proj(silu(gate_proj(x)) * up_proj(x))``: the Llama feed-forward."""

    def __init__(self, d_model: int, d_ff: int):
        super().__init__()
        self.gate_proj = nn.Linear(d_model, d_ff, bias=False)
        self.up_proj = nn.Linear(d_model, d_ff, bias=False)
        self.down_proj = nn.Linear(d_ff, d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:     # x: (B, T, C)
        h = F.silu(self.gate_proj(x)) * self.up_proj(x)       # (B, T, d_ff)
        return self.down_proj(h)                              # (B, T, C)


class Block(nn.Module):
    """One pre-norm decoder layer: attention then SwiGLU, each with a residual."""

    def __init__(self, d_model: int, n_head: int, d_ff: int, dropout: float):
        super().__init__()
        self.input_layernorm = RMSNorm(d_model)
        self.self_attn = Attention(d_model, n_head, dropout)
        self.post_attention_layernorm = RMSNorm(d_model)
        self.mlp = SwiGLU(d_model, d_ff)
        self.resid_dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.resid_dropout(self.self_attn(self.input_layernorm(x), cos, sin, mask))  # (B, T, C)
        x = x + self.resid_dropout(self.mlp(self.post_attention_layernorm(x)))         # (B, T, C)
        return x


def packed_mask(position_ids: torch.Tensor) -> torch.Tensor:
    """(B, 1, T, T) bool, True where query i may attend to key j: j <= i in the same
    example. An example starts wherever a position is not one more than the previous one."""
    starts = torch.ones_like(position_ids, dtype=torch.bool)                   # (B, T)
    starts[:, 1:] = position_ids[:, 1:] != position_ids[:, :-1] + 1
    example = starts.cumsum(-1)                                                # (B, T)
    T = position_ids.shape[1]
    causal = torch.ones(T, T, dtype=torch.bool, device=position_ids.device).tril()
    return ((example[:, :, None] == example[:, None, :]) & causal).unsqueeze(1)


def default_d_ff(d_model: int) -> int:
    """The SwiGLU hidden size: 8/3 * d_model (as many weights as a 4x GELU MLP), rounded up to 64."""
    return 64 * math.ceil(8 * d_model / 3 / 64)


class GPT(nn.Module):
    """A Llama-style causal language model over token ids.

    Args:
        vocab_size: number of token ids (257 for the byte tokenizer: 256 bytes + eos).
        max_seq_len: the longest sequence ``forward`` accepts.
        n_layer, n_head, d_model: depth, attention heads, width (d_model % n_head == 0,
            and the head size d_model / n_head must be even for rotary positions).
        d_ff: SwiGLU hidden size; default 8/3 * d_model rounded up to a multiple of 64.
        dropout: on attention weights and residual branches (0 for fine-tuning).
        tie_embeddings: share one matrix between ``embed_tokens`` and ``lm_head``.

    ``gradient_checkpointing = True`` recomputes each block in backward instead of keeping
    its activations (see :mod:`lora_cli.models.checkpointing`).
    """

    gradient_checkpointing: bool = False

    def __init__(self, vocab_size: int = 257, max_seq_len: int = 256, n_layer: int = 4, n_head: int = 4,
                 d_model: int = 128, d_ff: int | None = None, dropout: float = 0.0,
                 tie_embeddings: bool = False):
        super().__init__()
        check_sizes(vocab_size=vocab_size, max_seq_len=max_seq_len, n_head=n_head, d_model=d_model)
        check_sizes(minimum=0, n_layer=n_layer)
        if d_ff is not None:
            check_sizes(d_ff=d_ff)
        if not 0.0 <= dropout < 1.0:
            raise ModelError(f"must be a number >= 0 and < 1, got {dropout!r}",
                             where="model.args.dropout", fix="use 0.0 for fine-tuning")
        if d_model % n_head != 0 or (d_model // n_head) % 2 != 0:
            raise ModelError(
                f"d_model ({d_model}) must be a multiple of n_head ({n_head}) with an even head size",
                where="model.args",
                fix="pick e.g. d_model: 128 with n_head: 4 (head size 32)",
            )
        self.vocab_size = vocab_size
        self.max_seq_len = max_seq_len
        self.d_ff = d_ff or default_d_ff(d_model)
        self.embed_tokens = nn.Embedding(vocab_size, d_model)
        self.dropout = nn.Dropout(dropout)
        self.layers = nn.ModuleList(Block(d_model, n_head, self.d_ff, dropout) for _ in range(n_layer))
        self.norm = RMSNorm(d_model)
        self.lm_head = nn.Linear(d_model, vocab_size, bias=False)
        if tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        # Rotary tables are derived, not learned: non-persistent, so not in the state dict.
        cos, sin = rotary_tables(max_seq_len, d_model // n_head)
        self.register_buffer("rope_cos", cos, persistent=False)  # (max_seq_len, D)
        self.register_buffer("rope_sin", sin, persistent=False)  # (max_seq_len, D)
        self.apply(self._init_weights)
        # GPT-2's scaled init: residual projections shrink with depth.
        for block in self.layers:
            for proj in (block.self_attn.o_proj, block.mlp.down_proj):
                nn.init.normal_(proj.weight, mean=0.0, std=0.02 / math.sqrt(2 * n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def get_output_embeddings(self) -> nn.Module:
        """The output head; LoRA targeting leaves it out of ``all-linear``."""
        return self.lm_head

    def forward(self, ids: torch.Tensor, position_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Logits (B, T, vocab) for ``ids`` (B, T). ``position_ids`` (B, T), for packed
        sequences: each token's position in its own example; an example starts wherever a
        position is not one more than the one before, and attends only to itself."""
        B, T = ids.shape
        if T > self.max_seq_len:
            raise ModelError(
                f"a sequence of {T} tokens is longer than the model's max_seq_len ({self.max_seq_len})",
                where="data.max_seq_len",
                fix=f"set data.max_seq_len <= {self.max_seq_len} (model.args.max_seq_len)",
            )
        x = self.dropout(self.embed_tokens(ids))                         # (B, T, C)
        cos = self.rope_cos[:T].to(x.dtype)                              # (T, D)
        sin = self.rope_sin[:T].to(x.dtype)                              # (T, D)
        mask = None
        if position_ids is not None:
            cos = self.rope_cos[position_ids].to(x.dtype).unsqueeze(1)   # (B, 1, T, D)
            sin = self.rope_sin[position_ids].to(x.dtype).unsqueeze(1)   # (B, 1, T, D)
            mask = packed_mask(position_ids)                             # (B, 1, T, T)
        recompute = self.gradient_checkpointing and torch.is_grad_enabled()
        for block in self.layers:
            if recompute:   # keep only the block's input; its activations are recomputed in backward
                x = checkpoint(block, x, cos, sin, mask, use_reentrant=False)  # (B, T, C)
            else:
                x = block(x, cos, sin, mask)                             # (B, T, C)
        return self.lm_head(self.norm(x))                                # (B, T, vocab)
