"""From a validated config to what a run works on: device, data, base model, LoRA injected.

The walk is straight: config -> data -> model (+ base weights) -> inject. Both
``lora-train`` and ``lora-eval`` stand on it; an adapter's saved metadata
(:mod:`lora_cli.run.meta`) holds what is needed to walk it again without the config.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .. import data as datalib
from ..data import token_cache
from ..data.packing import PackedTextData, pack, packed_batch
from ..errors import ConfigError, UserError
from ..lora.fingerprint import base_fingerprint
from ..lora.inject import apply_lora, get_spec, lora_layers
from ..lora.weight_files import DTYPES, first_non_finite, weight_shapes
from ..models.checkpointing import enable_gradient_checkpointing
from ..models.quantize import is_quantized, quantize_model
from ..models import build_model, check_built_in_fits, infer_args, load_base_weights
from ..models.tokenizers import ByteTokenizer
from .config import Config


@dataclass
class Datasets:
    """Training and (optional) held-out data, with what the model needs to know of them."""

    train: datalib.TabularData | datalib.TextData | PackedTextData
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
    search_path: str | None = None
    fingerprint: dict | None = None   # of the base as loaded, before any dtype cast


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


def available_cores() -> int:
    """The CPU cores this process may run on (its affinity mask, which a container or
    ``taskset`` may set below the machine's count), at least one."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def cpu_threads(configured: int | None = None) -> int:
    """Intra-op threads for torch: ``configured`` (train.num_threads), else
    OMP_NUM_THREADS when set (``--nproc-per-node`` sets it to cores / workers), else every
    available core. torch's own default counts the machine's cores, not the ones this
    process may use, and oversubscribes a container."""
    if configured:
        return int(configured)
    env = os.environ.get("OMP_NUM_THREADS", "")
    return int(env) if env.isdigit() and int(env) > 0 else available_cores()


def autocast_for(device: torch.device, dtype: str):
    """A factory of autocast contexts: matmuls in ``dtype``, LoRA weights kept float32."""
    if dtype == "float32":
        return contextlib.nullcontext
    return lambda: torch.autocast(device_type=device.type, dtype=DTYPES[dtype])


def make_tokenizer(cfg: Config):
    """The tokenizer of a text task: the model directory's for hf, else bytes."""
    if cfg.model.hf:
        from ..models import hf
        return hf.load_tokenizer(cfg.model.hf)
    return ByteTokenizer() if cfg.task == "causal_lm" else None


TOKENIZER_FILES = re.compile(r"(tokenizer|special_tokens_map|added_tokens|vocab|merges|chat_template).*|.*\.model")


def tokenizer_identity(cfg: Config, tokenizer) -> str:
    """What the tokens of a text depend on besides the text: the tokenizer's class and,
    for a model directory, the bytes of its tokenizer files."""
    h = hashlib.sha256(f"{type(tokenizer).__module__}.{type(tokenizer).__qualname__}".encode())
    inner = getattr(tokenizer, "tok", None)
    if inner is not None:
        h.update(f"/{type(inner).__qualname__}".encode())
    if cfg.model.hf:
        for file in sorted(Path(cfg.model.hf).iterdir()):
            if file.is_file() and TOKENIZER_FILES.fullmatch(file.name):
                h.update(b"\0" + file.name.encode() + b"\0" + file.read_bytes())
    return h.hexdigest()


def read_split(cfg: Config, path: str, *, tokenizer=None, label_map: dict | None = None,
               features: list[str] | None = None):
    """One data file read the way ``cfg`` says: tokenized text, labelled text, or a table."""
    d = cfg.data
    if cfg.task == "causal_lm":            # tokenized once: later runs read the cache (data/token_cache.py)
        settings = {"text_field": d.text_field, "max_seq_len": d.max_seq_len, "train_on_prompt": d.train_on_prompt}
        return token_cache.cached(path, tokenizer_identity(cfg, tokenizer),
                                  lambda: datalib.load_text(path, tokenizer=tokenizer, **settings), **settings)
    if tokenizer is not None:
        return datalib.load_text_classification(path, tokenizer=tokenizer, text_field=d.text_field,
                                                target=d.target, max_seq_len=d.max_seq_len, label_map=label_map)
    return datalib.load_tabular(path, task=cfg.task, target=d.target, features=features or d.features,
                                label_map=label_map)


def load_data(cfg: Config) -> Datasets:
    """Read and validate the training and held-out data the config names."""
    tok = make_tokenizer(cfg)
    train = read_split(cfg, cfg.data.train, tokenizer=tok)
    label_map, features = getattr(train, "label_map", None), getattr(train, "features", None)
    held = read_split(cfg, cfg.data.eval, tokenizer=tok, label_map=label_map,
                      features=features) if cfg.data.eval else None
    if cfg.data.val_split:
        train, held = datalib.split(train, cfg.data.val_split, cfg.seed)
    if cfg.task == "causal_lm" and cfg.data.packing:
        train = pack(train, cfg.data.max_seq_len - 1)     # rows of as many inputs as an unpacked example has
    return Datasets(train, held, tokenizer=tok, label_map=label_map, features=features)


def load_heldout(cfg: Config, path: str | None = None, *, label_map: dict | None = None,
                 features: list[str] | None = None, any_split: bool = False) -> Datasets:
    """Held-out data for evaluation: ``path``, else the config's eval file, else its
    validation split of the training file (the same rows training held out). With
    ``any_split`` (inputs for comparing two models, not for scoring one) the training
    file itself is the last resort.

    Files the config names but that are gone (an adapter copied to another machine) are
    skipped; when nothing is left the error says to pass ``--data``.
    """
    tok = make_tokenizer(cfg)
    d = cfg.data
    read = functools.partial(read_split, cfg, tokenizer=tok, label_map=label_map, features=features)
    recorded = [f for f in (d.eval, d.train) if f]
    if path:
        held = read(path)
    elif d.eval and os.path.isfile(d.eval):
        held = read(d.eval)
    elif d.val_split and d.train and os.path.isfile(d.train):
        held = datalib.split(read(d.train), d.val_split, cfg.seed)[1]
    elif any_split and d.train and os.path.isfile(d.train):
        held = read(d.train)
    else:
        gone = [f for f in recorded if not os.path.isfile(f)]
        what = (f"the held-out data the adapter names is not found ({', '.join(gone)})" if gone else
                "no held-out data: neither data.eval nor data.val_split is set")
        raise UserError(what, fix="pass --data FILE with held-out examples in the training data's format")
    label_map = label_map or getattr(held, "label_map", None)
    features = features or getattr(held, "features", None)     # an adapter without them: the file's columns
    return Datasets(None, held, tokenizer=tok, label_map=label_map, features=features)


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """torch's RNG seeded for the block and as it was after it: model initialisation
    (random heads, LoRA's A) is reproducible without touching the caller's generator."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def build_base(cfg: Config, data: Datasets, *, search_path: str | os.PathLike | None = None,
               weights: str | os.PathLike | None = None, expect: dict[str, tuple[int, ...]] | None = None,
               exact: bool = True) -> tuple[nn.Module, dict, list[str]]:
    """The base model with its weights loaded (or seeded random ones when base is null).

    ``weights`` loads another checkpoint of the same model instead of ``model.base``
    (a merged one, say; for hf models, another model directory). A built-in arch is
    first built without memory (meta device) and checked against the weights' shapes,
    or, without weights, against ``expect`` (name -> shape, e.g. from an adapter's
    fingerprint; with ``exact=False`` only its size), so that sizes that do not fit are
    refused before anything is allocated.
    """
    with seeded(cfg.seed):
        return _build_base(cfg, data, search_path=search_path, weights=weights, expect=expect, exact=exact)


def _build_base(cfg: Config, data: Datasets, *, search_path, weights, expect, exact) -> tuple[nn.Module, dict, list[str]]:
    m, notes = cfg.model, []
    args = dict(m.args)
    if m.hf:
        from ..models import hf
        model = hf.load_model(weights or m.hf, task=cfg.task, label_map=data.label_map,
                              pad_id=data.tokenizer.pad_id)
        return model, args, notes
    if m.arch:
        if cfg.task == "causal_lm":
            args = infer_args(m.arch, args, vocab_size=data.tokenizer.vocab_size)
        else:
            args = infer_args(m.arch, args, n_features=len(data.features), n_outputs=data.num_classes or 1)
        if weights or m.base or expect is not None:
            source = weights or m.base
            check_built_in_fits(m.arch, args, weight_shapes(source) if source else expect,
                                str(source) if source else "the adapter's fingerprint", exact=exact or bool(source))
    model = build_model(arch=m.arch, class_path=m.class_path, args=args, search_path=search_path)
    if weights or m.base:
        load_base_weights(model, weights or m.base)
    else:
        notes.append("model.base is null: the base model has random weights from the seed (demo only)")
    return model, args, notes


def _hf_modules_to_save(cfg: Config, model: nn.Module, notes: list[str]) -> list[str]:
    """A sequence classifier's new head must be trained and saved: add it if missing."""
    from ..models import hf
    saved = list(cfg.lora.modules_to_save)
    head = hf.classification_head(model)
    if cfg.task == "classification" and head and head not in saved:
        saved.append(head)
        notes.append(f"the classification head '{head}' is new: it is trained in full and saved with the adapter")
    return saved


def build(cfg: Config, *, search_path: str | os.PathLike | None = None) -> Built:
    """Data, base model and LoRA layers for ``cfg``, on the configured device."""
    data = load_data(cfg)
    lo = cfg.lora
    with seeded(cfg.seed):          # one seeded stream: the base's random parts, then LoRA's A
        model, args, notes = _build_base(cfg, data, search_path=search_path, weights=None, expect=None, exact=True)
        saved = _hf_modules_to_save(cfg, model, notes) if cfg.model.hf else lo.modules_to_save
        apply_lora(model, rank=lo.rank, alpha=lo.alpha, target_modules=lo.target_modules, dropout=lo.dropout,
                   use_rslora=lo.use_rslora, bias=lo.bias, modules_to_save=saved,
                   exclude_modules=lo.exclude_modules, use_dora=lo.use_dora, rank_pattern=lo.rank_pattern,
                   alpha_pattern=lo.alpha_pattern, layers_to_transform=lo.layers_to_transform,
                   layers_pattern=lo.layers_pattern)
    if cfg.train.gradient_checkpointing:
        note = enable_gradient_checkpointing(model)
        notes.extend([note] if note else [])
    wasted = [(path, layer) for path, layer in lora_layers(model).items() if layer.rank > min(layer.weight.shape)]
    if wasted:
        path, layer = wasted[0]
        notes.append(f"lora.rank {layer.rank} is above what '{path}' {tuple(layer.weight.shape)} can use "
                     f"(B @ A has rank at most {min(layer.weight.shape)}"
                     f"{f', as in {len(wasted) - 1} more layers' if len(wasted) > 1 else ''}): "
                     "the extra rank adds parameters, not capacity")
    if cfg.model.hf:
        from ..models import hf
        for path in hf.tied_targets(model, get_spec(model).targets):
            notes.append(f"'{path}' shares its weight with another module (tied embeddings): the adapter "
                         "changes it in both places once merged")
    _check_sequence_length(cfg, model, data)
    inexact = getattr(data.train, "inexact_joins", 0)
    if inexact:
        notes.append(f"{inexact} of {len(data.train)} training examples: no tokenization of the completion "
                     "spells the text exactly after the prompt's own tokens (the tokenizer merges across their "
                     "boundary); their completion is tokenized on its own. Moving trailing whitespace from the "
                     "prompt to the completion usually avoids this")
    fingerprint = base_fingerprint(model)
    if cfg.model.quantize:       # of the float base as loaded: merges go into that file
        notes.extend(quantize_model(model, cfg.model.quantize, DTYPES[cfg.dtype]))
    if cfg.dtype != "float32":   # frozen base tensors in the compute dtype, trainable ones float32
        for name, p in model.named_parameters():
            if not p.requires_grad and not is_quantized(p):
                cast = p.data.to(DTYPES[cfg.dtype])
                if first_non_finite(cast) is not None and first_non_finite(p.data) is None:
                    raise ConfigError([f"dtype: the base tensor '{name}' overflows {cfg.dtype} (its largest "
                                       f"|value| is {float(p.data.abs().max()):.4g}, above "
                                       f"{torch.finfo(DTYPES[cfg.dtype]).max:.4g})"],
                                      fix="use dtype: bfloat16 (the range of float32) or float32")
                p.data = cast
    return Built(model=model, data=data, model_args=args, notes=notes,
                 search_path=str(search_path) if search_path else None, fingerprint=fingerprint)


def _check_sequence_length(cfg: Config, model: nn.Module, data: Datasets) -> None:
    """The longest example must fit the model's positions, or training fails mid-run."""
    limit = getattr(model, "max_seq_len", None) or getattr(getattr(model, "config", None),
                                                            "max_position_embeddings", None)
    if not isinstance(limit, int) or not isinstance(data.train, (datalib.TextData, datalib.TextClassData,
                                                                 PackedTextData)):
        return
    parts = [part.data if isinstance(part, PackedTextData) else part for part in (data.train, data.eval)
             if part is not None]
    longest = max(len(ex[0] if isinstance(ex, tuple) else ex) for part in parts for ex in part.examples)
    inputs = longest - 1 if cfg.task == "causal_lm" else longest
    if inputs > limit:
        raise ConfigError([f"data.max_seq_len: examples up to {longest} tokens feed {inputs} positions, but the "
                           f"model has {limit}"], fix=f"set data.max_seq_len <= {limit + (cfg.task == 'causal_lm')}")
    if isinstance(data.train, PackedTextData):
        row = max((data.train.row_length(j) for j in range(len(data.train))), default=0)
        if row > limit:
            raise ConfigError([f"data.max_seq_len: packed rows of up to {row} positions, but the model has {limit}"],
                              fix=f"set data.max_seq_len <= {limit + 1} with data.packing")


def batches(data, order: torch.Tensor, batch_size: int, pad_id: int | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(inputs, targets) for consecutive chunks of ``order``."""
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        if isinstance(data, PackedTextData):
            yield packed_batch(data, idx, pad_id)
        elif isinstance(data, datalib.TextData):
            yield datalib.text_batch(data, idx, pad_id)
        elif isinstance(data, datalib.TextClassData):
            yield datalib.text_class_batch(data, idx, pad_id)
        else:
            yield datalib.tabular_batch(data, idx)

