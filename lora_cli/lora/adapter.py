"""Adapter files, in the layout Hugging Face PEFT reads and writes.

An adapter is a directory holding two files:

    adapter_model.safetensors   the trained tensors, and nothing of the base
    adapter_config.json         PEFT's LoRA fields, plus lora-cli's own under "lora_cli"

Tensor keys (P = ``base_model.model.``, ``path`` a module's dotted path in the model):

    P + path + ".lora_A.weight"        (r, in)     Linear / Conv1D
    P + path + ".lora_B.weight"        (out, r)
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

import ctypes
import hashlib
import json
import math
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .. import __version__
from .errors import AdapterError
from .files import fsync_dir, remove, temp_path, write_error, write_synced
from .inject import LoraSpec, get_spec, inject, lora_layers, lora_parameters, name_matches, trainable_biases
from .layers import LoraEmbedding, lora_scaling

WEIGHTS_NAME = "adapter_model.safetensors"
CONFIG_NAME = "adapter_config.json"
PREFIX = "base_model.model."
HEADER_KEY = "adapter_config"
LORA_SUFFIXES = {  # tensor-key suffix -> (factor, layout family)
    ".lora_A.weight": ("A", "linear"), ".lora_B.weight": ("B", "linear"),
    ".lora_embedding_A": ("A", "embedding"), ".lora_embedding_B": ("B", "embedding"),
}


# --- fingerprint ----------------------------------------------------------------------
#
# A fingerprint records, per base tensor, "shape|dtype|hash": the hash of up to SAMPLES
# evenly spaced elements. It tells one trained base from another (not a single flipped
# weight) and costs the same on any size: the positions are exact integers, and only the
# sampled elements are read, from memory or straight from a file.
#
#   scheme 2 (this version)  positions i * (n - 1) // (SAMPLES - 1), i = 0..SAMPLES-1;
#                            floating values hashed as bfloat16 (exact for a bfloat16
#                            base and for its float32 upcast, so a base loaded in another
#                            float dtype is still the same base), integers as int64;
#                            the dtype is recorded but only its kind (float or not) is
#                            compared.
#   scheme 1 (lora-cli 0.1)  positions from a float32 linspace (wrong past 2**24
#                            elements), raw bytes in the tensor's own dtype; still checked
#                            for adapters written by that version.

SAMPLES = 1024
SCHEME = 2


def sample_positions(numel: int, scheme: int = SCHEME, samples: int = SAMPLES) -> list[int]:
    """Flat positions of the elements a fingerprint reads: every element of a small
    tensor, else ``samples`` evenly spaced ones, first and last included."""
    if numel <= samples:
        return list(range(numel))
    if scheme == 1:
        return torch.linspace(0, numel - 1, samples).long().clamp_(max=numel - 1).tolist()
    return [i * (numel - 1) // (samples - 1) for i in range(samples)]


def sample_elements(t: torch.Tensor, positions: list[int]) -> torch.Tensor:
    """The elements of ``t`` at flat (row-major) ``positions``, as a 1-D tensor; never
    copies more of ``t`` than those elements, whatever its size or layout."""
    t = t.detach()
    if not positions:
        return t.new_empty(0)
    idx = torch.tensor(positions, dtype=torch.int64, device=t.device)
    if t.is_contiguous():
        return t.reshape(-1)[idx]                          # a view, then a gather
    return t[torch.unravel_index(idx, t.shape)]


def _digest_bytes(values: torch.Tensor, scheme: int) -> str:
    """sha256 (16 hex digits) of sampled values: canonical bfloat16 / int64 under scheme 2."""
    values = values.cpu()
    if scheme >= 2:
        values = values.to(torch.bfloat16 if values.is_floating_point() or values.is_complex() else torch.int64)
    values = values.contiguous()
    raw = ctypes.string_at(values.data_ptr(), values.numel() * values.element_size()) if values.numel() else b""
    return hashlib.sha256(raw).hexdigest()[:16]


def _sample_hash(t, scheme: int = SCHEME) -> str:
    """The hash of ``t``'s sampled elements; ``t`` is a tensor, or a stored tensor with
    ``shape``, ``dtype`` and ``sample(positions)`` (read from a file without loading it)."""
    positions = sample_positions(math.prod(t.shape), scheme)
    values = sample_elements(t, positions) if isinstance(t, torch.Tensor) else t.sample(positions)
    return _digest_bytes(values, scheme)


def _record(t, trained: bool, scheme: int = SCHEME) -> str:
    shape = "x".join(str(int(s)) for s in t.shape)
    dtype = str(t.dtype).removeprefix("torch.")
    return f"{shape}|{dtype}|{'-' if trained else _sample_hash(t, scheme)}"


def fingerprint(tensors: Iterable[tuple[str, object]], trained: Iterable[str] = ()) -> dict:
    """Per base tensor ``"shape|dtype|hash"``; tensors in ``trained`` change during training
    (modules_to_save, biases), so only their shape and dtype are recorded. The tensors may
    be stored ones (see :func:`_sample_hash`)."""
    trained = set(trained)
    records = {name: _record(t, name in trained) for name, t in tensors}
    digest = hashlib.sha256(json.dumps(records, sort_keys=True).encode()).hexdigest()[:16]
    return {"scheme": SCHEME, "digest": digest, "tensors": dict(sorted(records.items()))}


def _same(want: str, have: str, scheme: int) -> str | None:
    """What differs between two records ('shape', 'dtype', 'values'), or None."""
    w, h = want.split("|"), have.split("|")
    if w[0] != h[0]:
        return "shape"
    floats = ("float", "bfloat")
    if (w[1] != h[1]) if scheme < 2 else (w[1].startswith(floats) != h[1].startswith(floats)):
        return "dtype"
    return "values" if w[2] != h[2] and w[2] != "-" else None


def fingerprint_mismatches(expected: Mapping, tensors: Iterable[tuple[str, object]]) -> list[str]:
    """What differs between a recorded fingerprint and a base: [] when it is the same base.

    Every recorded tensor must be in the base with the same shape, dtype kind and sampled
    values, except one that duplicates another (tied weights are often stored once) and
    a trained module the base may lack (a classifier's new head). Tensors the base has
    beyond the record (a language model's head under a classifier) pass. ``tensors`` may
    be stored tensors: only the sampled elements are read.
    """
    scheme = int(expected.get("scheme", 1))
    want: dict[str, str] = dict(expected.get("tensors", {}))
    have = {name: _record(t, want.get(name, "").endswith("|-"), scheme) for name, t in tensors}
    problems = []
    for name in sorted(set(want) & set(have)):
        what = _same(want[name], have[name], scheme)
        if what:
            problems.append(f"{name}: {what} differ ({want[name]} vs {have[name]})")
    def stored_elsewhere(record: str) -> bool:   # tied weights are often saved once, under one name
        return any(_same(record, h, scheme) is None for h in have.values())

    problems += [f"{n}: missing from the base" for n in sorted(set(want) - set(have))
                 if not want[n].endswith("|-") and not stored_elsewhere(want[n])]   # "-": a trained new module
    return problems


def base_fingerprint(model: nn.Module) -> dict:
    """The fingerprint of an adapted model's base: its frozen tensors by value, and the
    tensors training changes (modules_to_save, trained biases) by shape and dtype."""
    spec = _require_spec(model)
    trained = [f"{p}.bias" for p in trainable_biases(model, spec)]
    trained += [f"{p}.{n}" for p in spec.modules_to_save for n in model.get_submodule(p).state_dict()]
    return fingerprint(_base_tensors(model), trained=trained)


def _base_tensors(model: nn.Module) -> Iterable[tuple[str, torch.Tensor]]:
    lora = {id(p) for layer in lora_layers(model).values() for p in layer.parameters(recurse=False)
            if p is not layer.weight and p is not layer.bias}
    for name, t in model.state_dict(keep_vars=True).items():
        if id(t) not in lora:
            yield name, t


# --- the adapter in memory ------------------------------------------------------------

@dataclass
class LowRankUpdate:
    """One module's update ``s * B @ A``, in the layout of its base weight."""

    A: torch.Tensor        # (r, in) or, for embeddings, (r, num)
    B: torch.Tensor        # (out, r) or (dim, r)
    alpha: float
    scaling: float         # alpha / r, or alpha / sqrt(r) with rsLoRA
    layout: str            # "linear": W (out, in); "conv1d": W (in, out); "embedding": E (num, dim)

    @property
    def rank(self) -> int:
        return int(self.A.shape[0])

    def delta(self) -> torch.Tensor:
        """s * B @ A in float32, transposed for Conv1D and embeddings."""
        d = (self.B.float() @ self.A.float()) * self.scaling   # (out, in) / (dim, num)
        return d if self.layout == "linear" else d.t()

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
    spec = _require_spec(model)
    keys: dict[str, str] = {}
    layers = lora_layers(model)
    for path, layer in layers.items():
        if isinstance(layer, LoraEmbedding):
            keys[f"{PREFIX}{path}.lora_embedding_A"] = f"{path}.lora_embedding_A"
            keys[f"{PREFIX}{path}.lora_embedding_B"] = f"{path}.lora_embedding_B"
        else:
            keys[f"{PREFIX}{path}.lora_A.weight"] = f"{path}.lora_A"
            keys[f"{PREFIX}{path}.lora_B.weight"] = f"{path}.lora_B"
    for path in trainable_biases(model, spec):
        key = f"{path}.base_layer.bias" if path in layers else f"{path}.bias"
        keys[PREFIX + key] = f"{path}.bias" if path else "bias"
    for path in spec.modules_to_save:
        for name in model.get_submodule(path).state_dict():
            keys[f"{PREFIX}{path}.{name}"] = f"{path}.{name}"
    return keys


def adapter_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """The tensors an adapter file holds, under PEFT's keys (CPU, contiguous)."""
    state = model.state_dict(keep_vars=True)
    return {k: state[n].detach().cpu().contiguous() for k, n in adapter_keys(model).items()}


def _peft_target_modules(model: nn.Module, targets: list[str]) -> list[str]:
    """The shortest PEFT target list that selects exactly ``targets``: leaf names when
    they pick no other module, else the full paths."""
    leaves = sorted({t.rsplit(".", 1)[-1] for t in targets})
    picked = {p for p, _ in model.named_modules() if p and any(name_matches(p, leaf) for leaf in leaves)}
    return leaves if picked == set(targets) else list(targets)


def adapter_config(model: nn.Module, *, base_model_name_or_path: str | None = None,
                   task_type: str | None = None, metadata: Mapping | None = None) -> dict:
    """adapter_config.json for ``model``: PEFT's LoRA fields plus lora-cli's metadata."""
    spec = _require_spec(model)
    layers = lora_layers(model)
    layouts = {p: "embedding" if isinstance(m, LoraEmbedding) else ("conv1d" if m.fan_in_fan_out else "linear")
               for p, m in layers.items()}
    ranks = {p: m.rank for p, m in layers.items()}
    alphas = {p: m.alpha for p, m in layers.items()}
    return {
        "peft_type": "LORA",
        "task_type": task_type,
        "base_model_name_or_path": base_model_name_or_path,
        "r": spec.rank,
        "lora_alpha": spec.alpha,
        "lora_dropout": spec.dropout,
        "target_modules": _peft_target_modules(model, spec.targets),
        "exclude_modules": None,
        "use_rslora": spec.use_rslora,
        "fan_in_fan_out": any(v == "conv1d" for v in layouts.values()),
        "bias": spec.bias,
        "modules_to_save": list(spec.modules_to_save) or None,
        "init_lora_weights": True,
        "inference_mode": True,
        "rank_pattern": {p: r for p, r in ranks.items() if r != spec.rank},
        "alpha_pattern": {p: a for p, a in alphas.items() if a != spec.alpha},
        "use_dora": False,
        "lora_cli": {
            "version": __version__,
            "modules": layouts,
            # a caller may pass the fingerprint taken before a dtype cast: then hash nothing again
            "fingerprint": (metadata or {}).get("fingerprint") or base_fingerprint(model),
            **(metadata or {}),
        },
    }


def save_adapter(model: nn.Module, directory: str | os.PathLike, *, metadata: Mapping | None = None,
                 base_model_name_or_path: str | None = None, task_type: str | None = None) -> Path:
    """Write the adapter of ``model`` to ``directory`` (created, or replaced whole).

    The directory is written beside its final place and renamed in, so it is either the
    complete new adapter or the previous one, never half-written.
    """
    _require_spec(model)
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
        if directory.exists():
            old = temp_path(directory, "old")
            directory.rename(old)
            tmp.rename(directory)
            remove(old)
        else:
            tmp.rename(directory)
        fsync_dir(directory.parent)
    except BaseException:
        remove(tmp)
        raise
    return directory


def _require_spec(model: nn.Module) -> LoraSpec:
    spec = get_spec(model)
    if spec is None:
        raise AdapterError("this model has no LoRA adapter", fix="call apply_lora() or load_adapter() first")
    return spec


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
        config = _parse_json(_read_config_text(config_file), where)
    elif HEADER_KEY in header:
        where = f"{weights} (header)"
        config = _parse_json(header[HEADER_KEY], where)
    elif config_file.is_file():
        where = str(config_file)
        config = _parse_json(_read_config_text(config_file), where)
    else:
        raise AdapterError(f"no adapter config: neither {CONFIG_NAME} beside it nor one in its header",
                           where=str(weights), fix=f"keep {CONFIG_NAME} next to the weights")
    return parse_adapter(config, tensors, source=str(path), config_source=where)


MAX_CONFIG_BYTES = 64 * 1024 * 1024   # a fingerprint of 100,000 base tensors takes about 8 MB
MAX_CLASSES = 10_000                  # a label map beyond this is refused (evaluation keeps a C x C table)
_F32_MAX = 3.4028234663852886e38
LAYOUTS = ("linear", "conv1d", "embedding")
_RECORD = re.compile(r"(\d+(x\d+)*)?\|[a-z0-9_]+\|([0-9a-f]{16}|-)")   # a fingerprint entry: shape|dtype|hash
_FIX = "the adapter is damaged or was not written by lora-cli or PEFT; train or save it again"


def _read_config_text(path: Path) -> str:
    try:
        size = path.stat().st_size
        if size > MAX_CONFIG_BYTES:
            raise AdapterError(f"adapter config is {size / 2**20:.0f} MB, more than the {MAX_CONFIG_BYTES // 2**20} MB "
                               "an adapter config can be", where=str(path), fix=_FIX)
        return path.read_bytes().decode("utf-8")
    except UnicodeDecodeError:
        raise AdapterError("adapter config is not UTF-8 text", where=str(path), fix=_FIX) from None
    except OSError as exc:
        raise AdapterError(f"cannot read the adapter config: {exc.strerror or exc}", where=str(path)) from None


def _parse_json(text: str, where: str) -> dict:
    if len(text) > MAX_CONFIG_BYTES:
        raise AdapterError(f"adapter config is more than the {MAX_CONFIG_BYTES // 2**20} MB an adapter config can be",
                           where=where, fix=_FIX)
    try:
        data = json.loads(text)
    except RecursionError:
        raise AdapterError("adapter config is not valid JSON: nested too deeply", where=where, fix=_FIX) from None
    except ValueError as exc:    # JSONDecodeError, or an integer of thousands of digits
        raise AdapterError(f"adapter config is not valid JSON: {exc}", where=where, fix=_FIX) from None
    if not isinstance(data, dict):
        raise AdapterError(f"adapter config is a JSON {type(data).__name__}, not an object", where=where, fix=_FIX)
    return data


def _show(value, limit: int = 60) -> str:
    """A value for an error message: repr, cut short (adapter files are untrusted)."""
    try:
        text = repr(value)
    except ValueError:            # an int too long to print
        text = "a huge integer"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v, bound: float = _F32_MAX) -> bool:
    """A finite int or float no larger than ``bound`` in size (bools are not numbers)."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return False
    try:
        return math.isfinite(float(v)) and abs(float(v)) <= bound
    except OverflowError:
        return False


def _is_str_list(v) -> bool:
    return isinstance(v, list) and all(isinstance(x, str) for x in v)


def _entries(ok, expect: str, *, keys: str = "names"):
    """A check of an object whose values must each pass ``ok``: the first bad entry is named."""
    def check(v):
        if not isinstance(v, dict):
            return f"must be an object of {keys} to {expect}, got {_show(v)}"
        bad = next((k for k, x in v.items() if not ok(x)), None)
        return None if bad is None else f"[{_show(bad)}] must be {expect}, got {_show(v[bad])}"
    return check


def _simple(ok, expect: str, *, null: bool = False):
    """A check of one value: ``ok(value)``, or also null when ``null``."""
    return lambda v: None if (v is None and null) or ok(v) else f"must be {expect}{' or null' * null}, got {_show(v)}"


def _check_label_map(v):
    if v is None:
        return None
    if not isinstance(v, dict) or not all(_is_int(i) for i in v.values()):
        return f"must be an object of label names to class ids, got {_show(v)}"
    if not 2 <= len(v) <= MAX_CLASSES:
        return f"must hold 2 to {MAX_CLASSES:,} classes, got {len(v):,}"
    if sorted(v.values()) != list(range(len(v))):
        return f"must give the {len(v)} labels the class ids 0 to {len(v) - 1}, each once, got {_show(v)}"
    return None


def _check_fingerprint(v):
    if v is None:
        return None
    if not isinstance(v, dict) or not isinstance(v.get("digest", ""), str):
        return f"must be an object with a 'digest' string and 'tensors', got {_show(v)}"
    if v.get("scheme", 1) not in (1, SCHEME) or isinstance(v.get("scheme"), bool):
        return f"scheme: must be 1 or {SCHEME} (how the values were sampled), got {_show(v.get('scheme'))}"
    problem = _entries(lambda x: isinstance(x, str) and _RECORD.fullmatch(x) is not None,
                       "'shape|dtype|hash' (e.g. '8x3|float32|...')")(v.get("tensors"))
    return problem and f"tensors{'' if problem.startswith('[') else ': '}{problem}"


def _check_training_config(v):
    if v is None:
        return None
    if not isinstance(v, dict):
        return f"must be an object (the training config), got {_show(v)}"
    if not isinstance(v.get("model", {}), dict):
        return f"model: must be an object, got {_show(v['model'])}"
    return None


# adapter_config.json: key -> check (None when fine, else the problem). Absent keys take
# PEFT's defaults; keys lora-cli does not read are not checked.
_STRING = _simple(lambda v: isinstance(v, str), "a string", null=True)
_FLAG = _simple(lambda v: isinstance(v, bool), "true or false", null=True)
_PEFT_FIELDS = {
    "peft_type": _STRING,
    "task_type": _STRING,
    "base_model_name_or_path": _STRING,
    "r": _simple(lambda v: _is_int(v) and v >= 1, "an integer >= 1"),
    "lora_alpha": _simple(_is_number, "a finite number (at most 3.4e38 in size)"),
    "lora_dropout": _simple(lambda v: _is_number(v) and 0 <= v < 1, "a number >= 0 and < 1", null=True),
    "use_rslora": _FLAG,
    "fan_in_fan_out": _FLAG,
    "use_dora": _FLAG,
    "bias": _simple(lambda v: v in ("none", "all", "lora_only"), "one of none, all, lora_only"),
    "modules_to_save": _simple(_is_str_list, "a list of module names", null=True),
    "target_modules": _simple(lambda v: isinstance(v, str) or _is_str_list(v), "a list of names or a string",
                              null=True),
    "rank_pattern": lambda v: v and _entries(lambda x: _is_int(x) and x >= 1, "an integer >= 1")(v),
    "alpha_pattern": lambda v: v and _entries(_is_number, "a finite number")(v),
    "lora_cli": _simple(lambda v: isinstance(v, dict), "an object", null=True),
}
_LORA_CLI_FIELDS = {
    "modules": _entries(lambda x: x in LAYOUTS, f"one of {', '.join(LAYOUTS)}", keys="module paths"),
    "fingerprint": _check_fingerprint,
    "model_args": _simple(lambda v: isinstance(v, dict), "an object of keyword arguments"),
    "label_map": _check_label_map,
    "features": _simple(lambda v: _is_str_list(v) and v and len(set(v)) == len(v),
                        "a non-empty list of distinct column names", null=True),
    "search_path": _STRING,
    "config": _check_training_config,
}


def _nul_at(tree, path: str = "", depth: int = 0) -> str | None:
    """The key path of the first string (key or value) holding a NUL character, or None."""
    if isinstance(tree, str):
        return path if "\x00" in tree else None
    if depth > 100:     # json.loads nests at most a few hundred levels deep; nothing lora-cli writes does
        return None
    items = tree.items() if isinstance(tree, dict) else enumerate(tree) if isinstance(tree, list) else ()
    for key, value in items:
        here = f"{path}.{key}" if path and isinstance(key, str) else f"{path}[{key}]" if path else str(key)
        if isinstance(key, str) and "\x00" in key:
            return here
        found = _nul_at(value, here, depth + 1)
        if found is not None:
            return found
    return None


def validate_adapter_config(config, where: str) -> dict:
    """An adapter's config (adapter_config.json, or the copy in the safetensors header)
    checked against every field lora-cli reads: PEFT's (r, lora_alpha, bias, patterns,
    ...) and lora-cli's own under ``lora_cli`` (layouts, fingerprint, model arguments,
    label map of at most MAX_CLASSES classes, features, training config).

    All problems are reported together in one AdapterError. Keys lora-cli does not read
    pass unchecked (PEFT adds fields); the training config is checked later, field by
    field, by :func:`lora_cli.run.config.config_from_dict`.
    """
    if not isinstance(config, dict):
        raise AdapterError(f"adapter config is a JSON {type(config).__name__}, not an object", where=where, fix=_FIX)
    def problems_in(section: dict, fields: dict, prefix: str) -> list[str]:
        found = ((key, check(section[key])) for key, check in fields.items() if key in section)
        return [f"{prefix}{key}{'' if problem.startswith('[') else ': '}{problem}" for key, problem in found if problem]

    problems = problems_in(config, _PEFT_FIELDS, "")
    if isinstance(config.get("lora_cli"), dict):
        problems += problems_in(config["lora_cli"], _LORA_CLI_FIELDS, "lora_cli.")
    nul = _nul_at(config)
    if nul is not None:   # no path or name can hold one: the system refuses it when it is used
        problems.append(f"{nul or 'the config'}: a string holds a NUL character")
    if problems:
        more = f"\n  ... and {len(problems) - 10} more" if len(problems) > 10 else ""
        what = problems[0] if len(problems) == 1 else f"{len(problems)} problems:\n" + "\n".join(
            f"  - {p}" for p in problems[:10]) + more
        raise AdapterError(f"malformed adapter config: {what}", where=where, fix=_FIX)
    return config


def _pattern_lookup(patterns: Mapping | None):
    """PEFT's rank/alpha pattern lookup: the value of the first key (in the file's order)
    that names the module (the module path, or a dotted suffix of it). Each lookup costs
    the path's depth, not the number of patterns."""
    order = {key: i for i, key in enumerate(patterns or {})}

    def lookup(path: str, default):
        parts = path.split(".")
        hits = [s for s in (".".join(parts[i:]) for i in range(len(parts))) if s in order]
        return patterns[min(hits, key=order.__getitem__)] if hits else default
    return lookup


def _check_factor(t: torch.Tensor, name: str, path: str, source: str) -> None:
    if t.dim() != 2 or min(t.shape) < 1:
        raise AdapterError(f"module '{path}': {name} has shape {tuple(t.shape)}, not (rows, columns) of at least 1",
                           where=source, fix=_FIX)
    if not t.is_floating_point():
        raise AdapterError(f"module '{path}': {name} holds {str(t.dtype).removeprefix('torch.')}, not floating-point "
                           "numbers", where=source, fix=_FIX)


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
        raise AdapterError(f"not a LoRA adapter (peft_type {_show(config.get('peft_type'))})", where=source)
    for flag in ("use_dora",):
        if config.get(flag):
            raise AdapterError(f"adapters with {flag}=true are not supported", where=source,
                               fix="merge it with PEFT, or train a plain LoRA adapter")
    layouts = (config.get("lora_cli") or {}).get("modules", {})
    fan_in_fan_out = bool(config.get("fan_in_fan_out"))
    factors: dict[str, dict[str, torch.Tensor]] = {}
    families: dict[str, str] = {}
    replacements: dict[str, torch.Tensor] = {}
    for key, t in tensors.items():
        if not key.startswith(PREFIX):
            raise AdapterError(f"unexpected tensor key {_show(key)} (adapter keys start with {PREFIX!r})",
                               where=source)
        rest = key[len(PREFIX):]
        for suffix, (factor, family) in LORA_SUFFIXES.items():
            if rest.endswith(suffix):
                path = rest[: -len(suffix)]
                factors.setdefault(path, {})[factor] = t
                families[path] = family
                break
        else:   # PEFT names an adapted layer's own tensors "<path>.base_layer.<name>"
            replacements[rest.replace(".base_layer.", ".")] = t
    alpha, rank = config.get("lora_alpha", 8), config.get("r", 8)
    rank_of, alpha_of = _pattern_lookup(config.get("rank_pattern")), _pattern_lookup(config.get("alpha_pattern"))
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
            raise AdapterError(f"module '{path}' has rank {r} but the config says r={_show(expected_r)}",
                               where=source)
        a = alpha_of(path, alpha)
        layout = layouts.get(path) or (
            "embedding" if families[path] == "embedding" else "conv1d" if fan_in_fan_out else "linear")
        updates[path] = LowRankUpdate(A=A, B=B, alpha=float(a), layout=layout,
                                      scaling=lora_scaling(r, a, bool(config.get("use_rslora"))))
    if not updates:
        raise AdapterError("the adapter holds no LoRA tensors", where=source)
    return Adapter(config=config, updates=updates, replacements=replacements, source=source)


# --- loading into a model -------------------------------------------------------------

def check_fingerprint(adapter: Adapter, tensors: Iterable[tuple[str, torch.Tensor]], where: str = "") -> None:
    """Raise AdapterError if ``tensors`` are not the base the adapter was trained on."""
    recorded = adapter.meta.get("fingerprint")
    if not recorded:
        return   # written by another tool: shapes are still checked on load
    problems = fingerprint_mismatches(recorded, tensors)
    if problems:
        shown = "\n".join(f"  {p}" for p in problems[:8])
        more = f"\n  ... and {len(problems) - 8} more" if len(problems) > 8 else ""
        raise AdapterError(
            f"this adapter was trained on a different base ({len(problems)} tensors differ):\n{shown}{more}",
            where=where or adapter.source,
            fix="use the base the adapter was trained on, or pass --ignore-fingerprint to accept the mismatch",
        )


def load_adapter(model: nn.Module, path_or_adapter, *, check_base: bool = True) -> nn.Module:
    """Inject LoRA into ``model`` as the adapter's config says and load its tensors.

    Strict: every adapted module must exist with the shapes the adapter expects, every
    tensor in the file must find its place, and (unless ``check_base`` is false) the
    model's base weights must match the fingerprint recorded at save time.
    """
    adapter = path_or_adapter if isinstance(path_or_adapter, Adapter) else read_adapter(path_or_adapter)
    where = adapter.source
    if check_base:
        check_fingerprint(adapter, _base_tensors(model), where)
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
                    bias=config.get("bias", "none"), targets=list(adapter.updates), modules_to_save=saved)
    declared = _declared_trained(model, spec)
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
            a, b = lora_parameters(layer)
            if a.shape != update.A.shape or b.shape != update.B.shape:
                raise AdapterError(f"'{path}' has rank {layer.rank} in the model, {update.rank} in the adapter",
                                   where=adapter.source, fix="use the same lora.rank as the adapter")
            a.copy_(update.A)
            b.copy_(update.B)
            layer.alpha, layer.scaling = update.alpha, update.scaling
        for key, t in adapter.replacements.items():
            if key not in state or state[key].shape != t.shape:
                raise AdapterError(f"the adapter holds '{key}' {tuple(t.shape)}, which the model does not have",
                                   where=adapter.source)
            state[key].copy_(t)
    return model


def _declared_trained(model: nn.Module, spec: LoraSpec) -> set[str]:
    """State-dict keys an adapter with ``spec`` must hold besides its LoRA factors:
    every tensor of its modules_to_save, and the biases its ``bias`` option trains."""
    keys = {f"{p}.{n}" for p in spec.modules_to_save for n in model.get_submodule(p).state_dict()}
    if spec.bias == "none":
        return keys
    paths = spec.targets if spec.bias == "lora_only" else [p for p, _ in model.named_modules()]
    for path in paths:
        module = model.get_submodule(path)
        if isinstance(getattr(module, "bias", None), nn.Parameter) and not any(
                path == s or path.startswith(s + ".") for s in spec.modules_to_save):
            keys.add(f"{path}.bias" if path else "bias")
    return keys
