"""Text data: token sequences for ``causal_lm``, and labelled texts for classification
with a Hugging Face model.

A ``.txt`` file is cut into windows; a ``.jsonl`` file holds ``{"text": ...}``,
``{"prompt": ..., "completion": ...}``, ``{"instruction", "input", "output"}`` or
``{"messages": [...]}`` records, tokenized with the tokenizer passed in (its ``encode``,
``encode_pair``, ``bos_ids``, ``eos_id`` and ``pad_id``; see
:mod:`lora_cli.models.tokenizers`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import Tensor

from ..errors import DataError
from .labels import class_ids, known_label
from .read import check_suffix, jsonl_objects, read_text, show, suggest


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


def _text_value(obj: dict, key: str, where: str) -> str:
    value = obj[key]
    if not isinstance(value, str):
        raise DataError(f"{key!r} must be a string, got {show(value)}", where=where,
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
    with an assistant turn (rendered with the tokenizer's chat template when it has one; with
    several assistant turns, :func:`_example` trains on each, see :func:`_turns`).
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
        hint = next((s for k in expected if (s := suggest(k, others))), "")
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


def render_history(history: list[dict], tokenizer) -> str:
    """The conversation ``history`` as the prompt of the assistant's next turn: the
    tokenizer's chat template where it has one, else the plain ``role: text`` layout
    training uses."""
    render = getattr(tokenizer, "render_chat", None)
    if render is not None:
        return render([*history, {"role": "assistant", "content": ""}])[0]
    return "".join(f"{m['role']}: {m['content']}\n" for m in history) + "assistant: "


def with_bos(tokenizer, ids: list[int]) -> list[int]:
    """``ids`` led by the tokenizer's beginning-of-sequence tokens (``bos_ids``, often
    none), unless the text already began with them (a chat template that writes BOS)."""
    bos = list(getattr(tokenizer, "bos_ids", ()))
    return ids if not bos or ids[:len(bos)] == bos else bos + ids


def _turns(messages: list[dict], tokenizer) -> list[tuple[str, bool]] | None:
    """A conversation with several assistant turns as (text, trained) segments: every
    assistant message's content is trained, the turns of the system and the user and the
    template's markup are not. Each turn's prompt is the conversation before it rendered
    as generation renders it (:func:`render_history`). None for a single assistant turn
    (the prompt/answer path), or when a chat template renders earlier turns differently
    once later ones follow (then only the last turn is trained, as the prompt/answer path
    does)."""
    turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    if len(turns) < 2:
        return None
    segments, done = [], ""
    for i in turns:
        prefix = render_history(messages[:i], tokenizer)
        if not prefix.startswith(done):
            return None
        segments += [(prefix[len(done):], False), (messages[i]["content"], True)]
        done = prefix + messages[i]["content"]
    return segments


def _encode_turns(segments: list[tuple[str, bool]], tokenizer, train_on_prompt: bool) -> tuple[list[int], list[int], bool]:
    """(ids, mask, exact) of :func:`_turns`' segments, each tokenized as it follows the
    text before it (exact: the tokens of the text so far never changed), BOS first and
    eos after the last answer."""
    ids: list[int] = []
    mask: list[int] = []
    text, exact = "", True
    for piece, trained in segments:
        joint = list(tokenizer.encode(text + piece))
        if joint[:len(ids)] == ids:
            new = joint[len(ids):]
        else:
            new, exact = list(tokenizer.encode(piece)), False
        ids += new
        mask += [int(trained or train_on_prompt)] * len(new)
        text += piece
    bos = with_bos(tokenizer, ids)[:len(with_bos(tokenizer, ids)) - len(ids)]
    return bos + ids + [tokenizer.eos_id], [int(train_on_prompt)] * len(bos) + mask + [1], exact


def _example(obj: dict, text_field: str, tokenizer, where: str,
             train_on_prompt: bool = False) -> tuple[list[int], list[int], bool]:
    """(ids, mask, exact join) for one JSONL object, before truncation: the answer (and
    eos) are targets, the prompt is not unless ``train_on_prompt``; the sequence starts
    with the tokenizer's BOS where it has one."""
    prompt, answer = _render(obj, text_field, tokenizer, where)
    exact = True
    segments = _turns(obj["messages"], tokenizer) if "messages" in obj else None
    if segments is not None:
        ids, mask, exact = _encode_turns(segments, tokenizer, train_on_prompt)
    elif answer is None:
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
    suffix = check_suffix(path, (".txt", ".jsonl"), "causal_lm")
    text = read_text(path)
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
        for line, obj in jsonl_objects(text, file):
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
    """Texts with class labels (classification with a Hugging Face model). ``truncated``
    counts the texts cut to ``max_seq_len``, ``was_truncated`` says which, so the count
    stays right after :func:`~lora_cli.data.batches.split`."""

    examples: list[list[int]]                 # token ids per text
    y: Tensor                                 # (N,) int64 class ids
    label_map: dict[str, int]
    target: str
    truncated: int = 0
    source: str = ""
    was_truncated: list[bool] = field(default_factory=list, repr=False)

    def __len__(self) -> int:
        return len(self.examples)


def load_text_classification(path, *, tokenizer, text_field: str = "text", target: str = "label",
                             max_seq_len: int = 256, label_map: dict[str, int] | None = None) -> TextClassData:
    """Load ``{text_field: ..., target: label}`` JSONL records; texts longer than
    ``max_seq_len`` tokens keep their beginning and are counted in ``truncated``."""
    file = str(path)
    check_suffix(path, (".jsonl",), "classification with a text model")
    examples, labels, cut = [], [], []
    for line, obj in jsonl_objects(read_text(path), file):
        where = f"{file}:{line}"
        for key in (text_field, target):
            if key not in obj:
                raise DataError(f"object lacks {key!r}{suggest(key, list(obj))}; it has {list(obj)}",
                                where=where, fix=f"give every line {text_field!r} and {target!r}")
        ids = list(tokenizer.encode(_text_value(obj, text_field, where)))
        if not ids:
            raise DataError(f"{text_field!r} is empty", where=where, fix="remove this line")
        ids = with_bos(tokenizer, ids)
        cut.append(len(ids) > max_seq_len)
        examples.append(ids[:max_seq_len])
        labels.append(known_label(obj[target], target, where, label_map))
    if not examples:
        raise DataError("file has no examples", where=f"{file}:1",
                        fix=f'write one {{"{text_field}": ..., "{target}": ...}} object per line')
    y, label_map = class_ids(labels, label_map, target, file)
    return TextClassData(examples, y, label_map, target, sum(cut), file, cut)
