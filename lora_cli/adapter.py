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
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import math
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from . import __version__
from .errors import AdapterError
from .files import fsync_dir, remove, temp_path, write_synced
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
    return write_adapter(directory, config, adapter_tensors(model))


def write_adapter(directory: str | os.PathLike, config: Mapping, tensors: Mapping[str, torch.Tensor]) -> Path:
    """Write adapter files (``config`` from :func:`adapter_config`, ``tensors`` under PEFT's
    keys) to ``directory``, atomically: the complete new adapter or the previous one."""
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
    comes from the file's header)."""
    from safetensors import SafetensorError
    from safetensors import safe_open

    path = Path(path)
    if path.is_dir():
        weights, config_file = path / WEIGHTS_NAME, path / CONFIG_NAME
        if not weights.exists():
            alt = path / "adapter_model.bin"
            hint = " (a PEFT .bin adapter: re-save it with safetensors)" if alt.exists() else ""
            raise AdapterError(f"no {WEIGHTS_NAME} in this directory{hint}", where=str(path),
                               fix="point to a directory written by lora-train or PEFT's save_pretrained")
    elif path.is_file():
        weights, config_file = path, path.with_name(CONFIG_NAME)
    else:
        raise AdapterError("adapter not found", where=str(path),
                           fix="give an adapter directory or its adapter_model.safetensors file")
    try:
        with safe_open(str(weights), framework="pt") as f:
            header = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as exc:
        raise AdapterError(f"cannot read the adapter weights: {exc}", where=str(weights),
                           fix="the file is truncated or not safetensors; save the adapter again") from None
    if path.is_dir() and config_file.exists():   # the JSON is what PEFT reads: it wins
        config = _parse_json(config_file.read_text(), str(config_file))
    elif HEADER_KEY in header:
        config = _parse_json(header[HEADER_KEY], f"{weights} (header)")
    elif config_file.exists():
        config = _parse_json(config_file.read_text(), str(config_file))
    else:
        raise AdapterError(f"no adapter config: neither {CONFIG_NAME} beside it nor one in its header",
                           where=str(weights), fix=f"keep {CONFIG_NAME} next to the weights")
    return parse_adapter(config, tensors, source=str(path))


def _parse_json(text: str, where: str) -> dict:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise AdapterError(f"adapter config is not valid JSON: {exc}", where=where) from None
    if not isinstance(data, dict):
        raise AdapterError("adapter config is not a JSON object", where=where)
    return data


def _pattern_value(patterns: Mapping, path: str, default):
    """A rank/alpha pattern lookup as PEFT does it: the first key whose name matches."""
    for key, value in (patterns or {}).items():
        if name_matches(path, key):
            return value
    return default


def parse_adapter(config: dict, tensors: Mapping[str, torch.Tensor], *, source: str = "") -> Adapter:
    """Sort an adapter's tensors into low-rank updates and whole-tensor replacements."""
    if config.get("peft_type", "LORA") != "LORA":
        raise AdapterError(f"not a LoRA adapter (peft_type {config.get('peft_type')!r})", where=source)
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
            raise AdapterError(f"unexpected tensor key {key!r} (adapter keys start with {PREFIX!r})", where=source)
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
    updates = {}
    for path, pair in factors.items():
        if set(pair) != {"A", "B"}:
            raise AdapterError(f"module '{path}' has lora_{'A' if 'A' in pair else 'B'} but not its pair",
                               where=source)
        A, B = pair["A"], pair["B"]
        r = int(A.shape[0])
        if A.dim() != 2 or B.dim() != 2 or B.shape[1] != r:
            raise AdapterError(f"module '{path}': lora_A {tuple(A.shape)} and lora_B {tuple(B.shape)} "
                               "do not form a low-rank pair", where=source)
        expected_r = _pattern_value(config.get("rank_pattern"), path, rank)
        if r != expected_r:
            raise AdapterError(f"module '{path}' has rank {r} but the config says r={expected_r}", where=source)
        a = _pattern_value(config.get("alpha_pattern"), path, alpha)
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
                    dropout=float(config.get("lora_dropout", 0.0)), use_rslora=bool(config.get("use_rslora")),
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
