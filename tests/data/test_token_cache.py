"""Tokenized data is cached by content hash: a repeated run does not call the tokenizer,
gets the same examples, and any change of file, tokenizer or settings tokenizes anew."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lora_cli.data import token_cache
from lora_cli.models.tokenizers import ByteTokenizer
from lora_cli.run.build import load_data
from lora_cli.run.config import load_config


@pytest.fixture
def project(tmp_path: Path, monkeypatch) -> Path:
    from conftest import write_lm_run
    pairs = [(f"{a}*{b}=", str(a * b)) for a in range(9) for b in range(5)]
    write_lm_run(tmp_path, pairs, eval_every_nth=4, seed=1, n_layer=1, seq=6, dropout=0.0, train={"max_steps": 2})
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.fixture
def calls(monkeypatch) -> list[str]:
    seen: list[str] = []
    encode = ByteTokenizer.encode

    def counting(self, text, **kw):
        seen.append(text)
        return encode(self, text, **kw)

    monkeypatch.setattr(ByteTokenizer, "encode", counting)
    return seen


def _examples(data):
    return [data.train.examples, data.eval.examples, data.train.was_truncated, data.train.inexact_join]


def test_a_second_run_does_not_call_the_tokenizer(project, calls):
    cfg = load_config("config.yaml")
    first = load_data(cfg)
    assert calls                                     # the first run tokenized
    calls.clear()
    second = load_data(cfg)
    assert calls == []                               # the second read the cache
    assert _examples(second) == _examples(first)
    assert first.train.truncated == second.train.truncated > 0   # max_seq_len 6 cuts some


def test_changed_content_or_settings_tokenize_again(project, calls):
    load_data(load_config("config.yaml"))
    calls.clear()
    load_data(load_config("config.yaml", ["data.max_seq_len=5"]))
    assert calls
    calls.clear()
    with open("train.jsonl", "a") as f:
        f.write(json.dumps({"prompt": "9*9=", "completion": "81"}) + "\n")
    data = load_data(load_config("config.yaml"))
    assert calls and any(t == "9*9=" for t in calls)
    assert len(data.train) == 9 * 5 + 1


def test_a_damaged_cache_file_is_tokenized_again(project, calls):
    cfg = load_config("config.yaml")
    first = load_data(cfg)
    for file in token_cache.cache_dir().iterdir():
        file.write_bytes(b"not safetensors")
    calls.clear()
    again = load_data(cfg)
    assert calls and _examples(again) == _examples(first)
    calls.clear()
    load_data(cfg)
    assert calls == []                               # and the cache was rewritten


def test_off_means_no_cache(project, calls, monkeypatch):
    monkeypatch.setenv("LORA_CLI_CACHE", "off")
    load_data(load_config("config.yaml"))
    calls.clear()
    load_data(load_config("config.yaml"))
    assert calls
