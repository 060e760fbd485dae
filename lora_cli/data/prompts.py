"""Prompts to generate from, and their reference answers, in the training data's formats.

A prompts file is JSONL; each line is one of the record formats training reads
(:mod:`.text`), the answer optional:

    {"prompt": ..., "completion"?: ...}
    {"instruction": ..., "input"?: ..., "output"?: ...}     rendered as training renders it
    {"messages": [...]}                                     ending with the user's turn, or
                                                            with the assistant's (the answer)
    {"text": ...}                                           the text is the prompt

so a held-out file of the training data is a prompts file, and a prompt is rendered
exactly as training rendered it.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import DataError
from .read import check_suffix, jsonl_objects, read_text, show
from .text import INSTRUCTION_TEMPLATE, render_history


@dataclass(frozen=True)
class PromptRecord:
    """A prompt as the model sees it, and the answer the data gives for it (or None)."""

    prompt: str
    answer: str | None = None


def _string(obj: dict, key: str, where: str) -> str:
    value = obj[key]
    if not isinstance(value, str):
        raise DataError(f"{key!r} must be a string, got {show(value)}", where=where, fix=f'write "{key}" as a JSON string')
    return value


def instruction_prompt(instruction: str, extra: str = "") -> str:
    """The ``### Instruction:`` prompt training builds from an instruction (and input)."""
    head, with_input, tail = INSTRUCTION_TEMPLATE
    return head.format(instruction=instruction) + (with_input.format(input=extra) if extra.strip() else "") + tail


def prompt_record(obj: dict, tokenizer, where: str, text_field: str = "text") -> PromptRecord:
    """The prompt (and answer) of one JSONL object."""
    if "prompt" in obj:
        answer = _string(obj, "completion", where) if "completion" in obj else None
        return PromptRecord(_string(obj, "prompt", where), answer)
    if "instruction" in obj:
        extra = _string(obj, "input", where) if "input" in obj else ""
        answer = _string(obj, "output", where) if "output" in obj else None
        return PromptRecord(instruction_prompt(_string(obj, "instruction", where), extra), answer)
    if "messages" in obj:
        messages = obj["messages"]
        if not isinstance(messages, list) or not messages or not all(
                isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                for m in messages):
            raise DataError("'messages' must be a non-empty list of {\"role\": ..., \"content\": ...} objects",
                            where=where, fix='write "messages": [{"role": "user", "content": "..."}, ...]')
        answer = messages[-1]["content"] if messages[-1]["role"] == "assistant" else None
        history = messages[:-1] if answer is not None else messages
        return PromptRecord(render_history(history, tokenizer), answer)
    if text_field in obj:
        return PromptRecord(_string(obj, text_field, where))
    raise DataError(f"object has keys {list(obj)}; expected 'prompt', 'instruction', 'messages' or {text_field!r}",
                    where=where, fix='write one {"prompt": ...} object per line')


def read_prompts(path, tokenizer, *, text_field: str = "text") -> list[PromptRecord]:
    """Every prompt of a JSONL file (see the module docstring)."""
    file = str(path)
    check_suffix(path, (".jsonl",), "prompts")
    records = [prompt_record(obj, tokenizer, f"{file}:{line}", text_field)
               for line, obj in jsonl_objects(read_text(path), file)]
    if not records:
        raise DataError("file has no prompts", where=f"{file}:1", fix='write one {"prompt": ...} object per line')
    return records


def chat_prompt(text: str, tokenizer, data_format: str | None) -> str:
    """A user's message ``text`` as a prompt: through the tokenizer's chat template when
    it has one, else in the form the training data used (``data_format``: 'instruction',
    'messages' or None for prompts used as they are)."""
    if getattr(getattr(tokenizer, "tok", None), "chat_template", None) or data_format == "messages":
        return render_history([{"role": "user", "content": text}], tokenizer)
    if data_format == "instruction":
        return instruction_prompt(text)
    return text


def data_format(path) -> str | None:
    """The record format of a JSONL training file's first line: 'instruction',
    'messages', 'prompt', 'text', or None when it cannot be read."""
    try:
        for _, obj in jsonl_objects(read_text(path), str(path)):
            return next((k if k != "prompt" else "prompt" for k in ("instruction", "messages", "prompt") if k in obj),
                        "text")
    except (DataError, OSError):
        return None
    return None
