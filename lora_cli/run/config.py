"""The typed config schema, YAML loading, KEY=VALUE overrides and validation.

A run is described by one YAML file shaped like :class:`Config`. It is validated once,
here, at the edge: every problem is gathered and raised together in one
:class:`~lora_cli.errors.ConfigError`, each prefixed with its key path::

    cfg = load_config("configs/mlp.yaml", ["lora.rank=4", "train.lr=1e-3"])

The checking itself is :mod:`lora_cli.run.validate`'s (types, limits, messages), the
YAML reading :mod:`lora_cli.run.yaml_reader`'s (bounded). Paths (data.train, model.base, ...) are kept
as given and used relative to the current directory, not to the config file's folder.
Nothing here imports torch or the user's model class.
"""

from __future__ import annotations

import copy
import dataclasses
import os
from collections.abc import Mapping, Sequence
from dataclasses import MISSING, dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import yaml

from .. import choices
from ..errors import ConfigError
from .validate import build, check_section, check_together, fields_of, flatten, show, type_name
from .yaml_reader import MAX_CONFIG_BYTES, MAX_YAML_DEPTH, UniqueKeyLoader, YAMLLimit, load_yaml


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
    quantize: str | None = _field(
        None, "Store the frozen base's Linear weights quantized, computed in dtype (QLoRA): nf4 (4-bit, "
        "1/8 of float32) or int8 (1/4); null keeps them in dtype. Needs the quant extra (torchao).")


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
    packing: bool = _field(False, "causal_lm (built-in gpt or model.hf): pack several training examples into "
                           "each sequence of max_seq_len, each attending only to itself: no padding work.")
    group_by_length: bool = _field(False, "Batch training examples of similar length together (order still "
                                   "seeded and resumable): less padding where packing is not used.")


@dataclass(kw_only=True)
class LoraSection:
    """The low-rank adapters: which layers get them, and their shape."""

    rank: int = _field(8, "Rank r of the update B @ A (>= 1).")
    alpha: float = _field(16.0, "Scale numerator: the update is multiplied by alpha / r (> 0).")
    dropout: float = _field(0.0, "Dropout on the LoRA branch input, 0 <= x < 1.")
    dropout_shared: bool = _field(
        True, "With dropout: layers reading the same input (q, k, v; gate, up) share one mask, dropped once "
        "(faster, less memory); false draws one mask per layer, as PEFT does.")
    target_modules: list[str] | str = _field(
        choices.TARGET_ALL_LINEAR, "Layers to adapt: a list of names, a regex, or 'all-linear'.")
    exclude_modules: list[str] = _field([], "Layer names never adapted, even if targeted.")
    use_rslora: bool = _field(False, "Rank-stabilised scaling alpha / sqrt(r) instead of alpha / r.")
    bias: str = _field("none", "Biases to train: none, all, or lora_only (biases of adapted layers).")
    modules_to_save: list[str] = _field([], "Non-LoRA modules trained in full and saved with the adapter.")
    use_dora: bool = _field(
        False, "DoRA: a trained magnitude per output row rescales W + s B A (Linear and Conv1D layers; "
        "embeddings are refused).")
    rank_pattern: dict = _field(
        {}, "Per-module ranks, {name or regex: rank}: a key matches a module path that equals it or ends with "
        "'.key' (PEFT's matching; the first matching key wins); others get lora.rank.")
    alpha_pattern: dict = _field({}, "Per-module alphas, {name or regex: alpha}, matched as rank_pattern.")
    layers_to_transform: list[int] | int | None = _field(
        None, "Adapt only the targets in these layer indices (>= 0); null: every layer.")
    layers_pattern: list[str] | str | None = _field(
        None, "The name of the model's list of layers before the index (layers, h, blocks); null: the first "
        "'<name>.<number>.' in the module path, as PEFT finds it.")


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
    loraplus_lr_ratio: float | None = _field(
        None, "LoRA+: the B factors (lora_B, lora_embedding_B) learn at lr x this, A and the rest at lr "
        "(> 0; the paper suggests 16); null: off.")
    gradient_checkpointing: bool = _field(
        False, "Recompute each block's activations in backward instead of keeping them: less memory "
        "(activations of one block instead of all), about one more forward pass of time. Same result.")


@dataclass(kw_only=True)
class EvalSection:
    """What each evaluation shows besides the held-out metrics."""

    samples: int = _field(0, "causal_lm: greedily complete this many fixed held-out prompts at each evaluation, "
                          "shown under its line and appended to output_dir/samples.jsonl (>= 0).")
    max_new_tokens: int = _field(64, "Tokens each sample may generate at most (>= 1).")
    exact_match: bool = _field(False, "causal_lm: greedily complete every held-out prompt before training and "
                               "after it, and report how many answers come out exactly (base vs adapted).")


@dataclass(kw_only=True)
class LogSection:
    """Where the run's metrics go besides metrics.jsonl and curves.png."""

    tensorboard: bool = _field(False, "Also write TensorBoard event files into output_dir/tensorboard "
                               "(the tensorboard package).")


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
    eval: EvalSection = _field(EvalSection, "Samples decoded at each evaluation.")
    log: LogSection = _field(LogSection, "Extra logs.")


class FieldInfo(NamedTuple):
    """One leaf of the schema, as :func:`describe_schema` reports it."""

    type: str
    default: Any  # REQUIRED when the key must be given
    doc: str


def describe_schema() -> dict[str, FieldInfo]:
    """Every leaf field by dotted path, in declaration order: (type as text, default, doc)."""
    out: dict[str, FieldInfo] = {}

    def walk(cls: type, prefix: str) -> None:
        for name, (f, tp) in fields_of(cls).items():
            if dataclasses.is_dataclass(tp):
                walk(tp, f"{prefix}{name}.")
            else:
                default = (f.default if f.default is not MISSING else
                           f.default_factory() if f.default_factory is not MISSING else REQUIRED)
                out[prefix + name] = FieldInfo(type_name(tp), default, f.metadata["doc"])

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
        data = load_yaml(text, UniqueKeyLoader)
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        what = f"{e.problem} ({e.context})" if e.context else e.problem or "syntax error"
        fix = ("keep one of the two entries (YAML would silently use the last)" if "duplicate key" in what
               else "a config needs no deep nesting and no aliases that repeat large parts; write the values "
                    "out" if isinstance(e, YAMLLimit)
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
                           f"(model, data, lora, train), got {show(data)}"], where=source)
    data = apply_overrides(data, overrides) if overrides else data
    problems: list[str] = []
    values = check_section(Config, data, "", problems)
    check_together(values, problems, check_files)
    if problems:
        fix = None
        if any(": file not found: " in p for p in problems):
            fix = f"relative paths are read from the current directory ({os.getcwd()}), not the config's folder"
        problems, where = _blame(problems, overrides, source)
        raise ConfigError(problems, where=where, fix=fix)
    return build(Config, values)


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
            value = load_yaml(raw)
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
                problems.append(f"override {shown}: {here} is not a section (it is {show(child)})")
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
    fa, fb = flatten(config_to_dict(a)), flatten(config_to_dict(b))
    return [k for k in {**fa, **fb} if fa.get(k, MISSING) != fb.get(k, MISSING)]




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
