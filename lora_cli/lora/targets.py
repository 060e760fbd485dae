"""Targeting: which modules of a model get LoRA.

``target_modules`` is one of
  * a list of names: a name matches a module whose dotted path equals it or ends with
    ``.name`` (``"q_proj"`` matches ``layers.0.self_attn.q_proj``);
  * a regex string, matched in full against the dotted path;
  * ``"all-linear"``: every Linear (and GPT-2 Conv1D) except the output head.

``exclude_modules`` (names, same matching) removes modules from the match. A name that
matches nothing is an error that lists what the model does have. ``modules_to_save``
names modules trained in full instead; none of them may also be a target.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence

from torch import nn

from .errors import TargetError
from .layers import is_adaptable, is_linear
from .names import ALL_LINEAR, HEAD_NAMES


def name_matches(path: str, name: str) -> bool:
    """A list entry matches a module whose path equals it or ends with ``.name``."""
    return path == name or path.endswith("." + name)


def pattern_value(patterns: Mapping | None, path: str, default):
    """PEFT's rank_pattern / alpha_pattern lookup: the value of the first key (in order)
    that, read as a regex, matches the whole path or its end after a dot
    (``"v_proj"`` matches ``layers.0.self_attn.v_proj``); ``default`` when none does."""
    for key, value in (patterns or {}).items():
        if re.fullmatch(rf"(.*\.)?({key})", path):
            return value
    return default


def layer_index(path: str, layers_pattern: str | Sequence[str] | None, peft: bool = False) -> int | None:
    """The index of the layer a module path sits in, found as PEFT finds it: the number
    after ``<layers_pattern>.`` (``"layers"`` in ``model.layers.3.mlp.up_proj``) or, with no
    pattern, after the last ``<name>.<number>.``. None when there is none.

    PEFT also wants a dot before the container name, so it finds no layer in a path that
    starts with it (``layers.3.mlp``, a model whose layers sit at its root); lora-cli does,
    unless ``peft`` asks for PEFT's rule exactly."""
    patterns = [layers_pattern] if isinstance(layers_pattern, str) else list(layers_pattern or [])
    for pattern in patterns or [r"[^.]*"]:
        prefix = r".*\." if peft else r"(?:.*\.)?"        # the greedy prefix finds the last one
        found = re.match(rf"{prefix}{pattern}\.(\d+)\.", path)
        if found:
            return int(found.group(1))
    return None


def in_layers(path: str, layers_to_transform: int | Sequence[int] | None,
              layers_pattern: str | Sequence[str] | None = None, peft: bool = False) -> bool:
    """Whether ``layers_to_transform`` (None: every layer) selects this module path."""
    if layers_to_transform is None:
        return True
    index = layer_index(path, layers_pattern, peft)
    wanted = [layers_to_transform] if isinstance(layers_to_transform, int) else layers_to_transform
    return index is not None and index in wanted


def output_head(model: nn.Module) -> str | None:
    """The output head's path: ``get_output_embeddings()`` if the model has it, else a
    top-level last child named like a head (lm_head, head, classifier, score, output)."""
    getter = getattr(model, "get_output_embeddings", None)
    if callable(getter):
        head = getter()
        if head is not None:
            for path, module in model.named_modules():
                if module is head:
                    return path
    children = list(model.named_children())
    if children and children[-1][0] in HEAD_NAMES:
        return children[-1][0]
    return None


def adaptable_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Every module LoRA can adapt (Linear, Conv1D, Embedding), by dotted path."""
    return {path: m for path, m in model.named_modules() if path and is_adaptable(m)}


def _overview(paths: Iterable[str]) -> str:
    """The full paths of a small model; for a large one 'q_proj (x4), k_proj (x4), ...'
    with one full path as an example."""
    paths = list(paths)
    if not paths:
        return "none"
    if len(paths) <= 12:
        return ", ".join(paths)
    counts = Counter(p.rsplit(".", 1)[-1] for p in paths)
    leaves = ", ".join(f"{leaf} (x{n})" if n > 1 else leaf for leaf, n in counts.items())
    return f"{leaves}; full paths look like '{paths[-1]}'"


def resolve_targets(model: nn.Module, target_modules: str | Sequence[str],
                    exclude_modules: Sequence[str] = ()) -> list[str]:
    """The module paths that ``target_modules`` selects, minus ``exclude_modules``.

    Raises TargetError when a pattern matches nothing, or matches a module type LoRA
    cannot adapt, listing the adaptable modules the model has.
    """
    adaptable = adaptable_modules(model)
    if isinstance(target_modules, str) and target_modules == ALL_LINEAR:
        head = output_head(model)
        chosen = [p for p, m in adaptable.items() if is_linear(m) and p != head]
        if not chosen:
            raise TargetError(
                "target_modules 'all-linear' found no Linear layers besides the output head",
                where="lora.target_modules",
                fix=f"name the modules to adapt; adaptable modules: {_overview(adaptable)}",
            )
    elif isinstance(target_modules, str):
        try:
            pattern = re.compile(target_modules)
        except re.error as exc:
            raise TargetError(f"invalid regex {target_modules!r}: {exc}", where="lora.target_modules") from None
        matched = [p for p, _ in model.named_modules() if p and pattern.fullmatch(p)]
        _refuse_unadaptable(model, matched, adaptable, repr(target_modules))
        chosen = matched
        if not chosen:
            raise TargetError(
                f"regex {target_modules!r} matches no module (it must match the whole dotted path)",
                where="lora.target_modules",
                fix=f"adaptable modules: {_overview(adaptable)}",
            )
    else:
        chosen = []
        for name in target_modules:
            matched = [p for p, _ in model.named_modules() if p and name_matches(p, name)]
            if not matched:
                raise TargetError(
                    f"target {name!r} matches no module",
                    where="lora.target_modules",
                    fix=f"adaptable modules: {_overview(adaptable)}",
                )
            _refuse_unadaptable(model, matched, adaptable, repr(name))
            chosen += [p for p in matched if p not in chosen]
    for name in exclude_modules:
        if not any(name_matches(p, name) for p in chosen):
            raise TargetError(f"exclude {name!r} matches none of the targeted modules",
                              where="lora.exclude_modules",
                              fix=f"targeted modules: {_overview(chosen)}")
    chosen = [p for p in chosen if not any(name_matches(p, name) for name in exclude_modules)]
    if not chosen:
        raise TargetError("exclude_modules removed every targeted module", where="lora.exclude_modules")
    order = {p: i for i, p in enumerate(adaptable)}
    return sorted(chosen, key=order.__getitem__)


def _refuse_unadaptable(model: nn.Module, matched: list[str], adaptable: dict, what: str) -> None:
    bad = [p for p in matched if p not in adaptable]
    if bad:
        kind = type(model.get_submodule(bad[0])).__name__
        raise TargetError(
            f"target {what} matches '{bad[0]}', a {kind}; LoRA adapts Linear, Conv1D and Embedding layers",
            where="lora.target_modules",
            fix=f"adaptable modules: {_overview(adaptable)}",
        )


def resolve_modules_to_save(model: nn.Module, names: Sequence[str], targets: Sequence[str]) -> list[str]:
    """Paths of the modules to train fully; each name must match, and none may be a target."""
    paths: list[str] = []
    for name in names:
        matched = [p for p, _ in model.named_modules() if p and name_matches(p, name)]
        if not matched:
            children = ", ".join(n for n, _ in model.named_children())
            raise TargetError(f"module {name!r} not found", where="lora.modules_to_save",
                              fix=f"top-level modules: {children}")
        for p in matched:
            clash = [t for t in targets if t == p or t.startswith(p + ".") or p.startswith(t + ".")]
            if clash:
                raise TargetError(f"'{p}' is both trained fully and adapted by LoRA ('{clash[0]}')",
                                  where="lora.modules_to_save",
                                  fix="remove it from target_modules or from modules_to_save")
            if p not in paths:
                paths.append(p)
    return paths
