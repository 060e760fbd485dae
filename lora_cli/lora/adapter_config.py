"""adapter_config.json: what it says, written and read back.

PEFT's LoRA fields (``peft_type``, ``r``, ``lora_alpha``, ``target_modules``, patterns,
``bias``, ``modules_to_save``, ...) plus lora-cli's own under the ``lora_cli`` key: the
tool version, each adapted module's layout, the base fingerprint, and whatever the caller
adds (the run's metadata: see :mod:`lora_cli.run.meta`). An adapter is a shared file, so
reading its config checks every field the engine reads (:func:`validate_adapter_config`),
all problems at once; fields the engine does not read pass (PEFT adds some, the run checks
its own).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from torch import nn

from .. import __version__
from .checks import entries, is_int, is_number, is_str_list, nul_at, parse_json, show, simple
from .errors import AdapterError
from .fingerprint import base_fingerprint, recorded_fingerprint_problem
from .inject import lora_layers, require_spec
from .names import LAYOUTS
from .targets import in_layers, name_matches


def _peft_target_modules(model: nn.Module, targets: list[str], layers=None, pattern=None) -> list[str]:
    """The shortest PEFT target list that selects exactly ``targets`` (within
    ``layers_to_transform`` ``layers``): leaf names when they pick no other module, else
    the full paths."""
    leaves = sorted({t.rsplit(".", 1)[-1] for t in targets})
    picked = {p for p, _ in model.named_modules() if p and any(name_matches(p, leaf) for leaf in leaves)
              and in_layers(p, layers, pattern)}
    return leaves if picked == set(targets) else list(targets)


def adapter_config(model: nn.Module, *, base_model_name_or_path: str | None = None,
                   task_type: str | None = None, metadata: Mapping | None = None) -> dict:
    """adapter_config.json for ``model``: PEFT's LoRA fields plus lora-cli's metadata."""
    spec = require_spec(model)
    layers = lora_layers(model)
    # PEFT's layers_to_transform, when PEFT's own rule picks the same layers; else the
    # target list alone says it all (full paths)
    selected = spec.layers_to_transform is not None and all(
        in_layers(p, spec.layers_to_transform, spec.layers_pattern, peft=True) for p in spec.targets)
    peft_layers = (spec.layers_to_transform, spec.layers_pattern) if selected else (None, None)
    layouts = {p: m.layout for p, m in layers.items()}
    ranks = {p: m.rank for p, m in layers.items()}
    alphas = {p: m.alpha for p, m in layers.items()}
    return {
        "peft_type": "LORA",
        "task_type": task_type,
        "base_model_name_or_path": base_model_name_or_path,
        "r": spec.rank,
        "lora_alpha": spec.alpha,
        "lora_dropout": spec.dropout,
        "target_modules": _peft_target_modules(model, spec.targets, *peft_layers),
        "exclude_modules": None,
        "use_rslora": spec.use_rslora,
        "fan_in_fan_out": any(v == "conv1d" for v in layouts.values()),
        "bias": spec.bias,
        "modules_to_save": list(spec.modules_to_save) or None,
        "init_lora_weights": True,
        "inference_mode": True,
        "rank_pattern": {p: r for p, r in ranks.items() if r != spec.rank},
        "alpha_pattern": {p: a for p, a in alphas.items() if a != spec.alpha},
        "use_dora": spec.use_dora,
        "layers_to_transform": peft_layers[0],
        "layers_pattern": peft_layers[1],
        "lora_cli": {
            "version": __version__,
            "modules": layouts,
            # a caller may pass the fingerprint taken before a dtype cast: then hash nothing again
            "fingerprint": (metadata or {}).get("fingerprint") or base_fingerprint(model),
            **(metadata or {}),
        },
    }


MAX_CONFIG_BYTES = 64 * 1024 * 1024   # a fingerprint of 100,000 base tensors takes about 8 MB


MAX_CLASSES = 10_000                  # a label map beyond this is refused (evaluation keeps a C x C table)


DAMAGED = "the adapter is damaged or was not written by lora-cli or PEFT; train or save it again"


def read_config_text(path: Path) -> str:
    try:
        size = path.stat().st_size
        if size > MAX_CONFIG_BYTES:
            raise AdapterError(f"adapter config is {size / 2**20:.0f} MB, more than the {MAX_CONFIG_BYTES // 2**20} MB "
                               "an adapter config can be", where=str(path), fix=DAMAGED)
        return path.read_bytes().decode("utf-8")
    except UnicodeDecodeError:
        raise AdapterError("adapter config is not UTF-8 text", where=str(path), fix=DAMAGED) from None
    except OSError as exc:
        raise AdapterError(f"cannot read the adapter config: {exc.strerror or exc}", where=str(path)) from None


def parse_config_json(text: str, where: str) -> dict:
    if len(text) > MAX_CONFIG_BYTES:
        raise AdapterError(f"adapter config is more than the {MAX_CONFIG_BYTES // 2**20} MB an adapter config can be",
                           where=where, fix=DAMAGED)
    try:
        data = parse_json(text, "adapter config")
    except ValueError as exc:
        raise AdapterError(str(exc), where=where, fix=DAMAGED) from None
    if not isinstance(data, dict):
        raise AdapterError(f"adapter config is a JSON {type(data).__name__}, not an object", where=where, fix=DAMAGED)
    return data


def _check_label_map(v):
    if v is None:
        return None
    if not isinstance(v, dict) or not all(is_int(i) for i in v.values()):
        return f"must be an object of label names to class ids, got {show(v)}"
    if not 2 <= len(v) <= MAX_CLASSES:
        return f"must hold 2 to {MAX_CLASSES:,} classes, got {len(v):,}"
    if sorted(v.values()) != list(range(len(v))):
        return f"must give the {len(v)} labels the class ids 0 to {len(v) - 1}, each once, got {show(v)}"
    return None


def _check_training_config(v):
    if v is None:
        return None
    if not isinstance(v, dict):
        return f"must be an object (the training config), got {show(v)}"
    if not isinstance(v.get("model", {}), dict):
        return f"model: must be an object, got {show(v['model'])}"
    return None


# adapter_config.json: key -> check (None when fine, else the problem). Absent keys take
# PEFT's defaults; keys lora-cli does not read are not checked.
_STRING = simple(lambda v: isinstance(v, str), "a string", null=True)


_FLAG = simple(lambda v: isinstance(v, bool), "true or false", null=True)


_PEFT_FIELDS = {
    "peft_type": _STRING,
    "task_type": _STRING,
    "base_model_name_or_path": _STRING,
    "r": simple(lambda v: is_int(v) and v >= 1, "an integer >= 1"),
    "lora_alpha": simple(is_number, "a finite number (at most 3.4e38 in size)"),
    "lora_dropout": simple(lambda v: is_number(v) and 0 <= v < 1, "a number >= 0 and < 1", null=True),
    "use_rslora": _FLAG,
    "fan_in_fan_out": _FLAG,
    "use_dora": _FLAG,
    "bias": simple(lambda v: v in ("none", "all", "lora_only"), "one of none, all, lora_only"),
    "modules_to_save": simple(is_str_list, "a list of module names", null=True),
    "target_modules": simple(lambda v: isinstance(v, str) or is_str_list(v), "a list of names or a string",
                              null=True),
    "rank_pattern": lambda v: v and entries(lambda x: is_int(x) and x >= 1, "an integer >= 1")(v),
    "alpha_pattern": lambda v: v and entries(is_number, "a finite number")(v),
    "lora_cli": simple(lambda v: isinstance(v, dict), "an object", null=True),
    "layers_to_transform": simple(lambda v: is_int(v) or (isinstance(v, list) and all(is_int(i) for i in v)),
                                  "a layer index or a list of them", null=True),
    "layers_pattern": simple(lambda v: isinstance(v, str) or is_str_list(v), "a name or a list of names",
                             null=True),
}


_LORA_CLI_FIELDS = {
    "modules": entries(lambda x: x in LAYOUTS, f"one of {', '.join(LAYOUTS)}", keys="module paths"),
    "fingerprint": recorded_fingerprint_problem,
    "model_args": simple(lambda v: isinstance(v, dict), "an object of keyword arguments"),
    "label_map": _check_label_map,
    "features": simple(lambda v: is_str_list(v) and v and len(set(v)) == len(v),
                        "a non-empty list of distinct column names", null=True),
    "search_path": _STRING,
    "config": _check_training_config,
}


# PEFT initialisations that rewrite the base weight (W - s B0 A0 for PiSSA/OLoRA/CorDA/
# LoRA-GA, a quantized residual for LoftQ): an adapter saved with one of these, and not
# converted, applies to that rewritten base only, never to the base as published.
RESIDUAL_INITS = ("pissa", "olora", "corda", "loftq", "lora_ga")


def residual_init(value) -> str | None:
    """The residual-base initialisation ``init_lora_weights`` names ("pissa" also for
    "pissa_niter_K"), or None when the adapter applies to the untouched base."""
    if not isinstance(value, str):
        return None
    name = value.lower()
    return next((init for init in RESIDUAL_INITS if name == init or name.startswith(init + "_niter_")), None)


def check_original_base(config: Mapping, where: str) -> None:
    """Refuse an adapter that only applies to a residual base (see RESIDUAL_INITS).

    Applied to the original base it would give a different model (PEFT itself needs the
    rewritten base it saved beside such an adapter), so it is never silently misapplied.
    """
    init = residual_init(config.get("init_lora_weights"))
    if init is None:
        return
    if init == "loftq":
        fix = ("LoftQ adapters apply to the quantized residual base PEFT made; merge it with PEFT against that base, "
               "or train a plain LoRA adapter")
    else:
        fix = ("convert it with PEFT to an adapter for the original base: save it with "
               "model.save_pretrained(out, path_initial_model_for_weight_conversion=<the adapter as initialised, "
               "saved before training>), which writes a rank-2r adapter with init_lora_weights=true; "
               "adapters lora-train writes with lora.init_lora_weights: " + init + " are converted already")
    raise AdapterError(f"this adapter was saved with init_lora_weights={config.get('init_lora_weights')!r} and "
                       "not converted: it applies only to the residual base PEFT rewrote at initialisation, "
                       "not to the original base model", where=where, fix=fix)


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
        raise AdapterError(f"adapter config is a JSON {type(config).__name__}, not an object", where=where, fix=DAMAGED)
    def problems_in(section: dict, fields: dict, prefix: str) -> list[str]:
        found = ((key, check(section[key])) for key, check in fields.items() if key in section)
        return [f"{prefix}{key}{'' if problem.startswith('[') else ': '}{problem}" for key, problem in found if problem]

    problems = problems_in(config, _PEFT_FIELDS, "")
    if isinstance(config.get("lora_cli"), dict):
        problems += problems_in(config["lora_cli"], _LORA_CLI_FIELDS, "lora_cli.")
    nul = nul_at(config)
    if nul is not None:   # no path or name can hold one: the system refuses it when it is used
        problems.append(f"{nul or 'the config'}: a string holds a NUL character")
    if problems:
        more = f"\n  ... and {len(problems) - 10} more" if len(problems) > 10 else ""
        what = problems[0] if len(problems) == 1 else f"{len(problems)} problems:\n" + "\n".join(
            f"  - {p}" for p in problems[:10]) + more
        raise AdapterError(f"malformed adapter config: {what}", where=where, fix=DAMAGED)
    return config
