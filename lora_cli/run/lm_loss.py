"""The causal LM loss with the output head run only where the loss is.

    inputs (B, T) -> model body with its head taken out -> hidden (B, T, C)
      -> rows whose label != -100                      -> hidden (N, C), labels (N,)
      -> in chunks of R rows: logits = head(h) (R, V), cross entropy summed

Prompt tokens and padding carry no loss, so the head (vocab x C, often a fifth of a
small model's FLOPs) is not run on them, and the float32 logits of the whole batch
(B x T x V) are never held: at most one chunk of R x V at a time, R chosen so that a
chunk is about :data:`CHUNK_BYTES`. The sum is the same as ``F.cross_entropy`` over the
full logits with ``ignore_index=-100``, and so are the gradients (up to float rounding).

Two paths for the chunks' backward:

- a frozen ``nn.Linear`` head (the usual case: LoRA leaves ``lm_head`` out of
  ``all-linear``): the gradient of each chunk's loss with respect to its hidden rows,
  ``(softmax(logits) - onehot(y)) @ W``, is computed in the forward, while the chunk's
  logits are at hand, and kept (N x C, small); the backward scales it. No logits are
  recomputed (as Liger's fused linear cross entropy does, written here in plain torch);
- any other head (adapted by LoRA, trained in full): each chunk runs under activation
  checkpointing, so its logits are recomputed in the backward, one chunk at a time.

The head is taken out by swapping it for ``nn.Identity`` in its parent module for the
length of the forward, so the model runs exactly its own forward (through a DDP wrapper
too). That needs a model whose forward applies the head last and nothing after it:
the built-in ``gpt`` and the Hugging Face model types in :data:`PLAIN_HEAD_TYPES`;
:func:`head_of` returns None for any other model, and the caller computes full logits.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..lora.kernel import dense

IGNORE = -100

CHUNK_BYTES = 64 * 2**20
"""About how many bytes of float32 logits one chunk holds."""

PLAIN_HEAD_TYPES = frozenset({"llama", "mistral", "qwen2", "qwen3", "phi3", "olmo", "olmo2", "smollm3", "gpt2",
                              "gpt_neox", "starcoder2", "stablelm"})
"""Hugging Face ``model_type``s whose causal LM forward returns ``lm_head(hidden)`` as its
logits unchanged (no soft-capping, scaling or float cast after the head)."""


def model_output(model: nn.Module, inputs) -> torch.Tensor:
    """The model's output tensor for ``inputs``: token ids (B, T), or a packed batch
    ``{"input_ids", "position_ids"}`` (Hugging Face outputs carry it as ``.logits``;
    Hugging Face models keep packed examples apart from ``position_ids`` alone, with
    eager, sdpa and flash attention, on CPU and CUDA)."""
    # a Hugging Face model builds no KV cache for a forward that only scores: with a
    # cache it would also ignore position_ids when masking packed examples apart
    extra = {"use_cache": False} if hasattr(getattr(getattr(model, "module", model), "config", None),
                                            "use_cache") else {}
    if isinstance(inputs, dict):
        out = model(inputs["input_ids"], position_ids=inputs["position_ids"], **extra)
    else:
        out = model(inputs, **extra)
    return out.logits if hasattr(out, "logits") else out


def head_of(model: nn.Module) -> tuple[nn.Module, str, nn.Module] | None:
    """(parent, attribute, head) of a causal LM whose forward ends with its output head,
    or None when the head-only loss does not apply to it."""
    from ..models.gpt import GPT

    config = getattr(model, "config", None)
    if not isinstance(model, GPT) and getattr(config, "model_type", None) not in PLAIN_HEAD_TYPES:
        return None
    getter = getattr(model, "get_output_embeddings", None)
    head = getter() if getter is not None else None
    if head is None:
        return None
    for name, module in model.named_modules():
        for attr, child in module.named_children():
            if child is head:
                return module, attr, head
    return None


@contextlib.contextmanager
def head_removed(where: tuple[nn.Module, str, nn.Module]) -> Iterator[nn.Module]:
    """The model with ``nn.Identity`` in place of its head for the block; yields the head."""
    parent, attr, head = where
    setattr(parent, attr, nn.Identity())
    try:
        yield head
    finally:
        setattr(parent, attr, head)


def loss_rows(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(flat positions (N,), their labels (N,)) of the tokens that carry loss. Run on
    the host copy of the labels, so that selecting them costs the device no sync."""
    flat = labels.reshape(-1)
    rows = (flat != IGNORE).nonzero().squeeze(1)
    return rows, flat[rows]


def chunk_rows(vocab: int) -> int:
    """Rows per chunk: about CHUNK_BYTES of float32 logits."""
    return max(1, CHUNK_BYTES // (4 * vocab))


class _FrozenLinearCrossEntropy(torch.autograd.Function):
    """sum_i CE(h_i W^T + b, y_i) for a frozen head; the gradient wrt h made in the forward."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, rows_per_chunk):    # hidden (N, C), labels (N,)
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        # kept in float32: under float16 with loss scaling, small gradients must not underflow before the scale
        grad = torch.empty_like(hidden, dtype=torch.float32) if hidden.requires_grad else None
        for start in range(0, hidden.shape[0], rows_per_chunk):
            h, y = hidden[start:start + rows_per_chunk], labels[start:start + rows_per_chunk]
            logits = F.linear(h, weight, bias).float()                            # (R, V)
            lse = torch.logsumexp(logits, dim=-1)                                 # (R,)
            total += (lse - logits.gather(1, y[:, None]).squeeze(1)).sum()
            if grad is not None:
                probs = logits.sub_(lse[:, None]).exp_()                          # (R, V) softmax, in place
                probs[torch.arange(len(y), device=y.device), y] -= 1.0
                grad[start:start + rows_per_chunk] = probs.to(weight.dtype) @ weight                  # (R, C)
        ctx.save_for_backward(grad)
        ctx.hidden_dtype = hidden.dtype
        return total

    @staticmethod
    def backward(ctx, grad_total):
        (grad,) = ctx.saved_tensors
        return (grad * grad_total.float()).to(ctx.hidden_dtype), None, None, None, None


def _chunk_loss(head: nn.Module, h: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(head(h).float(), y, reduction="sum")


def head_loss(head: nn.Module, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Summed cross entropy of ``head(hidden)`` (N, C) against ``labels`` (N,), by chunks."""
    weight = getattr(head, "weight", None)
    vocab = weight.shape[0] if weight is not None else head(hidden[:1]).shape[-1]
    rows = chunk_rows(vocab)
    bias = getattr(head, "bias", None)
    frozen = type(head) is nn.Linear and not any(p.requires_grad for p in head.parameters())
    if frozen:   # a quantized head (model.quantize) is dequantized once for the whole step
        return _FrozenLinearCrossEntropy.apply(hidden, dense(weight, hidden.dtype), bias, labels, rows)
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, hidden.shape[0], rows):
        h, y = hidden[start:start + rows], labels[start:start + rows]
        if torch.is_grad_enabled():
            total = total + checkpoint(_chunk_loss, head, h, y, use_reentrant=False)
        else:
            total = total + _chunk_loss(head, h, y)
    return total


def _hidden_rows(model: nn.Module, where, inputs, labels: torch.Tensor, device) -> tuple:
    rows, targets = loss_rows(labels.cpu())
    with head_removed(where) as head:
        hidden = model_output(model, inputs)                                # (B, T, C)
    hidden = hidden.reshape(-1, hidden.shape[-1]).index_select(0, rows.to(device))  # (N, C)
    return head, hidden, targets.to(device)


def loss_sum(model: nn.Module, where, inputs, labels: torch.Tensor, device) -> torch.Tensor:
    """The summed token loss of a batch, the head run only on the ``labels`` != -100
    (labels on the host). ``model`` is what is called (the model, or a wrapper over it);
    ``where`` is :func:`head_of` of the model inside."""
    head, hidden, targets = _hidden_rows(model, where, inputs, labels, device)
    return head_loss(head, hidden, targets)


@torch.no_grad()
def tally(model: nn.Module, where, inputs, labels: torch.Tensor, device) -> tuple[float, int, int]:
    """(summed loss, correct argmax predictions, tokens) of a batch, head only on the targets."""
    head, hidden, targets = _hidden_rows(model, where, inputs, labels, device)
    rows = chunk_rows(getattr(head, "weight").shape[0]) if hasattr(head, "weight") else 1024
    loss, correct = 0.0, 0
    for start in range(0, hidden.shape[0], rows):
        logits = head(hidden[start:start + rows]).float()                  # (R, V)
        y = targets[start:start + rows]
        loss += float(F.cross_entropy(logits, y, reduction="sum"))
        correct += int((logits.argmax(-1) == y).sum())
    return loss, correct, len(targets)
