"""Base weights into a model: strictly, or not at all.

The files are read by :mod:`lora_cli.lora.weight_files` (no code is ever run). Loading a base into a model checks every key, shape and value (no NaN or inf) first and
only then copies, so an error never leaves a half-loaded model. LoRA tensors (``lora_A``, ``lora_B``,
``lora_embedding_A``, ``lora_embedding_B``) live in adapters, not in base files, and are
the only model keys a base file may lack.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

from torch import nn

from ..errors import ModelError
from ..lora.layers import LoraLayer
from ..lora.weight_files import check_finite, read_state_dict

SHOW = 10  # how many keys of each kind an error message lists


def _lora_keys(model: nn.Module) -> set[str]:
    """State-dict keys of LoRA tensors: they belong to adapters, not to base files."""
    keys = set()
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer):
            prefix = f"{name}." if name else ""
            keys.update(prefix + p for p in module.lora_names)
    return keys


def _listing(label: str, items: list[str]) -> str:
    shown = "\n".join(f"    {item}" for item in items[:SHOW])
    more = f"\n    ... and {len(items) - SHOW} more" if len(items) > SHOW else ""
    return f"  {len(items)} {label}:\n{shown}{more}"


def load_base_weights(model: nn.Module, path: str | os.PathLike) -> None:
    """Load a base checkpoint into ``model`` (which may already hold LoRA layers), strictly.

    Every model key except the LoRA tensors must be in the file with the same shape, and
    the file may hold nothing else. A key tied to another (``lm_head.weight`` sharing
    ``embed_tokens.weight``) may be absent when its twin is present. All problems are
    checked before anything is copied.
    """
    path = Path(path)
    sd = read_state_dict(path)
    check_finite(sd.items(), where=str(path))
    lora = _lora_keys(model)
    expected = {k: v for k, v in model.state_dict(keep_vars=True).items() if k not in lora}
    check_fits(model, {k: tuple(v.shape) for k, v in sd.items()}, str(path))
    present_ids = {id(expected[k]) for k in sd if k in expected}
    result = model.load_state_dict(sd, strict=False)
    # Internal invariant: everything left out was checked above.
    assert not result.unexpected_keys, result.unexpected_keys
    assert all(k in lora or id(expected[k]) in present_ids for k in result.missing_keys), result.missing_keys


def check_fits(model: nn.Module, shapes: Mapping[str, tuple[int, ...]], where: str) -> None:
    """A ModelError unless a base with these tensor ``shapes`` (name -> shape) loads into
    ``model`` as :func:`load_base_weights` requires. ``model`` may live on the meta
    device: this needs only its shapes."""
    lora = _lora_keys(model)
    expected = {k: v for k, v in model.state_dict(keep_vars=True).items() if k not in lora}
    # Tied tensors: a missing key is fine when the same tensor loads under another name.
    present_ids = {id(expected[k]) for k in shapes if k in expected}
    missing = [k for k in expected if k not in shapes and id(expected[k]) not in present_ids]
    unexpected = [k for k in shapes if k not in expected]
    mis_shaped = [f"{k}: file {tuple(shapes[k])}, model {tuple(expected[k].shape)}"
                  for k in shapes if k in expected and tuple(shapes[k]) != tuple(expected[k].shape)]
    if missing or unexpected or mis_shaped:
        parts = []
        if missing:
            parts.append(_listing("model keys missing from the file", missing))
        if unexpected:
            parts.append(_listing("file keys the model does not have", unexpected))
        if mis_shaped:
            parts.append(_listing("shapes that differ", mis_shaped))
        raise ModelError(
            "the base weights do not fit the model:\n" + "\n".join(parts),
            where=where,
            fix="use the checkpoint this model was trained from, or make model.arch/model.args "
                "(sizes such as d_model, n_layer, in_features) match the checkpoint",
        )

