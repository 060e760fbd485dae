"""The fingerprint of a base model: which base an adapter was trained on.

Per base tensor the fingerprint records ``"shape|dtype|hash"``: the hash of up to
SAMPLES evenly spaced elements. It tells one trained base from another (not a single
flipped weight) and costs the same on any size: the positions are exact integers, and
only the sampled elements are read, from memory or straight from a file.

    scheme 2 (this version)  positions i * (n - 1) // (SAMPLES - 1), i = 0..SAMPLES-1;
                             floating values hashed as bfloat16 (exact for a bfloat16
                             base and for its float32 upcast, so a base loaded in another
                             float dtype is still the same base), integers as int64; the
                             dtype is recorded but only its kind (float or not) is compared.
    scheme 1 (lora-cli 0.1)  positions from a float32 linspace (wrong past 2**24
                             elements), raw bytes in the tensor's own dtype; still checked
                             for adapters written by that version.

Tensors that training changes (modules_to_save, trained biases) are recorded by shape
and dtype only (hash ``-``).
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import math
import re
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING

import torch
from torch import nn

from .checks import entries, show
from .errors import AdapterError
from .inject import lora_layers, require_spec, trained_tensors

if TYPE_CHECKING:
    from .adapter import Adapter


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
    return fingerprint(base_tensors(model), trained=trained_tensors(model, require_spec(model)))


def base_tensors(model: nn.Module) -> Iterable[tuple[str, torch.Tensor]]:
    lora = {id(p) for layer in lora_layers(model).values() for p in layer.parameters(recurse=False)
            if p is not layer.weight and p is not layer.bias}
    for name, t in model.state_dict(keep_vars=True).items():
        if id(t) not in lora:
            yield name, t


_RECORD = re.compile(r"(\d+(x\d+)*)?\|[a-z0-9_]+\|([0-9a-f]{16}|-)")   # a fingerprint entry: shape|dtype|hash


def recorded_fingerprint_problem(v):
    if v is None:
        return None
    if not isinstance(v, dict) or not isinstance(v.get("digest", ""), str):
        return f"must be an object with a 'digest' string and 'tensors', got {show(v)}"
    if v.get("scheme", 1) not in (1, SCHEME) or isinstance(v.get("scheme"), bool):
        return f"scheme: must be 1 or {SCHEME} (how the values were sampled), got {show(v.get('scheme'))}"
    problem = entries(lambda x: isinstance(x, str) and _RECORD.fullmatch(x) is not None,
                       "'shape|dtype|hash' (e.g. '8x3|float32|...')")(v.get("tensors"))
    return problem and f"tensors{'' if problem.startswith('[') else ': '}{problem}"


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
