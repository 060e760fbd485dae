"""Packing: several causal LM examples in one sequence, each attending only to itself.

    examples (ids, mask) of n_i + 1 tokens -> n_i (input, label) pairs each
    rows: examples placed best-fit, longest first, into rows of ``width`` positions
    a row: input_ids    e1[:-1] e2[:-1] ... pad            (width or less)
           labels       e1[1:]  e2[1:]  ... -100           (-100 where mask is 0, as unpacked)
           position_ids 0..n1-1 0..n2-1 ... 0..k-1          (restart at every example)

A new example starts wherever a position is not one more than the one before it; the
model keeps attention inside each example from that (the built-in ``gpt`` builds a
block-diagonal causal mask from ``position_ids``; Hugging Face models given
``position_ids`` and no attention mask do the same, see the README). Every token is
predicted from the same context, at the same position, with the same label as
unpacked, so the summed loss and its gradient are those of the examples unpacked.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass

import torch
from torch import Tensor

from .text import TextData

IGNORE_INDEX = -100


@dataclass
class PackedTextData:
    """``data``'s examples packed into rows: ``rows[j]`` lists the examples of row j."""

    data: TextData
    rows: list[list[int]]
    width: int

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def num_tokens(self) -> int:
        return self.data.num_tokens

    @property
    def truncated(self) -> int:
        return self.data.truncated

    @property
    def inexact_joins(self) -> int:
        return self.data.inexact_joins

    @property
    def source(self) -> str:
        return self.data.source

    def row_length(self, j: int) -> int:
        """Input positions that row j fills (the rest is padding)."""
        return sum(len(self.data.examples[i][0]) - 1 for i in self.rows[j])


def pack(data: TextData, width: int) -> PackedTextData:
    """Place each example (``len(ids) - 1`` input positions) into the fullest row it still
    fits, longest examples first (best-fit decreasing); deterministic, ties by file order."""
    if width < 1:
        raise ValueError(f"pack: width must be >= 1, got {width}")
    sizes = [len(ids) - 1 for ids, _ in data.examples]
    if max(sizes, default=0) > width:
        raise ValueError(f"pack: an example of {max(sizes)} positions is wider than {width}")
    rows: list[list[int]] = []
    free: list[tuple[int, int]] = []             # (room left, row), sorted
    for i in sorted(range(len(sizes)), key=lambda i: (-sizes[i], i)):
        at = bisect.bisect_left(free, (sizes[i], -1))
        if at < len(free):
            room, j = free.pop(at)
        else:
            room, j = width, len(rows)
            rows.append([])
        rows[j].append(i)
        if room - sizes[i] > 0:
            bisect.insort(free, (room - sizes[i], j))
    for row in rows:
        row.sort()                                 # file order inside a row
    return PackedTextData(data, rows, width)


def packed_batch(data: PackedTextData, indices: Tensor, pad_id: int) -> tuple[dict[str, Tensor], Tensor]:
    """({"input_ids" (B, T), "position_ids" (B, T)}, labels (B, T)) for the rows at
    ``indices``, right-padded to the fullest of them (padding: ``pad_id``, label -100,
    positions 0, 1, ... of a segment of its own)."""
    rows = [data.rows[j] for j in torch.as_tensor(indices).tolist()]
    width = max((sum(len(data.data.examples[i][0]) - 1 for i in row) for row in rows), default=0)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.int64)        # (B, T)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.int64)     # (B, T)
    positions = torch.arange(width, dtype=torch.int64).repeat(len(rows), 1)      # (B, T)
    for b, row in enumerate(rows):
        at = 0
        for i in row:
            ids, mask = data.data.examples[i]
            n = len(ids) - 1
            input_ids[b, at:at + n] = torch.tensor(ids[:-1], dtype=torch.int64)
            target = torch.tensor(ids[1:], dtype=torch.int64)
            labels[b, at:at + n] = torch.where(torch.tensor(mask[1:], dtype=torch.bool), target, IGNORE_INDEX)
            positions[b, at:at + n] = torch.arange(n)
            at += n
        positions[b, at:] = torch.arange(width - at)
    return {"input_ids": input_ids, "position_ids": positions}, labels
