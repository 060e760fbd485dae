"""Datasets for the three tasks, loaded and validated at the edge.

    read      UTF-8 text, JSONL objects and CSV rows, with file:line errors
    tabular   regression and classification tables (.csv, .jsonl)
    labels    class labels, numbered
    text      token sequences for causal_lm (.txt, .jsonl records), labelled texts
    batches   splits, seeded epoch orders (optionally grouped by length), padded batches
    packing   several causal_lm examples per sequence, attention kept inside each

Every user mistake is a :class:`~lora_cli.errors.DataError` whose ``where`` is
``file:line``. Errors about the whole file (missing, unreadable, wrong extension, too few
classes) name the file only.
"""

from .batches import (
                      IGNORE_INDEX,
                      boundaries,
                      by_length,
                      describe,
                      epoch_order,
                      length_grouped_order,
                      lengths,
                      num_batches,
                      split,
                      tabular_batch,
                      text_batch,
                      text_class_batch,
)
from .tabular import TABULAR_TASKS, TabularData, load_tabular
from .text import INSTRUCTION_TEMPLATE, TextClassData, TextData, load_text, load_text_classification, with_bos

__all__ = ["IGNORE_INDEX", "INSTRUCTION_TEMPLATE", "TABULAR_TASKS", "TabularData", "TextClassData", "TextData",
           "boundaries", "by_length", "describe", "epoch_order", "length_grouped_order", "lengths", "load_tabular", "load_text", "load_text_classification",
           "num_batches", "split", "tabular_batch", "text_batch", "text_class_batch", "with_bos"]
