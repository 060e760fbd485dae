"""Chat records train on every assistant turn, with the loss masked on system and user turns."""

from __future__ import annotations

import json
from pathlib import Path

from lora_cli.data import load_text, text_batch
from lora_cli.data.batches import IGNORE_INDEX
from lora_cli.models.tokenizers import ByteTokenizer

CONVERSATION = [
    {"role": "system", "content": "be brief"},
    {"role": "user", "content": "2+2?"},
    {"role": "assistant", "content": "4"},
    {"role": "user", "content": "and 3+3?"},
    {"role": "assistant", "content": "six"},
    {"role": "user", "content": "thanks"},
    {"role": "assistant", "content": "you're welcome"},
]


def write(tmp_path: Path, *records) -> Path:
    path = tmp_path / "chat.jsonl"
    path.write_text("".join(json.dumps({"messages": r}) + "\n" for r in records))
    return path


def trained_text(ids: list[int], mask: list[int]) -> list[str]:
    """The runs of consecutive trained tokens, as text (eos shown as <eos>)."""
    runs, current = [], []
    for token, m in zip(ids, mask):
        if m:
            current.append(token)
        elif current:
            runs.append(current)
            current = []
    if current:
        runs.append(current)
    return [bytes(t for t in run if t < 256).decode() + ("<eos>" if run[-1] == 256 else "") for run in runs]


def test_a_three_turn_conversation_trains_exactly_the_assistant_tokens(tmp_path: Path):
    data = load_text(write(tmp_path, CONVERSATION), tokenizer=ByteTokenizer(), max_seq_len=256)
    ids, mask = data.examples[0]
    text = bytes(t for t in ids if t < 256).decode()
    assert text == ("system: be brief\nuser: 2+2?\nassistant: 4\nuser: and 3+3?\nassistant: six\n"
                    "user: thanks\nassistant: you're welcome")
    assert ids[-1] == 256 and data.inexact_joins == 0
    assert trained_text(ids, mask) == ["4", "six", "you're welcome<eos>"]
    assert sum(mask) == len("4") + len("six") + len("you're welcome") + 1
    # the batch's labels: exactly those tokens, each predicted from the one before it
    _, labels = text_batch(data, [0], 256)
    trained = [i + 1 for i, label in enumerate(labels[0].tolist()) if label != IGNORE_INDEX]
    assert trained == [i for i, m in enumerate(mask) if m]


def test_the_last_turn_alone_is_trained_as_before_and_train_on_prompt_trains_all(tmp_path: Path):
    single = CONVERSATION[:3]
    data = load_text(write(tmp_path, single), tokenizer=ByteTokenizer())
    ids, mask = data.examples[0]
    assert trained_text(ids, mask) == ["4<eos>"]
    everything = load_text(write(tmp_path, CONVERSATION), tokenizer=ByteTokenizer(), train_on_prompt=True)
    assert set(everything.examples[0][1]) == {1}


def test_a_chat_template_conversation_trains_each_assistant_turn(tmp_path: Path):
    import pytest
    pytest.importorskip("transformers")
    from models.test_hf import _tokenizer

    from lora_cli.models.hf import HFTokenizer
    tok = _tokenizer(["system user assistant be brief 2+2? 4 and 3+3? six thanks you're welcome"])
    tok.chat_template = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
                         "{% if add_generation_prompt %}<|assistant|>{% endif %}")
    wrapped = HFTokenizer(tok)
    data = load_text(write(tmp_path, CONVERSATION), tokenizer=wrapped, max_seq_len=256)
    ids, mask = data.examples[0]
    runs, current = [], []
    for token, m in zip(ids, mask):
        if m:
            current.append(token)
        elif current:
            runs.append(current)
            current = []
    runs.append(current)
    assert [tok.decode(r) for r in runs] == ["4", "six", "you're welcome<eos>"]
    assert tok.decode(ids).startswith("<|system|>be brief<|end|><|user|>2+2?<|end|><|assistant|>4<|end|>")
