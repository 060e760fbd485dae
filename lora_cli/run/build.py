"""From a validated config to what a run works on: data, base model, LoRA injected.

The walk is straight: config -> data -> model (+ base weights) -> inject. Both
``lora-train`` and ``lora-eval`` stand on it; an adapter's saved metadata holds what is
needed to walk it again without the original config. That metadata is data: a
``class_path`` it records is imported only as the user allows (:func:`model_code`).
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from dataclasses import replace as dc_replace
from pathlib import Path

import torch
from torch import nn

from .. import data as datalib
from ..lora.adapter import Adapter
from ..lora.fingerprint import base_fingerprint
from .config import Config, config_from_dict, config_to_dict
from .validate import CLASS_PATH
from ..errors import AdapterError, ConfigError, UserError
from ..lora.inject import apply_lora, get_spec, lora_layers
from ..models import build_model, check_built_in_fits, infer_args, load_base_weights, module_origin
from ..lora.weight_files import first_non_finite, weight_shapes
from ..models.tokenizers import ByteTokenizer

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


def read_split(cfg: Config, path: str, *, tokenizer=None, label_map: dict | None = None,
               features: list[str] | None = None):
    """One data file read the way ``cfg`` says: tokenized text, labelled text, or a table."""
    d = cfg.data
    if cfg.task == "causal_lm":
        return datalib.load_text(path, tokenizer=tokenizer, text_field=d.text_field, max_seq_len=d.max_seq_len,
                                 train_on_prompt=d.train_on_prompt)
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


PEFT_TASKS = {"CAUSAL_LM": "causal_lm", "SEQ_CLS": "classification"}


@dataclass(frozen=True)
class CodeChoice:
    """What the user allows an adapter's model to import, on the command line."""

    model_code: str | None = None       # --model-code module:Class
    model_path: str | None = None       # --model-path DIR (default: the current directory)
    trust_adapter_code: bool = False    # --trust-adapter-code

    @property
    def given(self) -> list[str]:
        """The flags the user passed."""
        return [flag for flag, value in (("--model-code", self.model_code), ("--model-path", self.model_path),
                                         ("--trust-adapter-code", self.trust_adapter_code)) if value]


@dataclass(frozen=True)
class ModelCode:
    """A model class the user allowed: what is imported, from which folder, found where."""

    class_path: str
    folder: str       # put first on sys.path while importing
    origin: str       # the file or folder the module comes from (looked up without running it)
    args: dict        # what the class is called with: the adapter's model_args
    via: str          # the flag that allowed it


def model_code(adapter: Adapter, choice: CodeChoice) -> ModelCode | None:
    """The code rebuilding ``adapter``'s model imports, as the user's ``choice`` allows it;
    None for a built-in arch or a Hugging Face model, which import nothing of the user's.

    An adapter is data: a ``class_path`` it records is imported only when the user
    confirms it (``--model-code``, which may also name another class) or trusts the
    adapter for it (``--trust-adapter-code``), and always from ``choice.model_path`` (the
    current directory by default), never from a folder the adapter names. Without either,
    a UserError says what the adapter asks to import. Nothing is imported here.
    """
    saved = adapter.meta.get("config") is not None
    cfg = _saved_config(adapter) if saved else None   # None: written by PEFT, for a Hugging Face model
    recorded = cfg.model.class_path if cfg is not None else None
    flags = choice.given
    if recorded is None:
        if flags:
            kind = f"the built-in arch {cfg.model.arch!r}" if cfg is not None and cfg.model.arch \
                else "a Hugging Face model"
            raise UserError(f"this adapter's model is {kind}, which needs no code of yours", where=flags[0],
                            fix=f"leave out {' and '.join(flags)}")
        return None
    if choice.model_code and choice.trust_adapter_code:
        raise UserError("--model-code names the class to import, --trust-adapter-code takes the adapter's",
                        where="--model-code", fix="pass one of them")
    if not (choice.model_code or choice.trust_adapter_code):
        if choice.model_path:
            raise UserError("--model-path says where to import the model's code from, but nothing allows the "
                            f"import of {recorded!r}", where="--model-path",
                            fix=f"add --model-code {recorded} (or --trust-adapter-code)")
        raise _unconfirmed(adapter, recorded, cfg.model.args)
    class_path = choice.model_code or recorded
    if choice.model_code and not CLASS_PATH.fullmatch(class_path):
        raise UserError(f"must look like 'package.module:ClassName', got {class_path!r}", where="--model-code",
                        fix=f"e.g. --model-code {recorded}")
    folder = Path(choice.model_path or ".").resolve()
    if not folder.is_dir():
        raise UserError("folder not found", where=f"--model-path {choice.model_path}",
                        fix="name the folder that holds the model's module")
    return ModelCode(class_path=class_path, folder=str(folder), origin=module_origin(class_path, folder),
                     args=dict(cfg.model.args),
                     via="--model-code" if choice.model_code else "--trust-adapter-code")


def _unconfirmed(adapter: Adapter, class_path: str, args: dict) -> UserError:
    shown = repr(args) if len(repr(args)) <= 160 else repr(args)[:157] + "..."
    return UserError(f"this adapter asks to import {class_path!r} and call it with {shown} to build its model; "
                     "lora-cli does not run code that an adapter names", where=adapter.source,
                     fix=f"only if you trust that code: confirm it with --model-code {class_path} (and --model-path "
                         "DIR, the folder holding its module; default: the current directory), or pass "
                         "--trust-adapter-code")


def config_from_adapter(adapter: Adapter, code: ModelCode | None = None, *,
                        base: str | os.PathLike | None = None, data: str | None = None) -> Config:
    """The config an adapter was trained with, as saved in its metadata; for a PEFT
    adapter of a Hugging Face model, one rebuilt from its base path and task type.

    A recorded ``model.class_path`` is replaced by ``code`` (from :func:`model_code`, the
    user's confirmation); without one it is refused: the config is never a way for an
    adapter to import something. ``base`` replaces the base it names (model.base, or
    model.hf for a model directory): the adapter may have been copied from another
    machine. ``data`` is the held-out file the caller will read; a PEFT adapter records
    none, so it becomes the config's data.
    """
    cfg = _saved_config(adapter, base=base, data=data)
    if cfg.model.class_path is not None:
        if code is None:
            raise _unconfirmed(adapter, cfg.model.class_path, cfg.model.args)
        cfg = dc_replace(cfg, model=dc_replace(cfg.model, class_path=code.class_path))
    if base:
        return with_base(cfg, base)
    recorded = cfg.model.hf or cfg.model.base
    if recorded and not os.path.exists(recorded):
        raise UserError(f"the base model the adapter was trained on is not found at {recorded}",
                        where=adapter.source, fix="pass --base with its weights file or model directory")
    return cfg


def with_base(cfg: Config, base: str | os.PathLike) -> Config:
    """``cfg`` with its base weights (or Hugging Face model directory) at ``base``."""
    base = str(base)
    if cfg.model.hf:
        if not Path(base).is_dir():
            raise UserError("a Hugging Face model's base is a model directory", where=base,
                            fix="pass the directory that holds config.json and the weights")
        return dc_replace(cfg, model=dc_replace(cfg.model, hf=base))
    return dc_replace(cfg, model=dc_replace(cfg.model, base=base))


def _saved_config(adapter: Adapter, *, base: str | os.PathLike | None = None, data: str | None = None) -> Config:
    """The adapter's config as recorded (validated, nothing imported); a PEFT adapter's
    rebuilt from its base (``base``, else base_model_name_or_path) and task type, with
    ``data`` as its data."""
    meta = adapter.meta
    if not isinstance(meta, dict):
        raise AdapterError("adapter_config.json's 'lora_cli' entry is not a JSON object", where=adapter.source,
                           fix="save the adapter again with lora-train")
    if meta.get("config") is not None:
        values = meta["config"]
        if not isinstance(values, dict) or not isinstance(values.get("model", {}), dict):
            raise AdapterError("the adapter's saved config (lora_cli.config, with its model section) is not a "
                               "JSON object", where=adapter.source, fix="save the adapter again with lora-train")
        model = values.get("model") or {}
        values = {**values, "model": {**model, "args": meta.get("model_args", model.get("args", {}))}}
        return config_from_dict(values, source=f"{adapter.source} (saved config)", check_files=False)
    hf_base = str(base) if base else adapter.config.get("base_model_name_or_path")
    task = PEFT_TASKS.get(adapter.config.get("task_type"))
    if not hf_base or not task or not Path(hf_base).is_dir():
        raise UserError("this adapter has no lora-cli metadata, and its base_model_name_or_path/task_type do "
                        "not name a local model directory and a causal_lm or classification task",
                        where=adapter.source,
                        fix="pass the base model directory (lora-eval --base DIR), or a training config "
                            "(model.hf: DIR) instead of the adapter")
    if not data:
        raise UserError("this adapter records no data to evaluate on (it was written by another tool)",
                        where=adapter.source, fix="pass --data FILE with held-out examples (.jsonl)")
    values = {"task": task, "model": {"hf": hf_base}, "data": {"train": data},
              "lora": {"rank": adapter.config.get("r", 8), "alpha": adapter.config.get("lora_alpha", 8)}}
    return config_from_dict(values, source=f"{adapter.source} (from its PEFT config)", check_files=False)


def fingerprint_shapes(adapter: Adapter) -> dict[str, tuple[int, ...]] | None:
    """Name -> shape of the base an adapter was trained on, from its fingerprint (None
    when it has none)."""
    recorded = (adapter.meta.get("fingerprint") or {}).get("tensors")
    if not recorded:
        return None
    return {name: tuple(int(n) for n in record.split("|")[0].split("x") if n) for name, record in recorded.items()}


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
    m, notes = cfg.model, []
    args = dict(m.args)
    torch.manual_seed(cfg.seed)
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
    model, args, notes = build_base(cfg, data, search_path=search_path)
    lo = cfg.lora
    saved = _hf_modules_to_save(cfg, model, notes) if cfg.model.hf else lo.modules_to_save
    apply_lora(model, rank=lo.rank, alpha=lo.alpha, target_modules=lo.target_modules, dropout=lo.dropout,
               use_rslora=lo.use_rslora, bias=lo.bias, modules_to_save=saved,
               exclude_modules=lo.exclude_modules)
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
    if cfg.dtype != "float32":   # frozen base tensors in the compute dtype, trainable ones float32
        for name, p in model.named_parameters():
            if not p.requires_grad:
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
    if not isinstance(limit, int) or not isinstance(data.train, (datalib.TextData, datalib.TextClassData)):
        return
    parts = [part for part in (data.train, data.eval) if part is not None]
    longest = max(len(ex[0] if isinstance(ex, tuple) else ex) for part in parts for ex in part.examples)
    inputs = longest - 1 if cfg.task == "causal_lm" else longest
    if inputs > limit:
        raise ConfigError([f"data.max_seq_len: examples up to {longest} tokens feed {inputs} positions, but the "
                           f"model has {limit}"], fix=f"set data.max_seq_len <= {limit + (cfg.task == 'causal_lm')}")


def batches(data, order: torch.Tensor, batch_size: int, pad_id: int | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(inputs, targets) for consecutive chunks of ``order``."""
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        if isinstance(data, datalib.TextData):
            yield datalib.text_batch(data, idx, pad_id)
        elif isinstance(data, datalib.TextClassData):
            yield datalib.text_class_batch(data, idx, pad_id)
        else:
            yield datalib.tabular_batch(data, idx)


def adapter_metadata(cfg: Config, built: Built) -> dict:
    """What the adapter must carry so that it alone can rebuild its model and read data
    the same way: the resolved config (file paths made absolute), the model's
    constructor args, the label map and feature columns."""
    resolved = config_to_dict(cfg)
    for section, key in (("model", "base"), ("model", "hf"), ("data", "train"), ("data", "eval")):
        value = resolved[section][key]
        if value:
            resolved[section][key] = str(Path(value).resolve())
    return {
        "task": cfg.task,
        "model_args": built.model_args,
        "tokenizer": "hf" if cfg.model.hf else "bytes" if built.data.tokenizer is not None else None,
        "label_map": built.data.label_map,
        "features": built.data.features,
        "search_path": built.search_path,
        "fingerprint": built.fingerprint,
        "config": resolved,
    }


def peft_fields(cfg: Config) -> dict:
    """PEFT's base_model_name_or_path and task_type for this run's adapter: they let
    PEFT's AutoPeftModel find a Hugging Face base; custom models leave them empty."""
    if not cfg.model.hf:
        return {"base_model_name_or_path": None, "task_type": None}
    from ..models.hf import TASK_TYPES
    return {"base_model_name_or_path": str(Path(cfg.model.hf).resolve()), "task_type": TASK_TYPES[cfg.task]}
