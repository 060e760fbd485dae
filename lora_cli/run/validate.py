"""Checking a config against its schema: types, the limits of each field, fields that go
together, and messages that say what to write instead (a "did you mean", and the names
other tools use for the same thing).

The checker is generic: it walks the dataclass fields of :mod:`lora_cli.run.config` and
their type hints, and applies the per-field limits in ``RULES``. Every problem found is
collected, so :func:`lora_cli.run.config.config_from_dict` reports them all at once.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import os
import re
import types
from collections.abc import Mapping
from dataclasses import MISSING
from functools import cache
from typing import Any, NamedTuple, Union, get_args, get_origin, get_type_hints

from .. import choices
from ..errors import closest


class Rule(NamedTuple):
    """Limits on one field beyond its type: allowed strings, numeric bounds, non-empty."""

    choices: tuple[str, ...] = ()
    pattern: str | None = None  # full-match regex used instead of `choices` for matching
    min: float | None = None
    max: float | None = None
    min_open: bool = False  # True: value > min, False: value >= min
    max_open: bool = False
    nonempty: bool = False


_F32_MAX = 3.4028234663852886e38   # larger values overflow the float32 math they feed


RULES: dict[str, Rule] = {
    "seed": Rule(min=0, max=2**32 - 1),
    "device": Rule(choices=choices.DEVICES, pattern=choices.DEVICE_PATTERN),
    "dtype": Rule(choices=choices.DTYPES),
    "output_dir": Rule(nonempty=True),
    "task": Rule(choices=choices.TASKS),
    "model.arch": Rule(choices=choices.ARCHS),
    "model.quantize": Rule(choices=choices.QUANTIZE),
    "data.train": Rule(nonempty=True),
    "data.val_split": Rule(min=0, max=1, min_open=True, max_open=True),
    "data.features": Rule(nonempty=True),
    "data.target": Rule(nonempty=True),
    "data.text_field": Rule(nonempty=True),
    "data.max_seq_len": Rule(min=2),
    "lora.rank": Rule(min=1),
    "lora.alpha": Rule(min=0, max=_F32_MAX, min_open=True),
    "lora.dropout": Rule(min=0, max=1, max_open=True),
    "lora.target_modules": Rule(nonempty=True),
    "lora.bias": Rule(choices=choices.BIASES),
    "train.epochs": Rule(min=1),
    "train.max_steps": Rule(min=1),
    "train.batch_size": Rule(min=1),
    "train.grad_accum": Rule(min=1),
    "train.lr": Rule(min=0, max=_F32_MAX, min_open=True),
    "train.optimizer": Rule(choices=choices.OPTIMIZERS),
    "train.strategy": Rule(choices=choices.STRATEGIES),
    "train.weight_decay": Rule(min=0),
    "train.scheduler": Rule(choices=choices.SCHEDULERS),
    "train.warmup_steps": Rule(min=0),
    "train.clip_grad_norm": Rule(min=0, min_open=True),
    "train.log_every": Rule(min=1),
    "train.eval_every": Rule(min=1),
    "train.save_every": Rule(min=1),
    "train.keep_last": Rule(min=1),
    "train.resume": Rule(choices=choices.RESUME),
    "train.on_nan": Rule(choices=choices.ON_NAN),
    "train.num_threads": Rule(min=1, max=4096),
    "train.loraplus_lr_ratio": Rule(min=0, max=_F32_MAX, min_open=True),
    "lora.layers_to_transform": Rule(min=0, nonempty=True),
    "lora.layers_pattern": Rule(nonempty=True),
    "eval.samples": Rule(min=0),
    "eval.max_new_tokens": Rule(min=1),
}


_DATA_SUFFIXES = {"regression": (".csv", ".jsonl"), "classification": (".csv", ".jsonl"),
                  "causal_lm": (".txt", ".jsonl")}


CLASS_PATH = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*")


class _Mismatch(Exception):
    """A value is not of the expected type."""


_INVALID = object()


_KIND = {int: "an integer", float: "a number", str: "a string", bool: "true or false",
         dict: "a mapping with string keys", list: "a list of strings"}


@cache
def fields_of(cls: type) -> dict[str, tuple[dataclasses.Field, Any]]:
    hints = get_type_hints(cls)
    return {f.name: (f, hints[f.name]) for f in dataclasses.fields(cls)}


def leaf_paths(cls: type, prefix: str = "") -> list[str]:
    """Every leaf field of the dataclass schema ``cls`` by dotted path, in declaration order."""
    out: list[str] = []
    for name, (_, tp) in fields_of(cls).items():
        out += leaf_paths(tp, f"{prefix}{name}.") if dataclasses.is_dataclass(tp) else [prefix + name]
    return out


def check_section(cls: type, data: Mapping, prefix: str, problems: list[str], root: type | None = None) -> dict:
    """Check one section against dataclass ``cls``; return its valid values, defaults filled in."""
    known = fields_of(cls)
    root = root or cls
    problems += [_unknown_key(str(key), prefix, known, root, data[key]) for key in data if key not in known]
    out: dict[str, Any] = {}
    for name, (f, tp) in known.items():
        path = prefix + name
        if dataclasses.is_dataclass(tp):
            sub = data.get(name)
            if sub is None:  # absent, or `lora:` with everything under it commented out
                sub = {}
            if not isinstance(sub, Mapping):
                problems.append(f"{path}: must be a section (a mapping of keys), got {show(sub)}")
                continue
            out[name] = check_section(tp, sub, path + ".", problems, root)
        elif name in data:
            value = _check_value(data[name], tp, RULES.get(path, Rule()), path, problems)
            if value is not _INVALID:
                out[name] = value
        elif f.default is not MISSING:
            out[name] = f.default
        elif f.default_factory is not MISSING:
            out[name] = f.default_factory()
        elif path == "model.base" and data.get("hf"):
            out[name] = None   # the hf directory holds the weights
        else:
            problems.append(f"{path}: required: {f.metadata['required']}")
    return out


def _check_value(value: Any, tp: Any, rule: Rule, path: str, problems: list[str]) -> Any:
    """The value converted to ``tp`` and within ``rule``, or _INVALID with a problem recorded."""
    try:
        converted = _convert(value, tp)
    except _Mismatch:
        problems.append(f"{path}: must be {_expect(tp, rule)}, got {show(value)}")
        return _INVALID
    if converted is None:
        return None
    ok = True
    if rule.choices and isinstance(converted, str):
        ok = bool(re.fullmatch(rule.pattern, converted)) if rule.pattern else converted in rule.choices
    if isinstance(converted, (int, float)) and not isinstance(converted, bool):
        lo, hi = rule.min, rule.max
        ok = ((lo is None or (converted > lo if rule.min_open else converted >= lo))
              and (hi is None or (converted < hi if rule.max_open else converted <= hi)))
    if rule.nonempty and hasattr(converted, "__len__") and len(converted) == 0:
        ok = False
    if ok:
        return converted
    hint = ""
    if rule.choices and isinstance(converted, str):
        lowered = {c.lower(): c for c in rule.choices}
        close = _FOREIGN_VALUES.get(path, {}).get(converted.lower()) or _closest(converted.lower(), lowered)
        hint = f" (did you mean {lowered.get(close, close)!r}?)" if close else ""
    problems.append(f"{path}: must be {_expect(tp, rule)}, got {show(value)}{hint}")
    return _INVALID


def _convert(value: Any, tp: Any) -> Any:
    """``value`` as type ``tp`` (ints and numeric strings become floats), else raise _Mismatch."""
    if get_origin(tp) in (Union, types.UnionType):
        for arm in get_args(tp):
            try:
                return _convert(value, arm)
            except _Mismatch:
                pass
        raise _Mismatch
    if tp is float and not isinstance(value, bool) and isinstance(value, (int, float, str)):
        try:
            number = float(value)  # "1e-4": YAML 1.1 reads a float without a dot as a string
        except (ValueError, OverflowError):
            raise _Mismatch from None
        if math.isfinite(number):
            return number
    elif tp is dict and isinstance(value, Mapping):
        try:
            return _plain(value)
        except RecursionError:  # a YAML anchor that contains itself
            raise _Mismatch from None
    elif get_origin(tp) is list and isinstance(value, (list, tuple)):
        if get_args(tp) == (int,):   # list[int]: layer indices
            if all(isinstance(v, int) and not isinstance(v, bool) for v in value):
                return list(value)
        elif all(isinstance(v, str) for v in value):
            return list(value)
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp in (str, bool, type(None)) and type(value) is tp:
        return value
    raise _Mismatch


def _plain(value: Any) -> Any:
    """A deep copy of plain YAML data (str-keyed mappings, lists, scalars), else _Mismatch."""
    if value is None or isinstance(value, (str, bool, int, float)):
        return value
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, Mapping) and all(isinstance(k, str) for k in value):
        return {k: _plain(v) for k, v in value.items()}
    raise _Mismatch


def check_together(values: dict, problems: list[str], check_files: bool) -> None:
    """Checks that span fields; each runs only when the fields it reads are valid."""
    model, data, lora = values.get("model", {}), values.get("data", {}), values.get("lora", {})
    if all(k in model for k in ("arch", "class_path", "hf")):
        given = [k for k in ("arch", "class_path", "hf") if model[k] is not None]
        if len(given) != 1:
            problems.append(f"model: set exactly one of model.arch (linear, mlp, gpt), model.class_path "
                            f"('pkg.module:Class') or model.hf (a model directory), got "
                            f"{' and '.join(given) if given else 'none'}")
    if model.get("hf") is not None and model.get("base") is not None:
        problems.append("model.base: not used with model.hf (the directory holds the weights); remove it")
    if model.get("hf") is not None and values.get("task") == "regression":
        problems.append("task: model.hf supports causal_lm and classification, got 'regression'")
    class_path = model.get("class_path")
    if class_path is not None and not CLASS_PATH.fullmatch(class_path):
        problems.append(f"model.class_path: must look like 'package.module:ClassName', got {class_path!r}")
    if data.get("eval") is not None and data.get("val_split") is not None:
        problems.append("data.val_split: cannot be combined with data.eval; "
                        "keep eval (a held-out file) or val_split (a fraction of train)")
    if data.get("features") and data.get("target") in data["features"]:
        problems.append(f"data.features: must not include the target column {data['target']!r}")
    if data.get("packing") and values.get("task") != "causal_lm":
        problems.append(f"data.packing: packs causal_lm sequences only, but task is {values.get('task')!r}; remove it")
    elif data.get("packing") and model.get("class_path") is not None:
        problems.append("data.packing: needs a model that takes position_ids (model.arch: gpt, or model.hf); "
                        "use data.group_by_length with model.class_path")
    targets = lora.get("target_modules")
    if isinstance(targets, str) and targets != choices.TARGET_ALL_LINEAR:
        try:
            re.compile(targets)
        except (re.error, OverflowError, RecursionError) as e:
            problems.append(f"lora.target_modules: not a valid regular expression ({e}): {targets!r}")
    _check_patterns(lora, problems)
    task = values.get("task")
    allowed = _DATA_SUFFIXES.get(task, ())
    for path, file in (("data.train", data.get("train")), ("data.eval", data.get("eval"))):
        suffix = os.path.splitext(file or "")[1].lower()
        if file and allowed and suffix not in allowed:
            problems.append(f"{path}: unsupported file type {suffix or '(none)'!r} for task {task!r}, "
                            f"expected {' or '.join(allowed)}")
    samples, log = values.get("eval", {}).get("samples") or values.get("eval", {}).get("exact_match"), \
        values.get("log", {})
    if samples and task in choices.TASKS and task != "causal_lm":
        problems.append(f"eval.samples, eval.exact_match: only a causal_lm model generates text, the task is "
                        f"{task!r}; leave them out")
    if log.get("tensorboard") and importlib.util.find_spec("tensorboard") is None:
        problems.append("log.tensorboard: needs the tensorboard package (pip install tensorboard); or set it "
                        "to false")
    if check_files:
        hf = model.get("hf")
        if hf and not os.path.isdir(hf):
            problems.append(f"model.hf: directory not found: {hf}")
        for path, section, key in (("data.train", data, "train"), ("data.eval", data, "eval"),
                                   ("model.base", model, "base")):
            file = section.get(key)
            if file and not os.path.exists(file):
                problems.append(f"{path}: file not found: {file}")
            elif file and not os.path.isfile(file):
                problems.append(f"{path}: not a file: {file}")


def _unknown_key(name: str, prefix: str, known: Mapping[str, Any], root: type, value: Any = None) -> str:
    """'<path>: unknown key' with lora-cli's name for another tool's key, a did-you-mean,
    or the list of allowed keys."""
    here = prefix + name
    if name in _FOREIGN_KEYS:
        return f"{here}: unknown key; {_FOREIGN_KEYS[name](value)}"
    elsewhere = [p for p in leaf_paths(root) if p.rsplit(".", 1)[-1] == name]
    if elsewhere:
        section = elsewhere[0].rpartition(".")[0]
        where = f"it belongs in the {section} section" if section else "it belongs at the top level"
        return f"{here}: unknown key (did you mean {elsewhere[0]!r}? {where})"
    close = _closest(name, known)
    if close:
        return f"{here}: unknown key (did you mean {close!r}?)"
    return f"{here}: unknown key; allowed keys: {', '.join(known)}"


def _closest(word: str, options: Any) -> str | None:
    return closest(word, options)


def _is(key: str) -> Any:
    return lambda value: f"lora-cli's name for it is {key}"


def _warmup(value: Any) -> str:
    ratio = value if isinstance(value, (int, float)) and not isinstance(value, bool) else "the ratio"
    return (f"lora-cli counts warmup in optimizer steps: set train.warmup_steps to {ratio} x the run's "
            "total steps (lora-train --dry-run prints them; e.g. 0.03 x 378 steps = 11)")


def _dtype(dtype: str) -> Any:
    return lambda value: (f"lora-cli sets the compute dtype with the top-level key dtype: {dtype}"
                          + ("" if value is not False else " (false: leave it out; dtype: float32 is the default)"))


def _fixed(text: str) -> Any:
    return lambda value: text


def _check_patterns(lora: dict, problems: list[str]) -> None:
    """lora.rank_pattern / alpha_pattern: regex keys, ranks >= 1, alphas > 0; layer indices >= 0."""
    wants = {"rank_pattern": (lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1, "an integer >= 1"),
             "alpha_pattern": (lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)
                               and math.isfinite(v) and 0 < v <= _F32_MAX, "a number > 0")}
    for name, (ok, what) in wants.items():
        for key, value in (lora.get(name) or {}).items():
            try:
                re.compile(key)
            except (re.error, OverflowError, RecursionError) as e:
                problems.append(f"lora.{name}: key {key!r} is not a valid regular expression ({e})")
            if not ok(value):
                problems.append(f"lora.{name}.{key}: must be {what}, got {show(value)}")
    layers = lora.get("layers_to_transform")
    if isinstance(layers, list) and any(i < 0 for i in layers):
        problems.append(f"lora.layers_to_transform: layer indices must be >= 0, got {show(layers)}")


def _expect(tp: Any, rule: Rule) -> str:
    """What a field accepts, in words: 'an integer >= 1', 'one of adamw, adam, sgd or null'."""
    arms = get_args(tp) if get_origin(tp) in (Union, types.UnionType) else (tp,)
    texts = []
    for arm in arms:
        if arm is type(None):
            continue
        if arm is str and rule.choices:
            texts.append("one of " + ", ".join(rule.choices))
            continue
        text = "a list of integers" if get_args(arm) == (int,) else _KIND[get_origin(arm) or arm]
        if rule.nonempty:
            text = text.replace("a ", "a non-empty ", 1)
        if arm in (int, float):
            bounds = [f"{'>' if rule.min_open else '>='} {rule.min}"] if rule.min is not None else []
            shown = "3.4e38" if rule.max == _F32_MAX else rule.max
            bounds += [f"{'<' if rule.max_open else '<='} {shown}"] if rule.max is not None else []
            text = " ".join([text, " and ".join(bounds)]) if bounds else text
        texts.append(text)
    return " or ".join(texts + ["null"] * (type(None) in arms))


def type_name(tp: Any) -> str:
    """A type as the README shows it: 'int', 'float | null', 'list[str] | str', 'mapping'."""
    if get_origin(tp) in (Union, types.UnionType):
        return " | ".join(type_name(a) for a in get_args(tp))
    if get_origin(tp) is list:
        return "list[int]" if get_args(tp) == (int,) else "list[str]"
    return {type(None): "null", dict: "mapping"}.get(tp) or tp.__name__


def show(value: Any) -> str:
    """A value as a user wrote it: YAML spelling for null/booleans, repr otherwise, shortened."""
    if value is None or isinstance(value, bool):
        return {None: "null", True: "true", False: "false"}[value]
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def build(cls: type, values: dict) -> Any:
    kwargs = {name: build(tp, values[name]) if dataclasses.is_dataclass(tp) else values[name]
              for name, (_, tp) in fields_of(cls).items()}
    return cls(**kwargs)


def flatten(d: Mapping, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in d.items():
        if isinstance(value, Mapping) and value:
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[prefix + str(key)] = value
    return out


# Keys of PEFT, the Hugging Face Trainer, TRL, axolotl and torchtune configs, and what
# lora-cli calls them (or what to write instead).
_FOREIGN_KEYS: dict[str, Any] = {
    "r": _is("lora.rank"), "lora_r": _is("lora.rank"), "lora_rank": _is("lora.rank"),
    "lora_alpha": _is("lora.alpha"), "lora_dropout": _is("lora.dropout"),
    "lora_target_modules": _is("lora.target_modules"), "lora_attn_modules": _is("lora.target_modules"),
    "lora_target_linear": _fixed("write lora.target_modules: all-linear"),
    "apply_lora_to_mlp": _fixed("list the MLP layers in lora.target_modules, or use all-linear"),
    "lora_modules_to_save": _is("lora.modules_to_save"),
    "fan_in_fan_out": _fixed("lora-cli recognises transposed (Conv1D) layers itself: leave it out"),
    "learning_rate": _is("train.lr"),
    "num_train_epochs": _is("train.epochs"), "num_epochs": _is("train.epochs"),
    "per_device_train_batch_size": _is("train.batch_size"), "micro_batch_size": _is("train.batch_size"),
    "train_batch_size": _is("train.batch_size"),
    "gradient_accumulation_steps": _is("train.grad_accum"),
    "warmup_ratio": _warmup,
    "lr_scheduler_type": _fixed("write train.scheduler: cosine, linear or constant"),
    "lr_scheduler": _fixed("write train.scheduler: cosine, linear or constant"),
    "optim": _fixed("write train.optimizer: adamw, adam or sgd"),
    "max_grad_norm": _is("train.clip_grad_norm"),
    "logging_steps": _is("train.log_every"), "eval_steps": _is("train.eval_every"),
    "save_steps": _is("train.save_every"), "save_total_limit": _is("train.keep_last"),
    "resume_from_checkpoint": _fixed("pass --resume, or set train.resume: auto"),
    "bf16": _dtype("bfloat16"), "fp16": _dtype("float16"),
    "sequence_len": _is("data.max_seq_len"), "max_seq_length": _is("data.max_seq_len"),
    "max_length": _is("data.max_seq_len"), "cutoff_len": _is("data.max_seq_len"),
    "train_on_inputs": _is("data.train_on_prompt"),
    "sample_packing": _is("data.packing"),
    "val_set_size": _fixed("write data.val_split: a fraction of train, 0 < x < 1"),
    "dataset": _fixed("write data.train: a local .jsonl, .csv or .txt file"),
    "datasets": _fixed("write data.train: a local .jsonl, .csv or .txt file"),
    "base_model": _fixed("write model.hf: a model directory on disk (nothing is downloaded)"),
    "model_name_or_path": _fixed("write model.hf: a model directory on disk (nothing is downloaded)"),
    "task_type": _fixed("write task: causal_lm or classification"),
    "load_in_4bit": _fixed("write model.quantize: nf4"), "load_in_8bit": _fixed("write model.quantize: int8"),
    "quantization": _fixed("write model.quantize: nf4 or int8"), "bnb_4bit_quant_type": _is("model.quantize"),
}


# Values other tools write for a choice, and lora-cli's spelling of them.
_FOREIGN_VALUES: dict[str, dict[str, str]] = {
    "device": {"gpu": "cuda"},
    "dtype": {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32", "half": "float16", "float": "float32"},
    "task": {"causal-lm": "causal_lm", "seq_cls": "classification", "sequence_classification": "classification"},
    "train.optimizer": {"adamw_torch": "adamw", "adamw_torch_fused": "adamw", "adamw_hf": "adamw"},
    "train.scheduler": {"constant_with_warmup": "constant", "cosine_with_warmup": "cosine"},
}
