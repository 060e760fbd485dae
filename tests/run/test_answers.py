"""Generation metrics on hand-made records: exact and whitespace-normalized match, worst misses."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lora_cli.data.prompts import PromptRecord, read_prompts
from lora_cli.errors import UserError
from lora_cli.models.tokenizers import ByteTokenizer
from lora_cli.run.answers import heldout_records, match_rates, normalize, worst
from lora_cli.run.config import config_from_dict


def test_exact_and_normalized_match_on_hand_made_records():
    answers = ['{"a": 1}', "x y", "tab\there", "z"]
    completions = ['{"a": 1}', " x   y\n", "tab here", "zz"]
    rates = match_rates(completions, answers)
    assert (rates["exact"], rates["normalized"], rates["n"]) == (1, 3, 4)
    assert rates["exact_match"] == 0.25 and rates["normalized_match"] == 0.75
    assert match_rates([], []) == {"exact_match": 0.0, "normalized_match": 0.0, "exact": 0, "normalized": 0, "n": 0}
    assert normalize("  a \n\t b  ") == "a b"
    with pytest.raises(ValueError):
        match_rates(["a"], [])


def test_worst_lists_the_misses_least_like_their_answer_first():
    records = [PromptRecord(f"p{i}", a) for i, a in enumerate(["hello", "world", "same", "abcdef"])]
    adapted = ["hellp", "qqqqq", "same", "abcxyz"]
    rows = worst(records, ["b"] * 4, adapted, k=2)
    assert [r["prompt"] for r in rows] == ["p1", "p3"]            # 'same' matched; 'hellp' is the closest miss
    assert rows[0]["similarity"] < rows[1]["similarity"] and rows[0]["base"] == "b"


def test_prompts_read_every_training_format(tmp_path: Path):
    lines = [{"prompt": "a\n", "completion": "b"}, {"instruction": "do", "input": "it", "output": "done"},
             {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]},
             {"messages": [{"role": "user", "content": "only"}]}, {"text": "free"}]
    path = tmp_path / "p.jsonl"
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    got = read_prompts(path, ByteTokenizer())
    assert got == [PromptRecord("a\n", "b"), PromptRecord("### Instruction:\ndo\n\n### Input:\nit\n\n### Response:\n",
                                                            "done"),
                   PromptRecord("user: hi\nassistant: ", "yo"), PromptRecord("user: only\nassistant: ", None),
                   PromptRecord("free", None)]


def test_held_out_records_follow_val_split_and_need_answers(tmp_path: Path):
    (tmp_path / "t.jsonl").write_text("".join(json.dumps({"prompt": f"{i}\n", "completion": str(i)}) + "\n"
                                              for i in range(20)))
    cfg = config_from_dict({"task": "causal_lm", "model": {"arch": "gpt", "base": None},
                            "data": {"train": str(tmp_path / "t.jsonl"), "val_split": 0.25}}, check_files=False)
    from lora_cli.data import load_text, split
    held = split(load_text(tmp_path / "t.jsonl", tokenizer=ByteTokenizer()), 0.25, cfg.seed)[1]
    records = heldout_records(cfg, None, ByteTokenizer())
    assert [r.prompt.encode() for r in records] == [bytes(ids[:mask.index(1)]) for ids, mask in held.examples]
    (tmp_path / "u.jsonl").write_text(json.dumps({"prompt": "x"}) + "\n")
    with pytest.raises(UserError, match="have none"):
        heldout_records(cfg, str(tmp_path / "u.jsonl"), ByteTokenizer())
