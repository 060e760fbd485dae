"""Gradient checkpointing: keep only each block's input in the forward pass and
recompute the block's activations during backward (non-reentrant ``torch.utils.checkpoint``).

    activations kept  ~ n_layer x (B, T, C)         instead of every intermediate of every block
    extra compute     ~ one more forward per step   (about 1.3x the step time)

The result is the same gradient, bit for bit up to float rounding: the recomputation
sees the same inputs and, with dropout, the same random state (``preserve_rng_state``).

* the built-in ``gpt`` checkpoints each decoder block (:class:`lora_cli.models.gpt.GPT`);
* Hugging Face models use their own switch (``gradient_checkpointing_enable``, non-reentrant),
  with the embedding output made to require grad (``enable_input_require_grads``) so that
  the frozen embeddings do not cut the graph before the first block;
* your own ``class_path`` model may define ``gradient_checkpointing_enable()``;
* ``linear`` and ``mlp`` have no blocks: there is nothing to checkpoint (a note says so).
"""

from __future__ import annotations

from torch import nn

from ..errors import ModelError


def enable_gradient_checkpointing(model: nn.Module) -> str | None:
    """Switch checkpointing on for ``model``; a note for the user when it does nothing."""
    from .gpt import GPT
    if isinstance(model, GPT):
        model.gradient_checkpointing = True
        return None
    if hasattr(model, "config") and hasattr(model, "enable_input_require_grads"):   # transformers
        new = getattr(model, "activation_checkpointing_enable", None)            # transformers >= 5.x's name
        if callable(new):
            new(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
        return None
    switch = getattr(model, "gradient_checkpointing_enable", None)
    if callable(switch):
        switch()
        return None
    if type(model).__module__.startswith("lora_cli.models"):   # linear, mlp: one or two layers
        return "train.gradient_checkpointing: this model has no blocks to recompute; it changes nothing"
    raise ModelError(f"train.gradient_checkpointing: {type(model).__name__} has no "
                     "gradient_checkpointing_enable() method", where="train.gradient_checkpointing",
                     fix="define gradient_checkpointing_enable() on your model (wrap its blocks in "
                         "torch.utils.checkpoint.checkpoint(..., use_reentrant=False)), or set it to false")
