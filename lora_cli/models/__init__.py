"""Where a model comes from: a built-in architecture or the user's own class.

    build_model(arch="gpt", args={...})                       a built-in (see builtin.ARCHS)
    build_model(class_path="my_models:Net", args={...},       any nn.Module class or factory,
                search_path=<the config's folder>)            imported from the user's code
    infer_args("mlp", args, n_features=10, n_outputs=1)       fill sizes the data decides

Every mistake (unknown arch, module not found, wrong keyword) is a ModelError that says
what, where (the config key) and how to fix it. Weight files are read and written by
:mod:`.weights`.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import os
import sys
from collections.abc import Mapping
from contextlib import contextmanager

from torch import nn

from ..errors import ModelError, closest
from .builtin import ARCHS, MLP, GPT, LinearModel
from ..lora.weight_files import read_state_dict, save_state_dict
from .weights import check_fits, load_base_weights

__all__ = [
    "ARCHS", "GPT", "MLP", "LinearModel", "build_model", "check_built_in_fits", "infer_args", "module_origin",
    "load_base_weights", "read_state_dict", "save_state_dict",
]


def _did_you_mean(name: str, choices) -> str:
    close = closest(name, choices)
    return f"did you mean {close!r}? " if close else ""


@contextmanager
def _first_on_sys_path(folder: str | os.PathLike | None):
    """Put ``folder`` first on sys.path for the duration of an import."""
    if folder is None:
        yield
        return
    folder = os.fspath(folder)
    sys.path.insert(0, folder)
    importlib.invalidate_caches()
    try:
        yield
    finally:
        try:
            sys.path.remove(folder)
        except ValueError:
            pass


def module_origin(class_path: str, search_path: str | os.PathLike | None = None) -> str:
    """Where the module of ``class_path`` would be imported from, found without running
    any of it: a file, a package's folder, or why there is none."""
    top = class_path.partition(":")[0].partition(".")[0]
    if not top.isidentifier():
        return f"nowhere ({top!r} is not a module name)"
    loaded = sys.modules.get(top)
    if loaded is not None:
        return getattr(loaded, "__file__", None) or f"Python itself (the module {top!r} is built in)"
    with _first_on_sys_path(search_path):
        try:
            spec = importlib.util.find_spec(top)   # a top-level name: finds, imports nothing
        except (ImportError, ValueError):
            spec = None
    if spec is None:
        return f"nowhere (no module named {top!r} is on the search path)"
    if spec.origin and spec.origin not in ("built-in", "frozen"):
        return spec.origin
    locations = list(spec.submodule_search_locations or [])
    return locations[0] if locations else f"Python itself (the module {top!r} is {spec.origin or 'built in'})"


def _import_class_path(class_path: str, search_path) -> object:
    """The object named by ``"pkg.module:Name"``, imported with ``search_path`` first on sys.path."""
    where = "model.class_path"
    module_name, sep, attr = class_path.partition(":")
    if not sep or not module_name or not attr:
        raise ModelError(
            f"class_path {class_path!r} is not of the form 'module:ClassName'",
            where=where,
            fix="write e.g. class_path: my_models:TinyNet (my_models.py next to the config file)",
        )
    with _first_on_sys_path(search_path):
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as e:
            if e.name and module_name != e.name and not module_name.startswith(e.name + "."):
                raise ModelError(
                    f"module {module_name!r} was found but imports {e.name!r}, which is not installed",
                    where=where, fix=f"install the package that provides {e.name!r}",
                ) from e
            searched = f"{os.fspath(search_path)!r} (the config's folder) and " if search_path else ""
            raise ModelError(
                f"no module named {module_name!r}",
                where=where,
                fix=f"put {module_name.replace('.', '/')}.py in {searched}the current directory, "
                    "or install the package that provides it",
            ) from e
        except Exception as e:
            raise ModelError(
                f"importing module {module_name!r} failed: {type(e).__name__}: {e}",
                where=where, fix=f"fix the error in {module_name!r} (import it in Python to see the traceback)",
            ) from e
    if not hasattr(module, attr):
        public = [n for n in dir(module) if not n.startswith("_")]
        models = [n for n in public if inspect.isclass(getattr(module, n)) and issubclass(getattr(module, n), nn.Module)]
        listed = ", ".join(models[:10]) + (", ..." if len(models) > 10 else "")
        raise ModelError(
            f"module {module_name!r} has no attribute {attr!r}",
            where=where,
            fix=_did_you_mean(attr, public)
                + (f"its nn.Module classes: {listed}" if models else "it defines no nn.Module class"),
        )
    return getattr(module, attr)


def _signature_text(factory) -> str:
    """``Name(a, b=1, *, c=None)``: the constructor's parameters without annotations."""
    try:
        params = inspect.signature(factory).parameters.values()
    except (TypeError, ValueError):
        return repr(factory)
    text = ", ".join(str(p.replace(annotation=inspect.Parameter.empty)) for p in params)
    return f"{getattr(factory, '__name__', factory)}({text})"


def _check_kwargs(factory, args: dict, name: str) -> None:
    """A ModelError naming unexpected and missing keyword arguments, if any."""
    try:
        params = inspect.signature(factory).parameters
    except (TypeError, ValueError):
        return  # no signature to check against (some C types): let the call decide
    takes_any = any(p.kind is p.VAR_KEYWORD for p in params.values())
    keywordable = [n for n, p in params.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    unexpected = [] if takes_any else [k for k in args if k not in keywordable]
    missing = [n for n in keywordable if params[n].default is inspect.Parameter.empty and n not in args]
    if not unexpected and not missing:
        return
    problems = []
    for k in unexpected:
        hint = _did_you_mean(str(k), keywordable).strip()
        problems.append(f"unexpected argument {k!r}" + (f" ({hint})" if hint else ""))
    if missing:
        problems.append(f"missing required argument{'s' if len(missing) > 1 else ''} "
                        + ", ".join(repr(m) for m in missing))
    raise ModelError(
        f"{name} cannot be built: " + "; ".join(problems),
        where="model.args",
        fix=f"the constructor is {_signature_text(factory)}",
    )


def build_model(*, arch: str | None = None, class_path: str | None = None, args: Mapping | None = None,
                search_path: str | os.PathLike | None = None) -> nn.Module:
    """A freshly initialized model from a built-in ``arch`` or a ``class_path``, called with ``args``.

    ``class_path`` is ``"pkg.module:Class"`` (a factory function returning an nn.Module
    also works); ``search_path``, usually the config file's folder, is put first on
    sys.path while importing. Exactly one of ``arch`` and ``class_path`` must be given.
    """
    if (arch is None) == (class_path is None):
        raise ModelError(
            "give exactly one of model.arch and model.class_path",
            where="model",
            fix=f"use arch: one of {', '.join(ARCHS)}; or class_path: my_module:MyModel",
        )
    if args is not None and not isinstance(args, Mapping):
        raise ModelError(f"model.args must be a mapping, got {type(args).__name__}", where="model.args",
                         fix="write keyword arguments, e.g. args: {in_features: 10}")
    args = dict(args or {})
    if arch is not None:
        if arch not in ARCHS:
            raise ModelError(
                f"unknown arch {arch!r}",
                where="model.arch",
                fix=_did_you_mean(arch, ARCHS) + f"built-in archs: {', '.join(ARCHS)}; "
                    "for your own model use model.class_path: module:Class",
            )
        factory, name = ARCHS[arch], f"arch {arch!r}"
    else:
        factory, name = _import_class_path(class_path, search_path), repr(class_path)
        if inspect.isclass(factory) and not issubclass(factory, nn.Module):
            raise ModelError(f"{class_path!r} is a class but not a torch.nn.Module subclass",
                             where="model.class_path", fix="point class_path at an nn.Module subclass")
        if not callable(factory):
            raise ModelError(f"{class_path!r} is {type(factory).__name__}, not a class",
                             where="model.class_path", fix="point class_path at an nn.Module subclass")
    _check_kwargs(factory, args, name)
    try:
        model = factory(**args)
    except ModelError:
        raise
    except Exception as e:  # the args (or the user's constructor) are at fault, not lora-cli
        raise ModelError(
            f"{name} could not be built from model.args: {type(e).__name__}: {e}",
            where="model.args",
            fix=f"check the argument values against {_signature_text(factory)}",
        ) from e
    if not isinstance(model, nn.Module):
        raise ModelError(f"{name} returned {type(model).__name__}, not a torch.nn.Module",
                         where="model.class_path", fix="point class_path at an nn.Module subclass")
    return model


# Which args each built-in arch takes from the data: arg name -> infer_args keyword.
_DATA_ARGS = {
    "linear": {"in_features": "n_features", "out_features": "n_outputs"},
    "mlp": {"in_features": "n_features", "out_features": "n_outputs"},
    "gpt": {"vocab_size": "vocab_size"},
}
_DATA_WORDS = {"n_features": "feature columns", "n_outputs": "target columns", "vocab_size": "tokens in its vocabulary"}


def infer_args(arch: str, args: Mapping, *, n_features: int | None = None, n_outputs: int | None = None,
               vocab_size: int | None = None, max_seq_len: int | None = None) -> dict:
    """``args`` plus the sizes the data determines and the user left out.

    For ``linear``/``mlp``: ``in_features`` = n_features, ``out_features`` = n_outputs;
    for ``gpt``: ``vocab_size`` (the tokenizer's). An explicit value that contradicts the
    data is a ModelError; a gpt ``vocab_size`` larger than the tokenizer's is allowed
    (unused rows). With ``max_seq_len`` (data.max_seq_len), a gpt whose own max_seq_len
    is shorter is refused up front rather than mid-training. Other archs get ``args``
    back unchanged.
    """
    known = {"n_features": n_features, "n_outputs": n_outputs, "vocab_size": vocab_size}
    out = dict(args or {})
    for arg, source in _DATA_ARGS.get(arch, {}).items():
        value = known[source]
        if value is None:
            continue
        if arg not in out:
            out[arg] = value
            continue
        given = out[arg]
        fits = isinstance(given, int) and (given >= value if arg == "vocab_size" else given == value)
        if not fits:
            raise ModelError(
                f"model.args.{arg} is {given} but the data has {value} {_DATA_WORDS[source]}",
                where=f"model.args.{arg}",
                fix=f"remove model.args.{arg} (it is inferred from the data) or set it to {value}",
            )
    if arch == "gpt" and max_seq_len is not None:
        model_len = out.get("max_seq_len", inspect.signature(GPT).parameters["max_seq_len"].default)
        if isinstance(model_len, int) and model_len < max_seq_len:
            raise ModelError(
                f"data.max_seq_len is {max_seq_len} but the model takes at most {model_len} tokens "
                "(model.args.max_seq_len)",
                where="data.max_seq_len",
                fix=f"set data.max_seq_len <= {model_len}, or raise model.args.max_seq_len",
            )
    return out


def check_built_in_fits(arch: str, args: Mapping, shapes: Mapping[str, tuple[int, ...]], where: str, *,
                        exact: bool = True) -> None:
    """Refuse, before any memory is allocated, a built-in ``arch`` whose ``args`` do not
    give a model with exactly these tensor ``shapes`` (name -> shape, the base's); with
    ``exact=False``, only one much larger than they are.

    The model is built on the meta device, with at most a few modules per tensor, and may
    hold at most twice as many numbers as the base plus 64 M (buffers outside the state
    dict, like rotary tables, count too): sizes from an untrusted file (an adapter's
    model_args) could otherwise ask for terabytes, or a million layers.
    """
    import math

    import torch
    from torch.nn.modules.module import register_module_module_registration_hook

    limit, count = 16 * len(shapes) + 64, 0
    fix = "use the model_args the base was trained with (an adapter's own are in its adapter_config.json)"

    def count_modules(module, name, submodule):
        nonlocal count
        count += 1
        if count > limit:
            raise ModelError(f"these arguments build a model of more than {limit:,} modules, for the {len(shapes):,} "
                             f"tensors of {where}", where="model.args", fix=fix)

    handle = register_module_module_registration_hook(count_modules)
    try:
        with torch.device("meta"):
            probe = build_model(arch=arch, args=args)
    finally:
        handle.remove()
    if exact:
        check_fits(probe, shapes, where)
    weights = sum(math.prod(shape) for shape in shapes.values())
    held = sum(t.numel() for t in probe.parameters()) + sum(b.numel() for b in probe.buffers())
    if held > 2 * weights + 2**26:     # rotary tables of a long context are fine; gigabytes are not
        raise ModelError(f"these arguments build a model that holds {held:,} numbers, for the {weights:,} of {where}",
                         where="model.args", fix=fix)
