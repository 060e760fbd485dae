"""Adapter files, in the layout Hugging Face PEFT reads and writes.

An adapter is a directory holding two files:

    adapter_model.safetensors   the trained tensors, and nothing of the base
    adapter_config.json         PEFT's LoRA fields, plus lora-cli's own under "lora_cli"

Tensor keys (P = ``base_model.model.``, ``path`` a module's dotted path in the model):

    P + path + ".lora_A.weight"        (r, in)     Linear / Conv1D
    P + path + ".lora_B.weight"        (out, r)
    P + path + ".lora_magnitude_vector" (out,)     DoRA's magnitude (Linear / Conv1D)
    P + path + ".lora_embedding_A"     (r, num)    Embedding
    P + path + ".lora_embedding_B"     (dim, r)
    P + path + ".base_layer.bias"      trained bias of an adapted layer (PEFT's name)
    P + path + ".bias"                 trained bias of any other module
    P + path + "." + tensor            every tensor of a ``modules_to_save`` module

lora-cli's metadata (tool version, each adapted module's layout, the fingerprint of the
base it was trained on, and what the caller adds: the model spec, task, label map) sits
under the ``lora_cli`` key of adapter_config.json. The whole config is also stored in the
safetensors header, so the ``.safetensors`` file alone, renamed or moved, is a complete
adapter.

Adapters are shared files: reading one checks everything before it is used (the
safetensors header, every config field lora-cli reads in :func:`validate_adapter_config`,
the shape and kind of every LoRA factor in :func:`parse_adapter`), so the code after it
can trust what it gets, and a malformed adapter is one AdapterError.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .adapter_config import (DAMAGED, adapter_config, check_original_base, parse_config_json, read_config_text,
                             validate_adapter_config)
from .checks import show
from .errors import AdapterError
from .files import put_in_place, remove, temp_path, write_error, write_synced
from .fingerprint import base_tensors, check_fingerprint
from .inject import LoraSpec, inject, lora_layers, require_spec, trained_tensors
from .dora import MAGNITUDE, dora_merged
from .layers import lora_delta, lora_scaling
from .names import FACTORS
from .targets import name_matches

WEIGHTS_NAME = "adapter_model.safetensors"
CONFIG_NAME = "adapter_config.json"
PREFIX = "base_model.model."
HEADER_KEY = "adapter_config"
# PEFT's key suffix of each factor: ".lora_A.weight" (its lora_A is a Linear), ".lora_embedding_A"
FILE_SUFFIX = {layout: tuple(f".{name}.weight" if layout != "embedding" else f".{name}" for name in names)
               for layout, names in FACTORS.items()}
LORA_SUFFIXES = {suffix: ("AB"[i], "embedding" if layout == "embedding" else "linear")   # suffix -> (factor, family)
                 for layout, suffixes in FILE_SUFFIX.items() for i, suffix in enumerate(suffixes)}


# --- the adapter in memory ------------------------------------------------------------

@dataclass
class LowRankUpdate:
    """One module's update ``s * B @ A``, in the layout of its base weight."""

    A: torch.Tensor        # (r, in) or, for embeddings, (r, num)
    B: torch.Tensor        # (out, r) or (dim, r)
    alpha: float
    scaling: float         # alpha / r, or alpha / sqrt(r) with rsLoRA
    layout: str            # "linear": W (out, in); "conv1d": W (in, out); "embedding": E (num, dim)
    magnitude: torch.Tensor | None = None   # (out,): DoRA's m; then the update is not additive

    @property
    def rank(self) -> int:
        return int(self.A.shape[0])

    def delta(self) -> torch.Tensor:
        """s * B @ A in float32, in the layout of the base weight (:func:`lora_delta`)."""
        return lora_delta(self.A, self.B, self.scaling, self.layout)

    def apply(self, weight: torch.Tensor) -> torch.Tensor:
        """The merged weight, float32: W + s B A, or DoRA's (m / n) (W + s B A)."""
        if self.magnitude is None:
            return weight.float() + self.delta()
        return dora_merged(weight, self.A, self.B, self.scaling, self.magnitude.to(weight.device), self.layout)[0]

    def weight_shape(self) -> tuple[int, int]:
        out, inp = int(self.B.shape[0]), int(self.A.shape[1])
        return (out, inp) if self.layout == "linear" else (inp, out)


@dataclass
class Adapter:
    """An adapter read from disk: its config and tensors, organised for loading and merging."""

    config: dict
    updates: dict[str, LowRankUpdate]                     # module path -> update
    replacements: dict[str, torch.Tensor] = field(default_factory=dict)  # base key -> new tensor
    source: str = ""

    @property
    def meta(self) -> dict:
        """lora-cli's own metadata ({} for an adapter written by another tool)."""
        return self.config.get("lora_cli") or {}


# --- saving ---------------------------------------------------------------------------

def adapter_keys(model: nn.Module) -> dict[str, str]:
    """What an adapter file holds: PEFT's key -> the model's state-dict key it comes from."""
    spec = require_spec(model)
    keys: dict[str, str] = {}
    layers = lora_layers(model)
    for path, layer in layers.items():
        for name, suffix in zip(FACTORS[layer.layout], FILE_SUFFIX[layer.layout]):
            keys[f"{PREFIX}{path}{suffix}"] = f"{path}.{name}"
        if MAGNITUDE in layer.lora_names:
            keys[f"{PREFIX}{path}.{MAGNITUDE}"] = f"{path}.{MAGNITUDE}"
    for key in trained_tensors(model, spec):   # PEFT names an adapted layer's own bias "<path>.base_layer.bias"
        path = key.removesuffix(".bias")
        keys[PREFIX + (f"{path}.base_layer.bias" if key.endswith(".bias") and path in layers else key)] = key
    return keys


def adapter_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """The tensors an adapter file holds, under PEFT's keys (CPU, contiguous)."""
    state = model.state_dict(keep_vars=True)
    return {k: state[n].detach().cpu().contiguous() for k, n in adapter_keys(model).items()}


def save_adapter(model: nn.Module, directory: str | os.PathLike, *, metadata: Mapping | None = None,
                 base_model_name_or_path: str | None = None, task_type: str | None = None) -> Path:
    """Write the adapter of ``model`` to ``directory`` (created, or replaced whole).

    The directory is written beside its final place and renamed in, so it is either the
    complete new adapter or the previous one, never half-written.
    """
    require_spec(model)
    if any(layer.merged for layer in lora_layers(model).values()):
        raise AdapterError("cannot save an adapter while it is merged into the base weights",
                           fix="call unmerge() on the LoRA layers first")
    config = adapter_config(model, base_model_name_or_path=base_model_name_or_path,
                            task_type=task_type, metadata=metadata)
    try:
        return write_adapter(directory, config, adapter_tensors(model))
    except OSError as exc:
        raise write_error(exc, directory, "the adapter") from None


def write_adapter(directory: str | os.PathLike, config: Mapping, tensors: Mapping[str, torch.Tensor]) -> Path:
    """Write adapter files (``config`` from :func:`adapter_config`, ``tensors`` under PEFT's
    keys) to ``directory``, atomically: the complete new adapter or the previous one. An
    OSError (a full disk) is raised after the temporary files are removed."""
    from safetensors.torch import save

    directory = Path(directory)
    if directory.is_file() or (directory.is_dir() and any(directory.iterdir())
                               and not (directory / CONFIG_NAME).exists()):
        raise AdapterError("refusing to replace something that is not an adapter", where=str(directory),
                           fix="save the adapter to a new or empty directory")
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(directory)
    tmp.mkdir()   # not mkdtemp: that makes the adapter directory private (0700)
    try:
        # safetensors' own save_file makes the file private (0600): write its bytes ourselves
        tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
        weights = save(tensors, metadata={"format": "pt", HEADER_KEY: json.dumps(config)})
        write_synced(tmp / WEIGHTS_NAME, lambda f: f.write(weights))
        write_synced(tmp / CONFIG_NAME, lambda f: f.write((json.dumps(config, indent=2) + "\n").encode()))
        put_in_place(tmp, directory)
    except BaseException:
        remove(tmp)
        raise
    return directory


# --- reading --------------------------------------------------------------------------

def read_adapter(path: str | os.PathLike) -> Adapter:
    """Read an adapter directory, or its ``.safetensors`` file alone (the config then
    comes from the file's header).

    Everything read is checked before it is used: the safetensors header by
    :func:`lora_cli.lora.safetensors_io.read_header`, the config by :func:`validate_adapter_config`,
    the tensors by :func:`parse_adapter`. A malformed adapter is an AdapterError.
    """
    from .errors import ModelError
    from .safetensors_io import SafetensorsReader

    path = Path(path)
    if path.is_dir():
        weights, config_file = path / WEIGHTS_NAME, path / CONFIG_NAME
        if not weights.is_file():
            alt = path / "adapter_model.bin"
            hint = " (a PEFT .bin adapter: re-save it with safetensors)" if alt.exists() else ""
            raise AdapterError(f"no {WEIGHTS_NAME} in this directory{hint}", where=str(path),
                               fix="point to a directory written by lora-train or PEFT's save_pretrained")
    elif path.is_file():
        weights, config_file = path, path.with_name(CONFIG_NAME)
    else:
        raise AdapterError("adapter not found" if not path.exists() else "adapter is not a file or directory",
                           where=str(path), fix="give an adapter directory or its adapter_model.safetensors file")
    try:
        reader = SafetensorsReader(weights)
        header = reader.metadata
        tensors = {k: t for k, t in reader}
    except ModelError as exc:
        detail = exc.what.removeprefix("cannot read safetensors file: ")
        raise AdapterError(f"cannot read the adapter weights: {detail}",
                           where=str(weights),
                           fix="the file is truncated or not safetensors; save the adapter again") from None
    if path.is_dir() and config_file.is_file():   # the JSON is what PEFT reads: it wins
        where = str(config_file)
        config = parse_config_json(read_config_text(config_file), where)
    elif HEADER_KEY in header:
        where = f"{weights} (header)"
        config = parse_config_json(header[HEADER_KEY], where)
    elif config_file.is_file():
        where = str(config_file)
        config = parse_config_json(read_config_text(config_file), where)
    else:
        raise AdapterError(f"no adapter config: neither {CONFIG_NAME} beside it nor one in its header",
                           where=str(weights), fix=f"keep {CONFIG_NAME} next to the weights")
    return parse_adapter(config, tensors, source=str(path), config_source=where)


def _pattern_lookup(patterns: Mapping | None, key: str, source: str):
    """PEFT's rank/alpha pattern lookup (:func:`lora_cli.lora.targets.pattern_value`: the
    first key, read as a regex, that matches the module path or its dotted end), with the
    keys compiled once; a key that is no regex is an AdapterError."""
    compiled = []
    for k, v in (patterns or {}).items():
        try:
            compiled.append((re.compile(rf"(.*\.)?({k})"), v))
        except (re.error, OverflowError, RecursionError) as exc:
            raise AdapterError(f"{key}: key {show(k)} is not a valid regular expression ({exc})",
                               where=source, fix=DAMAGED) from None

    def lookup(path: str, default):
        return next((v for rx, v in compiled if rx.fullmatch(path)), default)
    return lookup


def _check_factor(t: torch.Tensor, name: str, path: str, source: str) -> None:
    if t.dim() != 2 or min(t.shape) < 1:
        raise AdapterError(f"module '{path}': {name} has shape {tuple(t.shape)}, not (rows, columns) of at least 1",
                           where=source, fix=DAMAGED)
    if not t.is_floating_point():
        raise AdapterError(f"module '{path}': {name} holds {str(t.dtype).removeprefix('torch.')}, not floating-point "
                           "numbers", where=source, fix=DAMAGED)


def parse_adapter(config: dict, tensors: Mapping[str, torch.Tensor], *, source: str = "",
                  config_source: str | None = None) -> Adapter:
    """Check an adapter's config (:func:`validate_adapter_config`) and tensors, and sort
    the tensors into low-rank updates and whole-tensor replacements.

    Every LoRA factor is a 2-D floating-point tensor, A (r, in) and B (out, r) with
    r >= 1 as the config says (non-finite values are caught where they would be used:
    merging refuses them). ``config_source`` names
    where the config came from in messages (default: ``source``).
    """
    config = validate_adapter_config(config, config_source or source)
    if config.get("peft_type", "LORA") != "LORA":
        raise AdapterError(f"not a LoRA adapter (peft_type {show(config.get('peft_type'))})", where=source)
    check_original_base(config, config_source or source)
    use_dora = bool(config.get("use_dora"))
    magnitudes: dict[str, torch.Tensor] = {}
    layouts = (config.get("lora_cli") or {}).get("modules", {})
    fan_in_fan_out = bool(config.get("fan_in_fan_out"))
    factors: dict[str, dict[str, torch.Tensor]] = {}
    families: dict[str, str] = {}
    replacements: dict[str, torch.Tensor] = {}
    for key, t in tensors.items():
        if not key.startswith(PREFIX):
            raise AdapterError(f"unexpected tensor key {show(key)} (adapter keys start with {PREFIX!r})",
                               where=source)
        rest = key[len(PREFIX):]
        if rest.endswith("." + MAGNITUDE):
            magnitudes[rest[: -len(MAGNITUDE) - 1]] = t
            continue
        for suffix, (factor, family) in LORA_SUFFIXES.items():
            if rest.endswith(suffix):
                path = rest[: -len(suffix)]
                factors.setdefault(path, {})[factor] = t
                families[path] = family
                break
        else:   # PEFT names an adapted layer's own tensors "<path>.base_layer.<name>"
            replacements[rest.replace(".base_layer.", ".")] = t
    alpha, rank = config.get("lora_alpha", 8), config.get("r", 8)
    rank_of = _pattern_lookup(config.get("rank_pattern"), "rank_pattern", config_source or source)
    alpha_of = _pattern_lookup(config.get("alpha_pattern"), "alpha_pattern", config_source or source)
    updates = {}
    for path, pair in factors.items():
        if set(pair) != {"A", "B"}:
            raise AdapterError(f"module '{path}' has lora_{'A' if 'A' in pair else 'B'} but not its pair",
                               where=source)
        A, B = pair["A"], pair["B"]
        _check_factor(A, "lora_A", path, source)
        _check_factor(B, "lora_B", path, source)
        r = int(A.shape[0])
        if B.shape[1] != r:
            raise AdapterError(f"module '{path}': lora_A {tuple(A.shape)} and lora_B {tuple(B.shape)} "
                               "do not form a low-rank pair", where=source)
        expected_r = rank_of(path, rank)
        if r != expected_r:
            raise AdapterError(f"module '{path}' has rank {r} but the config says r={show(expected_r)}",
                               where=source)
        a = alpha_of(path, alpha)
        layout = layouts.get(path) or (
            "embedding" if families[path] == "embedding" else "conv1d" if fan_in_fan_out else "linear")
        updates[path] = LowRankUpdate(A=A, B=B, alpha=float(a), layout=layout,
                                      scaling=lora_scaling(r, a, bool(config.get("use_rslora"))),
                                      magnitude=_magnitude(magnitudes.pop(path, None), path, layout, B, use_dora,
                                                           source))
    if not updates:
        raise AdapterError("the adapter holds no LoRA tensors", where=source)
    if magnitudes:
        raise AdapterError(f"'{next(iter(magnitudes))}.{MAGNITUDE}' has no lora_A/lora_B pair", where=source,
                           fix=DAMAGED)
    return Adapter(config=config, updates=updates, replacements=replacements, source=source)


def _magnitude(m: torch.Tensor | None, path: str, layout: str, B: torch.Tensor, use_dora: bool,
               source: str) -> torch.Tensor | None:
    """DoRA's magnitude of one module, checked: present exactly when use_dora, (out,)."""
    if not use_dora:
        if m is not None:
            raise AdapterError(f"module '{path}' has a DoRA {MAGNITUDE} but the config says use_dora=false",
                               where=source, fix=DAMAGED)
        return None
    if layout == "embedding":
        raise AdapterError(f"module '{path}' is an embedding adapted with DoRA, which lora-cli does not support",
                           where=source, fix="merge it with PEFT, or train it without DoRA on embeddings")
    if m is None:
        raise AdapterError(f"module '{path}' has no {MAGNITUDE}, which a DoRA adapter (use_dora=true) needs",
                           where=source, fix=DAMAGED)
    if m.dim() != 1 or m.shape[0] != B.shape[0] or not m.is_floating_point():
        raise AdapterError(f"module '{path}': {MAGNITUDE} is {tuple(m.shape)} {m.dtype}, not ({B.shape[0]},) "
                           "floating-point", where=source, fix=DAMAGED)
    return m


# --- loading into a model -------------------------------------------------------------


def load_adapter(model: nn.Module, path_or_adapter, *, check_base: bool = True) -> nn.Module:
    """Inject LoRA into ``model`` as the adapter's config says and load its tensors.

    Strict: every adapted module must exist with the shapes the adapter expects, every
    tensor in the file must find its place, and (unless ``check_base`` is false) the
    model's base weights must match the fingerprint recorded at save time.
    """
    adapter = path_or_adapter if isinstance(path_or_adapter, Adapter) else read_adapter(path_or_adapter)
    where = adapter.source
    if check_base:
        check_fingerprint(adapter, base_tensors(model), where)
    modules = dict(model.named_modules())
    for path, update in adapter.updates.items():
        module = modules.get(path)
        if module is None:
            raise AdapterError(f"the model has no module '{path}' that the adapter adapts", where=where,
                               fix="load the adapter into the model it was trained for")
        weight = getattr(module, "weight", None)
        if weight is None or tuple(weight.shape) != update.weight_shape():
            got = tuple(weight.shape) if weight is not None else type(module).__name__
            raise AdapterError(f"module '{path}' is {got}, the adapter expects a weight of "
                               f"{update.weight_shape()}", where=where,
                               fix="load the adapter into the model it was trained for")
    config = adapter.config
    saved = []
    for name in config.get("modules_to_save") or []:   # exact paths from lora-cli, names from PEFT
        saved += [name] if name in modules else [p for p in modules if p and name_matches(p, name)]
    spec = LoraSpec(rank=int(config.get("r", 8)), alpha=float(config.get("lora_alpha", 8)),
                    dropout=float(config.get("lora_dropout") or 0.0), use_rslora=bool(config.get("use_rslora")),
                    bias=config.get("bias", "none"), targets=list(adapter.updates), modules_to_save=saved,
                    use_dora=bool(config.get("use_dora")))
    declared = set(trained_tensors(model, spec))
    missing = sorted(declared - set(adapter.replacements))
    if missing:
        raise AdapterError(f"the adapter's config says '{missing[0]}' was trained ({spec.bias=!s}, "
                           f"modules_to_save={spec.modules_to_save}), but the file does not hold it",
                           where=where, fix="the adapter file is incomplete; save it again")
    state = model.state_dict(keep_vars=True)
    for key, t in adapter.replacements.items():
        if key not in state:
            raise AdapterError(f"the adapter holds '{key}', which the model does not have", where=where)
        if tuple(state[key].shape) != tuple(t.shape):
            raise AdapterError(f"'{key}' is {tuple(state[key].shape)} in the model but {tuple(t.shape)} "
                               "in the adapter", where=where)
    inject(model, spec, ranks={p: u.rank for p, u in adapter.updates.items()})
    return load_adapter_weights(model, adapter)


def load_adapter_weights(model: nn.Module, adapter: Adapter) -> nn.Module:
    """Copy an adapter's tensors into a model that already has the same LoRA layers."""
    layers = lora_layers(model)
    if set(layers) != set(adapter.updates):
        missing = sorted(set(adapter.updates) - set(layers)) or sorted(set(layers) - set(adapter.updates))
        raise AdapterError(f"the model's LoRA layers differ from the adapter's (e.g. '{missing[0]}')",
                           where=adapter.source, fix="use the same lora.target_modules as the adapter")
    state = model.state_dict(keep_vars=True)
    with torch.no_grad():
        for path, update in adapter.updates.items():
            layer = layers[path]
            a, b = layer.factors
            if a.shape != update.A.shape or b.shape != update.B.shape:
                raise AdapterError(f"'{path}' has rank {layer.rank} in the model, {update.rank} in the adapter",
                                   where=adapter.source, fix="use the same lora.rank as the adapter")
            dora = MAGNITUDE in layer.lora_names
            if dora != (update.magnitude is not None):
                raise AdapterError(f"'{path}' is {'' if dora else 'not '}a DoRA layer in the model but "
                                   f"{'not ' if dora else ''}in the adapter", where=adapter.source,
                                   fix="use the same lora.use_dora as the adapter")
            a.copy_(update.A)
            b.copy_(update.B)
            if dora:
                getattr(layer, MAGNITUDE).copy_(update.magnitude)
            layer.alpha, layer.scaling = update.alpha, update.scaling
        for key, t in adapter.replacements.items():
            if key not in state or state[key].shape != t.shape:
                raise AdapterError(f"the adapter holds '{key}' {tuple(t.shape)}, which the model does not have",
                                   where=adapter.source)
            state[key].copy_(t)
    return model
