"""Tabular data (``regression``, ``classification``): a ``.csv`` file with a header row,
or a ``.jsonl`` file with one JSON object per line, every value checked once, here, so
the training loop never meets a bad row."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from ..choices import TABULAR_TASKS
from ..errors import DataError
from .labels import class_ids, known_label
from .read import check_suffix, read_text, show, suggest, table

_F32_MAX = float(torch.finfo(torch.float32).max)


@dataclass(eq=False)
class TabularData:
    """Rows of numeric features and one target.

    ``x`` is (N, F) float32. ``y`` is (N,) float32 for regression, or (N,) int64 class
    indices for classification, in which case ``label_map`` maps label text to class
    index (labels sorted; numeric-looking labels numerically, before any others).
    """

    x: Tensor
    y: Tensor
    features: list[str]
    target: str
    label_map: dict[str, int] | None = None
    source: str = ""

    def __len__(self) -> int:
        return self.x.shape[0]


def _number(value, column: str, where: str) -> float:
    """A finite float32-sized number from a CSV cell or a JSON value."""
    if isinstance(value, str) and not value.strip():
        raise DataError(f"column {column!r} is empty", where=where,
                        fix="fill in a number or remove the row")
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise DataError(f"column {column!r}: expected a number, got {show(value)}",
                        where=where, fix="write a plain number such as 1.5")
    try:
        number = float(value)
    except ValueError:
        raise DataError(f"column {column!r}: {show(value)} is not a number", where=where,
                        fix="write a plain number such as 1.5 (encode categories as numbers)"
                        ) from None
    except OverflowError:  # a JSON integer beyond float range
        number = math.inf
    if not math.isfinite(number) or abs(number) > _F32_MAX:
        raise DataError(f"column {column!r}: {show(value)} is not a finite float32 number",
                        where=where, fix="remove or fill in rows with NaN, inf or huge values")
    return number


def load_tabular(path, *, task: str, target: str = "y", features: list[str] | None = None,
                 label_map: dict[str, int] | None = None) -> TabularData:
    """Load a ``.csv`` or ``.jsonl`` table for ``regression`` or ``classification``.

    ``features=None`` takes every column but ``target``, in file order (for JSONL, the
    key order of the first object; later objects may carry extra keys, which are
    ignored). For classification pass the training data's ``label_map`` when loading
    eval data: a label the training data never had is then an error.
    """
    if task not in TABULAR_TASKS:
        raise ValueError(f"load_tabular: task must be one of {TABULAR_TASKS}, got {task!r}")
    file = str(path)
    suffix = check_suffix(path, (".csv", ".jsonl"), task)
    header_line, columns, records = table(read_text(path), suffix, file)
    where = f"{file}:{header_line}"
    features = [c for c in columns if c != target] if features is None else list(dict.fromkeys(features))
    for kind, name in [("target", target), *(("feature", f) for f in features)]:
        if name not in columns:
            raise DataError(f"{kind} column {name!r} not found{suggest(name, columns)}; "
                            f"columns: {columns}", where=where,
                            fix=f"set data.{kind} to one of the columns" if kind == "target"
                            else "list only existing columns in data.features")
    if target in features:
        raise DataError(f"target column {target!r} is also listed as a feature", where=where,
                        fix="remove the target from data.features")
    if not features:
        raise DataError(f"no feature columns: the only column is the target {target!r}",
                        where=where, fix="add at least one feature column")

    classify = task == "classification"
    xs: list[list[float]] = []
    ys: list = []
    for line, record in records:
        where = f"{file}:{line}"
        missing = [c for c in [*features, target] if c not in record]
        if missing:
            hint = suggest(missing[0], [k for k in record if k not in columns])
            raise DataError(f"object lacks column {missing[0]!r}{hint}; "
                            f"it has {list(record)}", where=where,
                            fix="give every line the same keys")
        xs.append([_number(record[c], c, where) for c in features])
        if not classify:
            ys.append(_number(record[target], target, where))
            continue
        label = known_label(record[target], target, where, label_map)
        ys.append(label)

    if not xs:
        raise DataError("file has a header but no data rows", where=f"{file}:{header_line}",
                        fix="add one row per example below the header")
    if classify:
        y, label_map = class_ids(ys, label_map, target, file)
    else:
        y = torch.tensor(ys, dtype=torch.float32)  # (N,)
    x = torch.tensor(xs, dtype=torch.float32)  # (N, F)
    return TabularData(x, y, features, target, label_map, file)
