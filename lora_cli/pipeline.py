"""From a validated config to what a run works on: data, base model, LoRA injected.

The walk is straight: config -> data -> model (+ base weights) -> inject. Both
``lora-train`` and ``lora-eval`` stand on it; an adapter's saved metadata holds what is
needed to walk it again without the original config.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from . import data as datalib
from .config import Config, config_to_dict
from .errors import ConfigError
from .inject import apply_lora
from .models import build_model, infer_args, load_base_weights
from .tokenizer import ByteTokenizer

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class Datasets:
    """Training and (optional) held-out data, with what the model needs to know of them."""

    train: datalib.TabularData | datalib.TextData
    eval: datalib.TabularData | datalib.TextData | None
    tokenizer: ByteTokenizer | None = None
    label_map: dict[str, int] | None = None
    features: list[str] | None = None

    @property
    def num_classes(self) -> int | None:
        return len(self.label_map) if self.label_map else None


@dataclass
class Built:
    """A model ready to train or evaluate, its data, and notes for the user."""

    model: nn.Module
    data: Datasets
    model_args: dict
    notes: list[str] = field(default_factory=list)


def resolve_device(name: str) -> torch.device:
    """``auto`` picks cuda, then mps, then cpu; an unavailable device is a user error."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        mps = getattr(torch.backends, "mps", None)
        return torch.device("mps" if mps is not None and mps.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError([f"device: {name!r} requested but CUDA is not available on this machine"],
                          fix="use device: cpu (or auto)")
    if name.startswith("cuda:") and int(name.split(":")[1]) >= torch.cuda.device_count():
        raise ConfigError([f"device: {name!r} but only {torch.cuda.device_count()} CUDA devices exist"])
    if name == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ConfigError(["device: 'mps' requested but MPS is not available"], fix="use device: cpu (or auto)")
    return torch.device(name)


def autocast_for(device: torch.device, dtype: str):
    """A factory of autocast contexts: matmuls in ``dtype``, LoRA weights kept float32."""
    if dtype == "float32":
        return contextlib.nullcontext
    return lambda: torch.autocast(device_type=device.type, dtype=DTYPES[dtype])


def load_data(cfg: Config) -> Datasets:
    """Read and validate the training and held-out data the config names."""
    d = cfg.data
    if cfg.task == "causal_lm":
        tok = ByteTokenizer()
        train = datalib.load_text(d.train, tokenizer=tok, text_field=d.text_field, max_seq_len=d.max_seq_len)
        held = datalib.load_text(d.eval, tokenizer=tok, text_field=d.text_field,
                                 max_seq_len=d.max_seq_len) if d.eval else None
        out = Datasets(train, held, tokenizer=tok)
    else:
        train = datalib.load_tabular(d.train, task=cfg.task, target=d.target, features=d.features)
        held = datalib.load_tabular(d.eval, task=cfg.task, target=d.target, features=train.features,
                                    label_map=train.label_map) if d.eval else None
        out = Datasets(train, held, label_map=train.label_map, features=train.features)
    if d.val_split:
        out.train, out.eval = datalib.split(out.train, d.val_split, cfg.seed)
    return out


def build_base(cfg: Config, data: Datasets, *, search_path: str | os.PathLike | None = None) -> tuple[nn.Module, dict, list[str]]:
    """The base model with its weights loaded (or seeded random ones when base is null)."""
    m, notes = cfg.model, []
    args = dict(m.args)
    if m.arch:
        if cfg.task == "causal_lm":
            args = infer_args(m.arch, args, vocab_size=data.tokenizer.vocab_size)
        else:
            args = infer_args(m.arch, args, n_features=len(data.features),
                              n_outputs=data.num_classes or 1)
    torch.manual_seed(cfg.seed)
    model = build_model(arch=m.arch, class_path=m.class_path, args=args, search_path=search_path)
    if m.base:
        load_base_weights(model, m.base)
    else:
        notes.append("model.base is null: the base model has random weights from the seed (demo only)")
    return model, args, notes


def build(cfg: Config, *, search_path: str | os.PathLike | None = None) -> Built:
    """Data, base model and LoRA layers for ``cfg``, on the configured device."""
    data = load_data(cfg)
    model, args, notes = build_base(cfg, data, search_path=search_path)
    lo = cfg.lora
    apply_lora(model, rank=lo.rank, alpha=lo.alpha, target_modules=lo.target_modules, dropout=lo.dropout,
               use_rslora=lo.use_rslora, bias=lo.bias, modules_to_save=lo.modules_to_save,
               exclude_modules=lo.exclude_modules)
    if cfg.dtype != "float32":   # frozen base tensors in the compute dtype, trainable ones float32
        for p in model.parameters():
            if not p.requires_grad:
                p.data = p.data.to(DTYPES[cfg.dtype])
    return Built(model=model, data=data, model_args=args, notes=notes)


def batches(data, order: torch.Tensor, batch_size: int, pad_id: int | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(inputs, targets) for consecutive chunks of ``order``."""
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        if isinstance(data, datalib.TextData):
            yield datalib.text_batch(data, idx, pad_id)
        else:
            yield datalib.tabular_batch(data, idx)


def adapter_metadata(cfg: Config, built: Built) -> dict:
    """What the adapter must carry so it alone can rebuild its model and data handling."""
    m = cfg.model
    base = str(Path(m.base).resolve()) if m.base else None
    return {
        "task": cfg.task,
        "model": {"arch": m.arch, "class_path": m.class_path, "args": built.model_args, "base": base,
                  "seed": cfg.seed},
        "tokenizer": "bytes" if built.data.tokenizer is not None else None,
        "label_map": built.data.label_map,
        "features": built.data.features,
        "target": cfg.data.target if cfg.task != "causal_lm" else None,
        "config": config_to_dict(cfg),
    }

