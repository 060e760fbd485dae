"""Reading data files: UTF-8 text, JSONL objects and CSV rows, each mistake a
:class:`~lora_cli.errors.DataError` at ``file:line`` (numbered as a text editor shows it;
a CSV header is line 1)."""

from __future__ import annotations

import codecs
import csv
import io
import itertools
import json
import os
from pathlib import Path
from typing import Iterator

from ..errors import DataError, closest


def show(value, limit: int = 40) -> str:
    """A value quoted for an error message, cut to ``limit`` characters."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def suggest(name: str, choices) -> str:
    """A " (did you mean 'x'?)" hint when a choice is close (case is ignored)."""
    close = closest(name, choices)
    return f" (did you mean {close!r}?)" if close else ""


def check_suffix(path, allowed: tuple[str, ...], task: str) -> str:
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


def read_text(path) -> str:
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


def jsonl_objects(text: str, file: str) -> Iterator[tuple[int, dict]]:
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
            raise DataError(f"not usable JSON: {show(str(err), 80)}", where=where,
                            fix="write one flat JSON object per line") from None
        if not isinstance(obj, dict):
            raise DataError(f"expected a JSON object {{...}}, got {show(obj)}",
                            where=where, fix='write one object per line, e.g. {"x": 1, "y": 2}')
        yield line_no, obj


def csv_rows(text: str, file: str) -> Iterator[tuple[int, list[str]]]:
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


def table(text: str, suffix: str, file: str) -> tuple[int, list[str], Iterator[tuple[int, dict]]]:
    """(header line, columns, (line, record) pairs) of a CSV or JSONL table.

    CSV columns come from the header row, JSONL columns from the first object.
    """
    if suffix == ".jsonl":
        objects = jsonl_objects(text, file)
        line, first = next(objects, (1, None))
        if first is None:
            raise DataError("file has no rows", where=f"{file}:1",
                            fix="write one JSON object per line")
        return line, list(first), itertools.chain([(line, first)], objects)
    rows = csv_rows(text, file)
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
