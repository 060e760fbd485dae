"""The typed config schema, YAML loading, KEY=VALUE overrides and validation.

A run is described by one YAML file shaped like :class:`Config`. It is validated once,
here, at the edge: every problem is gathered and raised together in one
:class:`~lora_cli.errors.ConfigError`, each prefixed with its key path::

    cfg = load_config("configs/mlp.yaml", ["lora.rank=4", "train.lr=1e-3"])

The validator is generic: it walks the dataclass fields and their type hints, and
applies the per-field limits in ``_RULES``. Paths (data.train, model.base, ...) are kept
as given and used relative to the current directory, not to the config file's folder.
Nothing here imports torch or the user's model class.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import os
import re
import types
from collections.abc import Mapping, Sequence
from dataclasses import MISSING, dataclass, field
from functools import cache
from pathlib import Path
from typing import Any, NamedTuple, Union, get_args, get_origin, get_type_hints

import yaml

from lora_cli.errors import ConfigError, closest


class _Required:
    def __repr__(self) -> str:
        return "REQUIRED"


REQUIRED: Any = _Required()
"""The default :func:`describe_schema` reports for a key that must be given."""


def _field(default: Any = REQUIRED, doc: str = "", *, required: str = "") -> Any:
    """A dataclass field with its one-line doc (and, if it has no default, why it is needed)."""
    meta = {"doc": doc, "required": required}
    if default is REQUIRED:
        return field(metadata=meta)
    if isinstance(default, type):  # a section: a fresh default instance each time
        return field(default_factory=default, metadata=meta)
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: copy.deepcopy(default), metadata=meta)
    return field(default=default, metadata=meta)


# --------------------------------------------------------------------------- schema

@dataclass(kw_only=True)
class ModelSection:
    """The base model: a built-in architecture or your own torch module, and its weights."""

    arch: str | None = _field(None, "Built-in architecture: linear, mlp or gpt (set one of arch, class_path, hf).")
    class_path: str | None = _field(None, "Your own torch.nn.Module as 'pkg.module:Class'.")
    hf: str | None = _field(None, "A Hugging Face model directory on disk (weights, config, tokenizer); "
                            "needs the hf extra. Nothing is downloaded.")
    args: dict = _field({}, "Keyword arguments passed to the model's constructor.")
    base: str | None = _field(
        doc="Base weights (.pt or .safetensors); null starts from random weights (demo only). "
        "Not used with hf, whose directory holds the weights.",
        required="a path to the base weights (.pt or .safetensors), "
        "or null to start from random weights (demo only)",
    )


@dataclass(kw_only=True)
class DataSection:
    """Where the examples come from and how they are read."""

    train: str = _field(doc="Training file: .csv, .jsonl or .txt.",
                        required="a path to the training file (.csv, .jsonl or .txt)")
    eval: str | None = _field(None, "Held-out evaluation file (same format); excludes val_split.")
    val_split: float | None = _field(None, "Fraction of train held out for evaluation, 0 < x < 1; excludes eval.")
    features: list[str] | None = _field(None, "Tabular input columns; null means every column but target.")
    target: str = _field("y", "Tabular target column.")
    text_field: str = _field("text", "JSONL field holding the text (causal_lm, or text classification with hf).")
    train_on_prompt: bool = _field(False, "causal_lm: also train on prompt tokens, not only on the answer.")
    max_seq_len: int = _field(256, "Longest token sequence for causal_lm; longer text is cut (>= 2).")


@dataclass(kw_only=True)
class LoraSection:
    """The low-rank adapters: which layers get them, and their shape."""

    rank: int = _field(8, "Rank r of the update B @ A (>= 1).")
    alpha: float = _field(16.0, "Scale numerator: the update is multiplied by alpha / r (> 0).")
    dropout: float = _field(0.0, "Dropout on the LoRA branch input, 0 <= x < 1.")
    target_modules: list[str] | str = _field(
        "all-linear", "Layers to adapt: a list of names, a regex, or 'all-linear'.")
    exclude_modules: list[str] = _field([], "Layer names never adapted, even if targeted.")
    use_rslora: bool = _field(False, "Rank-stabilised scaling alpha / sqrt(r) instead of alpha / r.")
    bias: str = _field("none", "Biases to train: none, all, or lora_only (biases of adapted layers).")
    modules_to_save: list[str] = _field([], "Non-LoRA modules trained in full and saved with the adapter.")


@dataclass(kw_only=True)
class TrainSection:
    """The optimisation loop."""

    epochs: int = _field(3, "Passes over the training data (>= 1).")
    max_steps: int | None = _field(None, "Stop after this many optimizer steps; overrides epochs (>= 1).")
    batch_size: int = _field(16, "Examples per forward pass (>= 1).")
    grad_accum: int = _field(1, "Forward passes per optimizer step (>= 1).")
    lr: float = _field(2.0e-4, "Peak learning rate (> 0).")
    optimizer: str = _field("adamw", "adamw, adam or sgd.")
    weight_decay: float = _field(0.0, "Weight decay (>= 0).")
    scheduler: str = _field("cosine", "Learning-rate schedule after warmup: cosine, linear or constant.")
    warmup_steps: int = _field(0, "Optimizer steps of linear warmup from 0 (>= 0).")
    clip_grad_norm: float | None = _field(1.0, "Clip the gradient norm to this (> 0); null: no clipping.")
    log_every: int = _field(10, "Log every this many optimizer steps (>= 1).")
    eval_every: int | None = _field(
        None, "Evaluate every this many optimizer steps; null: at the end of each epoch (>= 1).")
    save_every: int | None = _field(
        None, "Write a resumable checkpoint every this many optimizer steps; null: none (>= 1).")
    keep_last: int | None = _field(3, "Keep only the newest this many checkpoints; null keeps all (>= 1).")
    resume: str = _field("never", "never, or auto: continue from the newest checkpoint in output_dir if any.")
    on_nan: str = _field("stop", "On a non-finite loss or gradient: stop, or skip that step.")
    num_threads: int | None = _field(
        None, "CPU threads for torch's intra-op work, per worker (>= 1); null: the cores this process may use "
        "(its CPU affinity, or OMP_NUM_THREADS), shared among the workers of this machine.")
    strategy: str = _field(
        "ddp", "With several workers (--nproc-per-node N, or torchrun): ddp gives each a whole model and "
        "averages the adapter's gradients; fsdp also splits the frozen base across them. "
        "A single process ignores it.")


@dataclass(kw_only=True)
class Config:
    """One training run: the model, the data, the adapters and the loop."""

    seed: int = _field(0, "Seed for initialisation, data shuffling and dropout.")
    device: str = _field("auto", "auto, cpu, cuda, cuda:N or mps; auto picks cuda, then mps, then cpu.")
    dtype: str = _field("float32", "Compute dtype of the base model: float32, bfloat16 or float16; "
                        "LoRA weights stay float32.")
    output_dir: str = _field("runs/lora", "Folder for the adapter, checkpoints and logs.")
    task: str = _field("regression", "regression, classification or causal_lm: picks loss and metrics.")
    model: ModelSection = _field(doc="The base model.")
    data: DataSection = _field(doc="The training and evaluation data.")
    lora: LoraSection = _field(LoraSection, "The LoRA adapters.")
    train: TrainSection = _field(TrainSection, "The training loop.")


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

_RULES: dict[str, Rule] = {
    "seed": Rule(min=0, max=2**32 - 1),
    "device": Rule(choices=("auto", "cpu", "cuda", "cuda:N", "mps"), pattern=r"auto|cpu|cuda|cuda:\d+|mps"),
    "dtype": Rule(choices=("float32", "bfloat16", "float16")),
    "output_dir": Rule(nonempty=True),
    "task": Rule(choices=("regression", "classification", "causal_lm")),
    "model.arch": Rule(choices=("linear", "mlp", "gpt")),
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
    "lora.bias": Rule(choices=("none", "all", "lora_only")),
    "train.epochs": Rule(min=1),
    "train.max_steps": Rule(min=1),
    "train.batch_size": Rule(min=1),
    "train.grad_accum": Rule(min=1),
    "train.lr": Rule(min=0, max=_F32_MAX, min_open=True),
    "train.optimizer": Rule(choices=("adamw", "adam", "sgd")),
    "train.strategy": Rule(choices=("ddp", "fsdp")),
    "train.weight_decay": Rule(min=0),
    "train.scheduler": Rule(choices=("cosine", "linear", "constant")),
    "train.warmup_steps": Rule(min=0),
    "train.clip_grad_norm": Rule(min=0, min_open=True),
    "train.log_every": Rule(min=1),
    "train.eval_every": Rule(min=1),
    "train.save_every": Rule(min=1),
    "train.keep_last": Rule(min=1),
    "train.resume": Rule(choices=("never", "auto")),
    "train.on_nan": Rule(choices=("stop", "skip")),
    "train.num_threads": Rule(min=1, max=4096),
}
_DATA_SUFFIXES = {"regression": (".csv", ".jsonl"), "classification": (".csv", ".jsonl"),
                  "causal_lm": (".txt", ".jsonl")}
_CLASS_PATH = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*")


class FieldInfo(NamedTuple):
    """One leaf of the schema, as :func:`describe_schema` reports it."""

    type: str
    default: Any  # REQUIRED when the key must be given
    doc: str


def describe_schema() -> dict[str, FieldInfo]:
    """Every leaf field by dotted path, in declaration order: (type as text, default, doc)."""
    out: dict[str, FieldInfo] = {}

    def walk(cls: type, prefix: str) -> None:
        for name, (f, tp) in _fields(cls).items():
            if dataclasses.is_dataclass(tp):
                walk(tp, f"{prefix}{name}.")
            else:
                default = (f.default if f.default is not MISSING else
                           f.default_factory() if f.default_factory is not MISSING else REQUIRED)
                out[prefix + name] = FieldInfo(_type_name(tp), default, f.metadata["doc"])

    walk(Config, "")
    return out


# --------------------------------------------------------------------------- public API

def load_config(path: str | os.PathLike, overrides: Sequence[str] = (), *,
                check_files: bool = True) -> Config:
    """Read a YAML config, apply KEY=VALUE overrides, validate, and return it."""
    where = os.fspath(path)
    try:
        if Path(path).exists() and not Path(path).is_file() and not Path(path).is_dir():   # may never end
            raise ConfigError(["cannot read config file: not a regular file (a pipe or a device)"], where=where,
                              fix="give the path of the YAML config file")
        if Path(path).is_file() and Path(path).stat().st_size > MAX_CONFIG_BYTES:
            raise ConfigError([f"the config file is {Path(path).stat().st_size / 2**20:.1f} MB; a config is a few "
                               f"KB (at most {MAX_CONFIG_BYTES // 2**20} MB)"], where=where,
                              fix="check that this is the YAML config of the run, not a data or weights file")
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(["config file not found"], where=where) from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError([f"cannot read config file: {e}"], where=where) from None
    try:
        data = _load_yaml(text, _UniqueKeyLoader)
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        what = f"{e.problem} ({e.context})" if e.context else e.problem or "syntax error"
        fix = ("keep one of the two entries (YAML would silently use the last)" if "duplicate key" in what
               else "a config needs no deep nesting and no aliases that repeat large parts; write the values "
                    "out" if isinstance(e, _YAMLLimit)
               else "check indentation (spaces, not tabs) and quoting near that line")
        raise ConfigError([f"invalid YAML{at}: {what}"], where=where, fix=fix) from None
    except yaml.YAMLError as e:
        raise ConfigError([f"invalid YAML: {e}"], where=where) from None
    except ValueError as e:     # an integer of thousands of digits
        raise ConfigError([f"invalid YAML: {e}"], where=where, fix="write numbers of at most a few digits") from None
    if data is None:
        raise ConfigError(["the config file is empty"], where=where,
                          fix="start from a file in configs/ (sections: model, data, lora, train)")
    return config_from_dict(data, overrides, source=where, check_files=check_files)


def config_from_dict(data: Mapping, overrides: Sequence[str] = (), *, source: str = "<dict>",
                     check_files: bool = True) -> Config:
    """Validate a plain mapping (as read from YAML) after applying overrides; return a Config.

    ``check_files=False`` skips the checks that data.train, data.eval and model.base exist.
    """
    if not isinstance(data, Mapping):
        raise ConfigError([f"the top level must be a mapping of keys and sections "
                           f"(model, data, lora, train), got {_show(data)}"], where=source)
    data = apply_overrides(data, overrides) if overrides else data
    problems: list[str] = []
    values = _check_section(Config, data, "", problems)
    _check_together(values, problems, check_files)
    if problems:
        fix = None
        if any(": file not found: " in p for p in problems):
            fix = f"relative paths are read from the current directory ({os.getcwd()}), not the config's folder"
        problems, where = _blame(problems, overrides, source)
        raise ConfigError(problems, where=where, fix=fix)
    return _build(Config, values)


def _blame(problems: list[str], overrides: Sequence[str], source: str) -> tuple[list[str], str]:
    """Say which problems a KEY=VALUE override caused: (problems, where). Problems that
    are all one override's are reported at 'override KEY=VALUE', not at the file; in a
    mix, each override's problem names it."""
    def culprit(problem: str) -> str | None:
        path = problem.split(":", 1)[0]
        for item in reversed(overrides):    # the last override of a key wins
            key = item.partition("=")[0].strip()
            if path == key or path.startswith(key + ".") or key.startswith(path + "."):
                return item
        return None

    blamed = [culprit(p) for p in problems]
    if all(blamed) and len(set(blamed)) == 1:
        return problems, f"override {blamed[0]}"
    marked = [f"{p} (override {o})" if o else p for p, o in zip(problems, blamed)]
    return marked, "command-line overrides" if all(blamed) else source


def apply_overrides(data: Mapping, overrides: Sequence[str], *, where: str | None = None) -> dict:
    """Return a deep copy of ``data`` with each ``dotted.key=value`` override set.

    Values are parsed as YAML (``4`` -> int, ``null`` -> None, ``[a, b]`` -> list). Missing
    sections are created; setting a key below a non-mapping is an error.
    """
    if isinstance(overrides, str):
        raise TypeError("overrides must be a sequence of 'key=value' strings, not one string")
    result = copy.deepcopy(dict(data))
    problems: list[str] = []
    for item in overrides:
        key, sep, raw = item.partition("=")
        parts = key.strip().split(".")
        shown = repr(item) if len(item) <= 200 else repr(item[:190]) + "..."   # an override may be huge
        if not sep or not all(parts):
            problems.append(f"override {shown}: expected dotted.key=value, e.g. lora.rank=4")
            continue
        if len(parts) > MAX_YAML_DEPTH:
            problems.append(f"override {shown}: a key of more than {MAX_YAML_DEPTH} levels")
            continue
        try:
            value = _load_yaml(raw)
        except yaml.YAMLError as e:
            problems.append(f"override {shown}: value is not valid YAML ({getattr(e, 'problem', None) or e})")
            continue
        except ValueError as e:     # an integer of thousands of digits
            problems.append(f"override {shown}: value is not valid YAML ({e})")
            continue
        node = result
        for depth, part in enumerate(parts[:-1]):
            child = node.get(part)
            if child is None:
                child = {}
            elif not isinstance(child, Mapping):
                here = ".".join(parts[: depth + 1])
                problems.append(f"override {shown}: {here} is not a section (it is {_show(child)})")
                break
            node[part] = child = dict(child)
            node = child
        else:
            node[parts[-1]] = value
    if problems:
        raise ConfigError(problems, where=where)
    return result


def config_to_dict(cfg: Config) -> dict:
    """A plain, YAML-safe nested dict; ``config_from_dict`` turns it back into an equal Config."""
    return dataclasses.asdict(cfg)


def dump_config(cfg: Config) -> str:
    """The config as YAML text, sections in schema order."""
    return yaml.safe_dump(config_to_dict(cfg), sort_keys=False, default_flow_style=False)


def diff_fields(a: Config, b: Config) -> list[str]:
    """Dotted key paths whose values differ between two configs (model.args is compared per key)."""
    fa, fb = _flatten(config_to_dict(a)), _flatten(config_to_dict(b))
    return [k for k in {**fa, **fb} if fa.get(k, MISSING) != fb.get(k, MISSING)]


# --------------------------------------------------------------------------- validation

class _Mismatch(Exception):
    """A value is not of the expected type."""


_INVALID = object()
_KIND = {int: "an integer", float: "a number", str: "a string", bool: "true or false",
         dict: "a mapping with string keys", list: "a list of strings"}


@cache
def _fields(cls: type) -> dict[str, tuple[dataclasses.Field, Any]]:
    hints = get_type_hints(cls)
    return {f.name: (f, hints[f.name]) for f in dataclasses.fields(cls)}


def _check_section(cls: type, data: Mapping, prefix: str, problems: list[str]) -> dict:
    """Check one section against dataclass ``cls``; return its valid values, defaults filled in."""
    known = _fields(cls)
    problems += [_unknown_key(str(key), prefix, known, data[key]) for key in data if key not in known]
    out: dict[str, Any] = {}
    for name, (f, tp) in known.items():
        path = prefix + name
        if dataclasses.is_dataclass(tp):
            sub = data.get(name)
            if sub is None:  # absent, or `lora:` with everything under it commented out
                sub = {}
            if not isinstance(sub, Mapping):
                problems.append(f"{path}: must be a section (a mapping of keys), got {_show(sub)}")
                continue
            out[name] = _check_section(tp, sub, path + ".", problems)
        elif name in data:
            value = _check_value(data[name], tp, _RULES.get(path, Rule()), path, problems)
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
        problems.append(f"{path}: must be {_expect(tp, rule)}, got {_show(value)}")
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
    if rule.nonempty and len(converted) == 0:
        ok = False
    if ok:
        return converted
    hint = ""
    if rule.choices and isinstance(converted, str):
        lowered = {c.lower(): c for c in rule.choices}
        close = _FOREIGN_VALUES.get(path, {}).get(converted.lower()) or _closest(converted.lower(), lowered)
        hint = f" (did you mean {lowered.get(close, close)!r}?)" if close else ""
    problems.append(f"{path}: must be {_expect(tp, rule)}, got {_show(value)}{hint}")
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
        if all(isinstance(v, str) for v in value):
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


def _check_together(values: dict, problems: list[str], check_files: bool) -> None:
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
    if class_path is not None and not _CLASS_PATH.fullmatch(class_path):
        problems.append(f"model.class_path: must look like 'package.module:ClassName', got {class_path!r}")
    if data.get("eval") is not None and data.get("val_split") is not None:
        problems.append("data.val_split: cannot be combined with data.eval; "
                        "keep eval (a held-out file) or val_split (a fraction of train)")
    if data.get("features") and data.get("target") in data["features"]:
        problems.append(f"data.features: must not include the target column {data['target']!r}")
    targets = lora.get("target_modules")
    if isinstance(targets, str) and targets != "all-linear":
        try:
            re.compile(targets)
        except (re.error, OverflowError, RecursionError) as e:
            problems.append(f"lora.target_modules: not a valid regular expression ({e}): {targets!r}")
    task = values.get("task")
    allowed = _DATA_SUFFIXES.get(task, ())
    for path, file in (("data.train", data.get("train")), ("data.eval", data.get("eval"))):
        suffix = os.path.splitext(file or "")[1].lower()
        if file and allowed and suffix not in allowed:
            problems.append(f"{path}: unsupported file type {suffix or '(none)'!r} for task {task!r}, "
                            f"expected {' or '.join(allowed)}")
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


def _unknown_key(name: str, prefix: str, known: Mapping[str, Any], value: Any = None) -> str:
    """'<path>: unknown key' with lora-cli's name for another tool's key, a did-you-mean,
    or the list of allowed keys."""
    here = prefix + name
    if name in _FOREIGN_KEYS:
        return f"{here}: unknown key; {_FOREIGN_KEYS[name](value)}"
    elsewhere = [p for p in describe_schema() if p.rsplit(".", 1)[-1] == name]
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
    "val_set_size": _fixed("write data.val_split: a fraction of train, 0 < x < 1"),
    "dataset": _fixed("write data.train: a local .jsonl, .csv or .txt file"),
    "datasets": _fixed("write data.train: a local .jsonl, .csv or .txt file"),
    "base_model": _fixed("write model.hf: a model directory on disk (nothing is downloaded)"),
    "model_name_or_path": _fixed("write model.hf: a model directory on disk (nothing is downloaded)"),
    "task_type": _fixed("write task: causal_lm or classification"),
}

# Values other tools write for a choice, and lora-cli's spelling of them.
_FOREIGN_VALUES: dict[str, dict[str, str]] = {
    "device": {"gpu": "cuda"},
    "dtype": {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32", "half": "float16", "float": "float32"},
    "task": {"causal-lm": "causal_lm", "seq_cls": "classification", "sequence_classification": "classification"},
    "train.optimizer": {"adamw_torch": "adamw", "adamw_torch_fused": "adamw", "adamw_hf": "adamw"},
    "train.scheduler": {"constant_with_warmup": "constant", "cosine_with_warmup": "cosine"},
}


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
        text = _KIND[get_origin(arm) or arm]
        if rule.nonempty:
            text = text.replace("a ", "a non-empty ", 1)
        if arm in (int, float):
            bounds = [f"{'>' if rule.min_open else '>='} {rule.min}"] if rule.min is not None else []
            shown = "3.4e38" if rule.max == _F32_MAX else rule.max
            bounds += [f"{'<' if rule.max_open else '<='} {shown}"] if rule.max is not None else []
            text = " ".join([text, " and ".join(bounds)]) if bounds else text
        texts.append(text)
    return " or ".join(texts + ["null"] * (type(None) in arms))


def _type_name(tp: Any) -> str:
    """A type as the README shows it: 'int', 'float | null', 'list[str] | str', 'mapping'."""
    if get_origin(tp) in (Union, types.UnionType):
        return " | ".join(_type_name(a) for a in get_args(tp))
    if get_origin(tp) is list:
        return "list[str]"
    return {type(None): "null", dict: "mapping"}.get(tp) or tp.__name__


def _show(value: Any) -> str:
    """A value as a user wrote it: YAML spelling for null/booleans, repr otherwise, shortened."""
    if value is None or isinstance(value, bool):
        return {None: "null", True: "true", False: "false"}[value]
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _build(cls: type, values: dict) -> Any:
    kwargs = {name: _build(tp, values[name]) if dataclasses.is_dataclass(tp) else values[name]
              for name, (_, tp) in _fields(cls).items()}
    return cls(**kwargs)


def _flatten(d: Mapping, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in d.items():
        if isinstance(value, Mapping) and value:
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[prefix + str(key)] = value
    return out


# A config is a few hundred values: these limits are generous, and keep a hostile file
# (an alias bomb: 1 KB that expands to billions of values; nesting 50,000 deep) from
# taking minutes and gigabytes, or a RecursionError.
MAX_CONFIG_BYTES = 1 << 20
MAX_YAML_DEPTH = 64
MAX_YAML_VALUES = 100_000


class _YAMLLimit(yaml.composer.ComposerError):
    """A YAML document beyond the size a config can have."""


class _BoundedLoader(yaml.SafeLoader):
    """safe_load with limits: nesting at most MAX_YAML_DEPTH deep and at most
    MAX_YAML_VALUES values, both counted with aliases expanded."""

    def compose_node(self, parent, index):
        depth = getattr(self, "_depth", 0)
        if depth >= MAX_YAML_DEPTH:
            raise _YAMLLimit(None, None, f"nesting deeper than {MAX_YAML_DEPTH} levels",
                             self.peek_event().start_mark)
        self._depth = depth + 1
        try:
            return super().compose_node(parent, index)
        finally:
            self._depth = depth

    def compose_document(self):
        node = super().compose_document()
        self._measure(node, {}, set())
        return node

    def _measure(self, node, sizes: dict, open_: set) -> tuple[int, int]:
        """(values, depth) of ``node`` with aliases expanded; each distinct node is measured once."""
        key = id(node)
        if key in sizes:
            return sizes[key]
        if key in open_:     # an alias to a node that contains it: one value (validation refuses it)
            return 1, 1
        open_.add(key)
        children = [c for pair in node.value for c in pair] if isinstance(node, yaml.MappingNode) else \
            node.value if isinstance(node, yaml.SequenceNode) else []
        values, depth = 1, 1
        for child in children:
            v, d = self._measure(child, sizes, open_)
            values, depth = values + v, max(depth, d + 1)
        open_.discard(key)
        if values > MAX_YAML_VALUES or depth > MAX_YAML_DEPTH:
            what = f"more than {MAX_YAML_VALUES:,} values" if values > MAX_YAML_VALUES else \
                f"nesting deeper than {MAX_YAML_DEPTH} levels"
            raise _YAMLLimit(None, None, f"aliases expand to {what}", node.start_mark)
        sizes[key] = (values, depth)
        return values, depth


def _load_yaml(text: str, loader: type = _BoundedLoader):
    """YAML text as Python data, read by ``loader`` (a _BoundedLoader)."""
    return yaml.load(text, Loader=loader)


class _UniqueKeyLoader(_BoundedLoader):
    """safe_load that rejects a key written twice in one mapping (PyYAML keeps the last silently)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: set = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            try:
                duplicate = key in seen
                seen.add(key)
            except TypeError:  # unhashable key: let PyYAML report it
                continue
            if duplicate:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r}", key_node.start_mark)
        return super().construct_mapping(node, deep=deep)


def schema_markdown() -> str:
    """The config reference as a Markdown table (the README's copy is checked against it)."""
    def show(value: Any) -> str:
        if value is REQUIRED:
            return "**required**"
        return "`" + (yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()) + "`"
    lines = ["| key | type | default | meaning |", "|---|---|---|---|"]
    for key, info in describe_schema().items():
        lines.append(f"| `{key}` | {info.type.replace('|', '&#124;')} | {show(info.default)} | {info.doc} |")
    return "\n".join(lines)
