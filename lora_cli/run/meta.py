"""What an adapter records of the run that trained it, and rebuilding that run from it.

lora-train writes, under adapter_config.json's ``lora_cli`` key and beside the engine's
own entries (version, module layouts, base fingerprint), a :class:`RunMeta`: the task,
the model's constructor arguments, the tokenizer kind, the label map and feature columns,
and the resolved training config. That is enough for lora-eval and lora-merge --verify to
rebuild the model and read data the way training did, from the adapter alone.

The record is data, never an instruction: a ``class_path`` in it is imported only when the
user allows it on the command line (:func:`model_code`), and only from the folder the user
names. The file's fields are checked when it is read
(:func:`lora_cli.lora.adapter_config.validate_adapter_config`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from dataclasses import replace as dc_replace
from pathlib import Path

from ..errors import AdapterError, UserError
from ..lora.adapter import Adapter
from ..models import module_origin
from .config import Config, config_from_dict, config_to_dict
from .validate import CLASS_PATH

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


@dataclass(frozen=True)
class RunMeta:
    """What lora-train records of a run in its adapter (under ``lora_cli``, beside the
    engine's version, layouts and ``fingerprint``)."""

    task: str                          # regression, classification or causal_lm
    model_args: dict                   # the model's constructor arguments, data-derived sizes filled in
    tokenizer: str | None              # "hf" (the model folder's), "bytes" (the built-in gpt's) or None
    label_map: dict | None             # label text -> class id (classification)
    features: list | None              # the tabular input columns, in order
    search_path: str | None            # where the run imported its class_path from: shown, never used
    config: dict                       # the training config, its file paths made absolute

    @classmethod
    def of(cls, adapter: Adapter) -> "RunMeta | None":
        """The record an adapter carries (checked when the adapter was read), or None
        for an adapter another tool wrote."""
        meta = adapter.meta
        if meta.get("config") is None:
            return None
        return cls(task=meta.get("task") or meta["config"].get("task"), model_args=dict(meta.get("model_args") or {}),
                   tokenizer=meta.get("tokenizer"), label_map=meta.get("label_map"), features=meta.get("features"),
                   search_path=meta.get("search_path"), config=meta["config"])

    @classmethod
    def of_run(cls, cfg: Config, built) -> "RunMeta":
        """The record of a run about to train: ``built`` is its :class:`~lora_cli.run.build.Built`."""
        resolved = config_to_dict(cfg)
        for section, key in (("model", "base"), ("model", "hf"), ("data", "train"), ("data", "eval")):
            value = resolved[section][key]
            if value:
                resolved[section][key] = str(Path(value).resolve())
        return cls(task=cfg.task, model_args=built.model_args,
                   tokenizer="hf" if cfg.model.hf else "bytes" if built.data.tokenizer is not None else None,
                   label_map=built.data.label_map, features=built.data.features, search_path=built.search_path,
                   config=resolved)

    def as_dict(self) -> dict:
        """The entries to store under ``lora_cli`` (the engine adds its own)."""
        return dict(self.__dict__)


def adapter_metadata(cfg: Config, built) -> dict:
    """What the adapter must carry so that it alone can rebuild its model and read data
    the same way: the :class:`RunMeta` of the run, and the fingerprint of its base as
    loaded (before any dtype cast)."""
    return {**RunMeta.of_run(cfg, built).as_dict(), "fingerprint": built.fingerprint}


def peft_fields(cfg: Config) -> dict:
    """PEFT's base_model_name_or_path and task_type for this run's adapter: they let
    PEFT's AutoPeftModel find a Hugging Face base; custom models leave them empty."""
    if not cfg.model.hf:
        return {"base_model_name_or_path": None, "task_type": None}
    from ..models.hf import TASK_TYPES
    return {"base_model_name_or_path": str(Path(cfg.model.hf).resolve()), "task_type": TASK_TYPES[cfg.task]}
