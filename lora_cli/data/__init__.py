"""Datasets for the three tasks, loaded and validated at the edge.

Tabular (``regression``, ``classification``): a ``.csv`` file with a header row, or a
``.jsonl`` file with one JSON object per line. Every value is checked once, here, so
the training loop never meets a bad row. Text (``causal_lm``): a ``.txt`` file cut
into windows, or a ``.jsonl`` file of ``{"text": ...}`` or ``{"prompt": ...,
"completion": ...}`` objects, tokenized with whatever tokenizer is passed in (only its
``encode(text)``, ``eos_id`` and ``pad_id`` are used).

Every user mistake is a :class:`DataError` whose ``where`` is ``file:line``, with the
line numbered as a text editor shows it (a CSV header is line 1). Errors about the
whole file (missing, unreadable, wrong extension, too few classes) name the file only.

Batches are drawn by index: :func:`epoch_order` gives the permutation for one epoch
from ``(seed, epoch)`` alone, so a resumed run regenerates the exact order and skips the
batches it already did.
"""

from __future__ import annotations

import codecs
import csv
import hashlib
import io
import itertools
import json
import math
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Iterator

import torch
from torch import Tensor

from lora_cli.errors import DataError, closest

IGNORE_INDEX = -100
"""Label value for positions that carry no loss (prompt tokens and padding)."""

TABULAR_TASKS = ("regression", "classification")
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


@dataclass
class TextData:
    """Token sequences for next-token prediction.

    Each example is ``(ids, mask)`` of the same length; ``mask[i]`` is 1 where token
    ``i`` is a prediction target (0 on prompt tokens). ``truncated`` counts examples cut
    to ``max_seq_len``; such an example keeps its beginning, so a prompt/completion
    example whose completion was cut off entirely is kept with an all-zero mask (it
    adds no loss) and is counted here. ``was_truncated`` holds the same per example, so
    the count stays right after :func:`split`; ``inexact_join`` marks the examples whose
    prompt and completion the tokenizer could not separate exactly (see
    ``HFTokenizer.encode_pair``).
    """

    examples: list[tuple[list[int], list[int]]]
    truncated: int = 0
    source: str = ""
    was_truncated: list[bool] = field(default_factory=list, repr=False)
    inexact_join: list[bool] = field(default_factory=list, repr=False)

    @property
    def inexact_joins(self) -> int:
        return sum(self.inexact_join)

    def __len__(self) -> int:
        return len(self.examples)

    @property
    def num_tokens(self) -> int:
        """Total tokens over all examples."""
        return sum(len(ids) for ids, _ in self.examples)


# ----------------------------------------------------------------------------- reading


def _show(value, limit: int = 40) -> str:
    """A value quoted for an error message, cut to ``limit`` characters."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _suggest(name: str, choices) -> str:
    """A " (did you mean 'x'?)" hint when a choice is close (case is ignored)."""
    close = closest(name, choices)
    return f" (did you mean {close!r}?)" if close else ""


def _check_suffix(path, allowed: tuple[str, ...], task: str) -> str:
    suffix = Path(path).suffix.lower()
    if suffix not in allowed:
        kinds = {".csv": ".csv (a header row, then one row per example)",
                 ".jsonl": ".jsonl (one JSON object per line)",
                 ".txt": ".txt (plain text)"}
        raise DataError(
            f"unsupported file type {suffix or '(no extension)'!r} for task {task!r}",
            where=str(path),
            fix="use " + " or ".join(kinds[s] for s in allowed),
        )
    return suffix


def _read(path) -> str:
    """The file's text (UTF-8, an optional byte-order mark dropped)."""
    file = str(path)
    try:
        if Path(path).exists() and not Path(path).is_file() and not Path(path).is_dir():
            raise DataError("not a regular file (a pipe or a device, whose reading may never end)", where=file,
                            fix="point to the data file itself")
        raw = Path(path).read_bytes()
    except FileNotFoundError:
        raise DataError("file not found", where=file,
                        fix=f"check the path (relative paths start from {os.getcwd()})") from None
    except OSError as err:
        raise DataError(f"cannot read file: {err.strerror or err}", where=file,
                        fix="check that it is a readable file, not a folder") from None
    if raw.startswith(codecs.BOM_UTF8):
        raw = raw[len(codecs.BOM_UTF8):]
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        line = raw[: err.start].count(b"\n") + 1
        raise DataError("not UTF-8 text", where=f"{file}:{line}",
                        fix="save the file with UTF-8 encoding") from None


def _jsonl_objects(text: str, file: str) -> Iterator[tuple[int, dict]]:
    """(line number, object) for every non-blank line of a JSONL file."""
    for line_no, line in enumerate(io.StringIO(text, newline=""), start=1):
        if not line.strip():
            continue
        where = f"{file}:{line_no}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(f"not valid JSON: {err.msg} (column {err.colno})", where=where,
                            fix="write one complete JSON object per line") from None
        except (ValueError, RecursionError) as err:  # over-long integers, deep nesting
            raise DataError(f"not usable JSON: {_show(str(err), 80)}", where=where,
                            fix="write one flat JSON object per line") from None
        if not isinstance(obj, dict):
            raise DataError(f"expected a JSON object {{...}}, got {_show(obj)}",
                            where=where, fix='write one object per line, e.g. {"x": 1, "y": 2}')
        yield line_no, obj


def _csv_rows(text: str, file: str) -> Iterator[tuple[int, list[str]]]:
    """(first line, fields) for every non-blank CSV row; a quoted cell may span lines."""
    reader = csv.reader(io.StringIO(text, newline=""))
    end = 0  # the last line read so far
    while True:
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error as err:
            raise DataError(f"malformed CSV: {err}", where=f"{file}:{reader.line_num}",
                            fix="check the quoting on this line") from None
        start, end = end + 1, reader.line_num
        if row:
            yield start, row


# ----------------------------------------------------------------------------- tabular


def _table(text: str, suffix: str, file: str) -> tuple[int, list[str], Iterator[tuple[int, dict]]]:
    """(header line, columns, (line, record) pairs) of a CSV or JSONL table.

    CSV columns come from the header row, JSONL columns from the first object.
    """
    if suffix == ".jsonl":
        objects = _jsonl_objects(text, file)
        line, first = next(objects, (1, None))
        if first is None:
            raise DataError("file has no rows", where=f"{file}:1",
                            fix="write one JSON object per line")
        return line, list(first), itertools.chain([(line, first)], objects)
    rows = _csv_rows(text, file)
    line, header = next(rows, (1, None))
    if header is None:
        raise DataError("file is empty", where=f"{file}:1",
                        fix="put a header row (column names) first, then one row per example")
    columns = [name.strip() for name in header]
    for i, name in enumerate(columns):
        if name in columns[:i]:
            raise DataError(f"column {name!r} appears twice in the header",
                            where=f"{file}:{line}", fix="give every column a unique name")

    def record(row_line: int, row: list[str]) -> dict:
        if len(row) != len(columns):
            raise DataError(f"row has {len(row)} fields, header has {len(columns)}",
                            where=f"{file}:{row_line}", fix="give every row one value per "
                            "header column (quote values that contain commas)")
        return dict(zip(columns, row))

    return line, columns, ((n, record(n, row)) for n, row in rows)


def _number(value, column: str, where: str) -> float:
    """A finite float32-sized number from a CSV cell or a JSON value."""
    if isinstance(value, str) and not value.strip():
        raise DataError(f"column {column!r} is empty", where=where,
                        fix="fill in a number or remove the row")
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise DataError(f"column {column!r}: expected a number, got {_show(value)}",
                        where=where, fix="write a plain number such as 1.5")
    try:
        number = float(value)
    except ValueError:
        raise DataError(f"column {column!r}: {_show(value)} is not a number", where=where,
                        fix="write a plain number such as 1.5 (encode categories as numbers)"
                        ) from None
    except OverflowError:  # a JSON integer beyond float range
        number = math.inf
    if not math.isfinite(number) or abs(number) > _F32_MAX:
        raise DataError(f"column {column!r}: {_show(value)} is not a finite float32 number",
                        where=where, fix="remove or fill in rows with NaN, inf or huge values")
    return number


def _label(value, column: str, where: str) -> str:
    """Class label text: a non-empty string (stripped) or an integer."""
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    if isinstance(value, str) and value.strip():
        return value.strip()
    raise DataError(f"column {column!r}: {_show(value)} is not a class label", where=where,
                    fix="write each label as a non-empty string or an integer")


def _label_key(label: str):
    try:
        number = float(label)
    except ValueError:
        number = math.nan
    return (0, number, label) if math.isfinite(number) else (1, 0.0, label)


def _known_label(value, column: str, where: str, label_map: dict[str, int] | None) -> str:
    """The label text of one row; with a ``label_map`` (eval data) it must be a known one."""
    label = _label(value, column, where)
    if label_map is not None and label not in label_map:
        known = sorted(label_map, key=_label_key)
        shown = known if len(known) <= 20 else known[:20] + ["..."]
        raise DataError(f"label {label!r} was not in the training data; known labels: {shown}", where=where,
                        fix="add examples of this label to the training data, or remove this row")
    return label


def _class_ids(labels: list[str], label_map: dict[str, int] | None, column: str,
               file: str) -> tuple[Tensor, dict[str, int]]:
    """(class ids (N,), label map); the map is built from ``labels`` when not given."""
    if label_map is None:
        label_map = {lab: i for i, lab in enumerate(sorted(set(labels), key=_label_key))}
        if len(label_map) < 2:
            raise DataError(f"classification needs at least 2 distinct labels in {column!r}, "
                            f"found {list(label_map)}", where=file,
                            fix="add examples of other classes, or use task: regression")
    return torch.tensor([label_map[lab] for lab in labels], dtype=torch.int64), dict(label_map)


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
    suffix = _check_suffix(path, (".csv", ".jsonl"), task)
    header_line, columns, records = _table(_read(path), suffix, file)
    where = f"{file}:{header_line}"
    features = [c for c in columns if c != target] if features is None else list(dict.fromkeys(features))
    for kind, name in [("target", target), *(("feature", f) for f in features)]:
        if name not in columns:
            raise DataError(f"{kind} column {name!r} not found{_suggest(name, columns)}; "
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
            hint = _suggest(missing[0], [k for k in record if k not in columns])
            raise DataError(f"object lacks column {missing[0]!r}{hint}; "
                            f"it has {list(record)}", where=where,
                            fix="give every line the same keys")
        xs.append([_number(record[c], c, where) for c in features])
        if not classify:
            ys.append(_number(record[target], target, where))
            continue
        label = _known_label(record[target], target, where, label_map)
        ys.append(label)

    if not xs:
        raise DataError("file has a header but no data rows", where=f"{file}:{header_line}",
                        fix="add one row per example below the header")
    if classify:
        y, label_map = _class_ids(ys, label_map, target, file)
    else:
        y = torch.tensor(ys, dtype=torch.float32)  # (N,)
    x = torch.tensor(xs, dtype=torch.float32)  # (N, F)
    return TabularData(x, y, features, target, label_map, file)


# ----------------------------------------------------------------------------- text


def _text_value(obj: dict, key: str, where: str) -> str:
    value = obj[key]
    if not isinstance(value, str):
        raise DataError(f"{key!r} must be a string, got {_show(value)}", where=where,
                        fix=f'write "{key}" as a JSON string')
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise DataError(f"{key!r} contains an unpaired surrogate escape", where=where,
                        fix="fix the \\uXXXX escape in this line") from None
    return value


INSTRUCTION_TEMPLATE = ("### Instruction:\n{instruction}\n\n", "### Input:\n{input}\n\n", "### Response:\n")
"""How an ``instruction``/``input``/``output`` record becomes a prompt (the input part
only when the record has a non-empty input); the answer is the output."""


def _render(obj: dict, text_field: str, tokenizer, where: str) -> tuple[str, str | None]:
    """(prompt, answer) of one JSONL record; answer None for a plain text record.

    Records: ``{text_field: ...}``; ``{"prompt", "completion"}``; ``{"instruction",
    "input" (optional), "output"}``; ``{"messages": [{"role", "content"}, ...]}`` ending
    with an assistant turn (rendered with the tokenizer's chat template when it has one).
    """
    formats = [name for name, keys in (("text", (text_field,)), ("prompt/completion", ("prompt", "completion")),
                                       ("instruction/output", ("instruction", "output")),
                                       ("messages", ("messages",))) if all(k in obj for k in keys)]
    if len(formats) > 1:
        raise DataError(f"object mixes the {' and '.join(formats)} formats", where=where,
                        fix="use one format per line")
    if not formats:
        keys, expected = list(obj), (text_field, "prompt", "completion", "instruction", "output", "messages")
        others = [k for k in keys if k not in expected]
        hint = next((s for k in expected if (s := _suggest(k, others))), "")
        raise DataError(f"object has keys {keys}{hint}; expected {text_field!r}, 'prompt' and 'completion', "
                        "'instruction' and 'output', or 'messages'", where=where,
                        fix=f'write {{"{text_field}": ...}} or {{"prompt": ..., "completion": ...}}'
                            " (or set data.text_field)")
    kind = formats[0]
    if kind == "text":
        text = _text_value(obj, text_field, where)
        if not text.strip():
            raise DataError(f"{text_field!r} is empty", where=where, fix="remove this line")
        return text, None
    if kind == "prompt/completion":
        prompt, answer, answer_key = _text_value(obj, "prompt", where), _text_value(obj, "completion", where), \
            "completion"
    elif kind == "instruction/output":
        head, with_input, tail = INSTRUCTION_TEMPLATE
        extra = _text_value(obj, "input", where) if "input" in obj else ""
        prompt = head.format(instruction=_text_value(obj, "instruction", where)) + \
            (with_input.format(input=extra) if extra.strip() else "") + tail
        answer, answer_key = _text_value(obj, "output", where), "output"
    else:
        prompt, answer = _render_messages(obj["messages"], tokenizer, where)
        answer_key = "the last assistant message"
    if not answer.strip():
        raise DataError(f"{answer_key!r} is empty" if answer_key[0] != "t" else f"{answer_key} is empty",
                        where=where, fix="give every example a non-empty answer")
    return prompt, answer


def _render_messages(messages, tokenizer, where: str) -> tuple[str, str]:
    if not isinstance(messages, list) or not messages or not all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in messages):
        raise DataError("'messages' must be a non-empty list of {\"role\": ..., \"content\": ...} objects",
                        where=where, fix='write "messages": [{"role": "user", "content": "..."}, ...]')
    if messages[-1]["role"] != "assistant":
        raise DataError(f"the last message is from {messages[-1]['role']!r}, not the assistant",
                        where=where, fix="end each conversation with the assistant's answer to train on")
    render = getattr(tokenizer, "render_chat", None)
    if render is not None:
        return render(messages)
    history = "".join(f"{m['role']}: {m['content']}\n" for m in messages[:-1])
    return history + "assistant: ", messages[-1]["content"]


def with_bos(tokenizer, ids: list[int]) -> list[int]:
    """``ids`` led by the tokenizer's beginning-of-sequence tokens (``bos_ids``, often
    none), unless the text already began with them (a chat template that writes BOS)."""
    bos = list(getattr(tokenizer, "bos_ids", ()))
    return ids if not bos or ids[:len(bos)] == bos else bos + ids


def _example(obj: dict, text_field: str, tokenizer, where: str,
             train_on_prompt: bool = False) -> tuple[list[int], list[int], bool]:
    """(ids, mask, exact join) for one JSONL object, before truncation: the answer (and
    eos) are targets, the prompt is not unless ``train_on_prompt``; the sequence starts
    with the tokenizer's BOS where it has one."""
    prompt, answer = _render(obj, text_field, tokenizer, where)
    exact = True
    if answer is None:
        ids = with_bos(tokenizer, list(tokenizer.encode(prompt))) + [tokenizer.eos_id]
        mask = [1] * len(ids)
    else:
        prompt_ids, target_ids, exact = tokenizer.encode_pair(prompt, answer)
        prompt_ids = with_bos(tokenizer, list(prompt_ids))
        target_ids = list(target_ids) + [tokenizer.eos_id]
        ids = prompt_ids + target_ids
        mask = [int(train_on_prompt)] * len(prompt_ids) + [1] * len(target_ids)
    if len(ids) < 2:
        raise DataError("text encodes to fewer than 2 tokens", where=where,
                        fix="remove this line or make the text longer")
    return ids, mask, exact


def load_text(path, *, tokenizer, text_field: str = "text", max_seq_len: int = 256,
              train_on_prompt: bool = False) -> TextData:
    """Load a ``.txt`` or ``.jsonl`` file for ``causal_lm``.

    ``.txt``: the whole file is tokenized (no eos) and cut into consecutive windows of
    ``max_seq_len`` tokens, every token a target; a last window under 2 tokens is
    dropped. ``.jsonl``: ``{text_field: ...}`` trains on every token plus an appended
    eos; ``{"prompt": ..., "completion": ...}`` gives ``encode(prompt) + completion
    tokens + [eos]`` (no separator added; the completion tokenized as it follows the
    prompt, see ``encode_pair``) with the loss mask 0 on the prompt. Every sequence
    starts with the tokenizer's BOS tokens, if it has any. Longer examples keep their
    first ``max_seq_len`` tokens and are counted in ``truncated``.
    """
    if max_seq_len < 2:
        raise ValueError(f"load_text: max_seq_len must be >= 2, got {max_seq_len}")
    file = str(path)
    suffix = _check_suffix(path, (".txt", ".jsonl"), "causal_lm")
    text = _read(path)
    examples: list[tuple[list[int], list[int]]] = []
    cut: list[bool] = []
    inexact: list[bool] = []
    if suffix == ".txt":
        if not text.strip():
            raise DataError("file is empty", where=f"{file}:1", fix="put training text in it")
        ids = list(tokenizer.encode(text))
        bos = list(getattr(tokenizer, "bos_ids", ()))
        step = max_seq_len - len(bos)               # each window starts with BOS, if the tokenizer has one
        for start in range(0, len(ids), step):
            window = bos + ids[start:start + step]
            if len(window) >= 2:
                examples.append((window, [1] * len(window)))
                cut.append(False)
        if not examples:
            raise DataError("text is shorter than 2 tokens", where=f"{file}:1",
                            fix="put more training text in it")
    else:
        for line, obj in _jsonl_objects(text, file):
            ids, mask, exact = _example(obj, text_field, tokenizer, f"{file}:{line}", train_on_prompt)
            cut.append(len(ids) > max_seq_len)
            inexact.append(not exact)
            examples.append((ids[:max_seq_len], mask[:max_seq_len]))
        if not examples:
            raise DataError("file has no examples", where=f"{file}:1",
                            fix=f'write one {{"{text_field}": ...}} object per line')
    return TextData(examples, sum(cut), file, cut, inexact or [False] * len(examples))


@dataclass(eq=False)
class TextClassData:
    """Texts with class labels (classification with a Hugging Face model)."""

    examples: list[list[int]]                 # token ids per text
    y: Tensor                                 # (N,) int64 class ids
    label_map: dict[str, int]
    target: str
    truncated: int = 0
    source: str = ""

    def __len__(self) -> int:
        return len(self.examples)


def load_text_classification(path, *, tokenizer, text_field: str = "text", target: str = "label",
                             max_seq_len: int = 256, label_map: dict[str, int] | None = None) -> TextClassData:
    """Load ``{text_field: ..., target: label}`` JSONL records; texts longer than
    ``max_seq_len`` tokens keep their beginning and are counted in ``truncated``."""
    file = str(path)
    _check_suffix(path, (".jsonl",), "classification with a text model")
    examples, labels, truncated = [], [], 0
    for line, obj in _jsonl_objects(_read(path), file):
        where = f"{file}:{line}"
        for key in (text_field, target):
            if key not in obj:
                raise DataError(f"object lacks {key!r}{_suggest(key, list(obj))}; it has {list(obj)}",
                                where=where, fix=f"give every line {text_field!r} and {target!r}")
        ids = list(tokenizer.encode(_text_value(obj, text_field, where)))
        if not ids:
            raise DataError(f"{text_field!r} is empty", where=where, fix="remove this line")
        ids = with_bos(tokenizer, ids)
        truncated += len(ids) > max_seq_len
        examples.append(ids[:max_seq_len])
        labels.append(_known_label(obj[target], target, where, label_map))
    if not examples:
        raise DataError("file has no examples", where=f"{file}:1",
                        fix=f'write one {{"{text_field}": ..., "{target}": ...}} object per line')
    y, label_map = _class_ids(labels, label_map, target, file)
    return TextClassData(examples, y, label_map, target, truncated, file)


def text_class_batch(data: TextClassData, indices: Tensor, pad_id: int) -> tuple[Tensor, Tensor]:
    """(input_ids (B, T) right-padded with ``pad_id``, class ids (B,))."""
    rows = [data.examples[i] for i in torch.as_tensor(indices).tolist()]
    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.int64)   # (B, T)
    for b, ids in enumerate(rows):
        input_ids[b, :len(ids)] = torch.tensor(ids, dtype=torch.int64)
    return input_ids, data.y[torch.as_tensor(indices, dtype=torch.int64)]


# ----------------------------------------------------------------------------- splits and batches


def _subset(data, indices: Tensor):
    if isinstance(data, TextClassData):
        rows = indices.tolist()
        return replace(data, examples=[data.examples[i] for i in rows], y=data.y[indices])
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
