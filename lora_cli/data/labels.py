"""Class labels: the text of a label column, numbered.

Labels are sorted (numeric-looking ones numerically, before any others) and numbered
from 0; evaluation data is read with the training data's ``label_map``, so a label the
training data never had is an error at its line.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ..errors import DataError
from .read import show


def label_text(value, column: str, where: str) -> str:
    """Class label text: a non-empty string (stripped) or an integer."""
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    if isinstance(value, str) and value.strip():
        return value.strip()
    raise DataError(f"column {column!r}: {show(value)} is not a class label", where=where,
                    fix="write each label as a non-empty string or an integer")


def label_key(label: str):
    try:
        number = float(label)
    except ValueError:
        number = math.nan
    return (0, number, label) if math.isfinite(number) else (1, 0.0, label)


def known_label(value, column: str, where: str, label_map: dict[str, int] | None) -> str:
    """The label text of one row; with a ``label_map`` (eval data) it must be a known one."""
    label = label_text(value, column, where)
    if label_map is not None and label not in label_map:
        known = sorted(label_map, key=label_key)
        shown = known if len(known) <= 20 else known[:20] + ["..."]
        raise DataError(f"label {label!r} was not in the training data; known labels: {shown}", where=where,
                        fix="add examples of this label to the training data, or remove this row")
    return label


def class_ids(labels: list[str], label_map: dict[str, int] | None, column: str,
               file: str) -> tuple[Tensor, dict[str, int]]:
    """(class ids (N,), label map); the map is built from ``labels`` when not given."""
    if label_map is None:
        label_map = {lab: i for i, lab in enumerate(sorted(set(labels), key=label_key))}
        if len(label_map) < 2:
            raise DataError(f"classification needs at least 2 distinct labels in {column!r}, "
                            f"found {list(label_map)}", where=file,
                            fix="add examples of other classes, or use task: regression")
    return torch.tensor([label_map[lab] for lab in labels], dtype=torch.int64), dict(label_map)
