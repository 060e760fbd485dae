"""Splits, epoch orders and batches, drawn by index.

:func:`epoch_order` gives the permutation for one epoch from ``(seed, epoch)`` alone, so a
resumed run regenerates the exact order and skips the batches it already did.
"""

from __future__ import annotations

import hashlib
from dataclasses import replace

import torch
from torch import Tensor

from ..errors import DataError
from .packing import PackedTextData
from .tabular import TabularData
from .text import TextClassData, TextData

IGNORE_INDEX = -100
"""Label value for positions that carry no loss (prompt tokens and padding)."""


def text_class_batch(data: TextClassData, indices: Tensor, pad_id: int) -> tuple[Tensor, Tensor]:
    """(input_ids (B, T) right-padded with ``pad_id``, class ids (B,))."""
    rows = [data.examples[i] for i in torch.as_tensor(indices).tolist()]
    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.int64)   # (B, T)
    for b, ids in enumerate(rows):
        input_ids[b, :len(ids)] = torch.tensor(ids, dtype=torch.int64)
    return input_ids, data.y[torch.as_tensor(indices, dtype=torch.int64)]


def _subset(data, indices: Tensor):
    if isinstance(data, TextClassData):
        rows = indices.tolist()
        cut = [data.was_truncated[i] for i in rows] if data.was_truncated else []
        return replace(data, examples=[data.examples[i] for i in rows], y=data.y[indices], truncated=sum(cut),
                       was_truncated=cut)
    if isinstance(data, TabularData):
        label_map = None if data.label_map is None else dict(data.label_map)
        return replace(data, x=data.x[indices], y=data.y[indices], label_map=label_map)
    rows = indices.tolist()
    cut = [data.was_truncated[i] for i in rows] if data.was_truncated else []
    inexact = [data.inexact_join[i] for i in rows] if data.inexact_join else []
    return TextData([data.examples[i] for i in rows], sum(cut), data.source, cut, inexact)


def split(data: TabularData | TextData, val_split: float, seed: int):
    """(train, val): a random ``val_split`` fraction held out, deterministic by ``seed``.

    Both parts keep file order. A split that leaves either part empty is a DataError.
    """
    if not 0 < val_split < 1:
        raise ValueError(f"split: val_split must be in (0, 1), got {val_split}")
    n = len(data)
    n_val = int(n * val_split + 0.5)
    if n_val == 0 or n_val == n:
        fix = ("add rows: a validation split needs at least 2" if n < 2 else
               f"use a val_split of at least {1 / n:.3g}, or add rows" if n_val == 0 else
               f"use a val_split of at most {1 - 1 / n:.3g}, or add rows")
        raise DataError(f"dataset too small for val_split={val_split}: {n} rows give "
                        f"{n - n_val} training and {n_val} validation rows",
                        where=data.source, fix=fix)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return _subset(data, perm[n_val:].sort().values), _subset(data, perm[:n_val].sort().values)


def num_batches(n: int, batch_size: int, drop_last: bool = False) -> int:
    """Batches per epoch over ``n`` examples."""
    if batch_size < 1:
        raise ValueError(f"num_batches: batch_size must be >= 1, got {batch_size}")
    return n // batch_size if drop_last else -(-n // batch_size)


def epoch_order(n: int, *, seed: int, epoch: int, shuffle: bool = True) -> Tensor:
    """A permutation of ``range(n)`` (int64) that depends only on ``(seed, epoch)``."""
    if not shuffle:
        return torch.arange(n)
    digest = hashlib.sha256(f"lora-cli/epoch/{seed}/{epoch}".encode()).digest()
    generator = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)
    return torch.randperm(n, generator=generator)


def lengths(data) -> list[int] | None:
    """Each example's padded width in a batch (tokens, or a packed row's filled
    positions); None for tables, whose rows all have one width."""
    if isinstance(data, PackedTextData):
        return [data.row_length(j) for j in range(len(data))]
    if isinstance(data, TextData):
        return [len(ids) for ids, _ in data.examples]
    if isinstance(data, TextClassData):
        return [len(ids) for ids in data.examples]
    return None


def by_length(data) -> Tensor:
    """``range(len(data))`` longest first (stable): batches of held-out data cut from it pad little."""
    sizes = lengths(data)
    if sizes is None:
        return torch.arange(len(data))
    return torch.tensor(sorted(range(len(sizes)), key=lambda i: -sizes[i]), dtype=torch.int64)


def length_grouped_order(sizes: list[int], *, seed: int, epoch: int, group: int, window: int = 50) -> Tensor:
    """An epoch order whose consecutive ``group``s (one micro-batch on every worker) hold
    examples of similar length: :func:`epoch_order`, each span of ``window`` groups sorted
    longest first and cut into groups, then the groups shuffled. It depends only on
    ``(seed, epoch)`` and the lengths, so a resumed run regenerates it exactly."""
    order = epoch_order(len(sizes), seed=seed, epoch=epoch).tolist()
    span = max(1, group * window)
    groups = []
    for start in range(0, len(order), span):
        part = sorted(order[start:start + span], key=lambda i: -sizes[i])
        groups += [part[g:g + group] for g in range(0, len(part), group)]
    shuffled = epoch_order(len(groups), seed=seed + 1, epoch=epoch).tolist()
    return torch.tensor([i for g in shuffled for i in groups[g]], dtype=torch.int64)


def tabular_batch(data: TabularData, indices: Tensor) -> tuple[Tensor, Tensor]:
    """(x (B, F), y (B,)) for the rows at ``indices``."""
    indices = torch.as_tensor(indices, dtype=torch.int64)
    return data.x[indices], data.y[indices]


def text_batch(data: TextData, indices: Tensor, pad_id: int) -> tuple[Tensor, Tensor]:
    """(input_ids (B, T), labels (B, T)), int64, for next-token prediction.

    Row b is ``ids[:-1]`` as input and ``ids[1:]`` as labels, right-padded with
    ``pad_id`` to T = the longest example in the batch minus one. A label is
    IGNORE_INDEX where the predicted token's mask is 0 (prompt) and at padding.
    """
    rows = [data.examples[i] for i in torch.as_tensor(indices).tolist()]
    width = max((len(ids) - 1 for ids, _ in rows), default=0)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.int64)  # (B, T)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.int64)  # (B, T)
    for b, (ids, mask) in enumerate(rows):
        n = len(ids) - 1
        input_ids[b, :n] = torch.tensor(ids[:-1], dtype=torch.int64)  # (n,)
        target = torch.tensor(ids[1:], dtype=torch.int64)  # (n,)
        keep = torch.tensor(mask[1:], dtype=torch.bool)  # (n,)
        labels[b, :n] = torch.where(keep, target, IGNORE_INDEX)
    return input_ids, labels


def boundaries(ids: list[int], mask: list[int], width: int = 4) -> dict[str, list[int]]:
    """The token ids where one example starts, where its trained part starts (the
    prompt's last ``width`` ids and the completion's first), and where it ends: what the
    dry run shows to check BOS, the prompt/completion join and EOS."""
    first = next((i for i, m in enumerate(mask) if m), 0)
    out = {"start": ids[:width]}
    if first > 0:
        out["prompt_end"], out["completion_start"] = ids[max(0, first - width):first], ids[first:first + width]
    out["end"] = ids[-width:]
    return out


def describe(data: TabularData | TextData | TextClassData) -> dict:
    """A few summary numbers for display."""
    if isinstance(data, PackedTextData):
        filled = sum(data.row_length(j) for j in range(len(data)))
        return {**describe(data.data), "packed_rows": len(data), "packed_fill": round(filled / (len(data) * data.width), 3)}
    if isinstance(data, TextClassData):
        return {"examples": len(data), "classes": len(data.label_map),
                "tokens": sum(len(ids) for ids in data.examples), "truncated": data.truncated}
    if isinstance(data, TabularData):
        summary = {"rows": len(data), "features": len(data.features)}
        if data.label_map is not None:
            summary["classes"] = len(data.label_map)
        return summary
    return {
        "examples": len(data),
        "tokens": data.num_tokens,
        "target_tokens": sum(sum(mask) for _, mask in data.examples),
        "max_len": max((len(ids) for ids, _ in data.examples), default=0),
        "truncated": data.truncated,
    }
