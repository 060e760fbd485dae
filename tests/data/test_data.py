"""Tests for lora_cli.data: loaders reject every bad file with file:line, batches are exact."""

from __future__ import annotations

import json

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lora_cli.data import (
    IGNORE_INDEX, TabularData, TextData, describe, epoch_order, load_tabular, load_text,
    num_batches, split, tabular_batch, text_batch,
)
from lora_cli.errors import DataError
from lora_cli.models.tokenizers import ByteTokenizer

TOK = ByteTokenizer()


def write(tmp_path, name: str, text: str):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8", newline="")
    return path


def jsonl(*objects) -> str:
    return "".join(json.dumps(o) + "\n" for o in objects)


def raises_at(path, line, call, *words):
    """``call()`` raises a DataError naming ``path:line`` (or just path when line is None)."""
    with pytest.raises(DataError) as info:
        call()
    message = str(info.value)
    where = str(path) if line is None else f"{path}:{line}"
    assert info.value.where == where, message
    assert where in message and info.value.fix
    for word in words:
        assert word in message, message
    return message


# ----------------------------------------------------------------------------- tabular parsing


def test_csv_regression_parses_numbers(tmp_path):
    path = write(tmp_path, "train.csv", "a,b,y\n1,2.5,3\n-1e3, 4 ,0.5\n")
    data = load_tabular(path, task="regression")
    assert data.features == ["a", "b"] and data.target == "y" and data.label_map is None
    assert data.x.dtype == torch.float32 and data.x.shape == (2, 2)
    assert data.x.tolist() == [[1.0, 2.5], [-1000.0, 4.0]]
    assert data.y.dtype == torch.float32 and data.y.tolist() == [3.0, 0.5]
    assert len(data) == 2 and data.source == str(path)
    assert describe(data) == {"rows": 2, "features": 2}


def test_csv_features_subset_order_and_blank_lines(tmp_path):
    path = write(tmp_path, "t.csv", "\nc,target,a,b\r\n1,2,3,4\r\n\r\n5,6,7,8\r\n")
    data = load_tabular(path, task="regression", target="target", features=["b", "c"])
    assert data.features == ["b", "c"]
    assert data.x.tolist() == [[4, 1], [8, 5]] and data.y.tolist() == [2, 6]


def test_jsonl_regression_and_extra_keys(tmp_path):
    path = write(tmp_path, "t.jsonl", jsonl({"x1": 1, "x2": "2.5", "y": 1.5}) + "\n"
                 + jsonl({"y": 2, "x2": 0, "x1": -3, "note": "extra"}))
    data = load_tabular(path, task="regression")
    assert data.features == ["x1", "x2"]
    assert data.x.tolist() == [[1, 2.5], [-3, 0]] and data.y.tolist() == [1.5, 2]


def test_classification_label_map_sorted_numeric_then_text(tmp_path):
    path = write(tmp_path, "c.csv", "f,y\n1,10\n2,9\n3, cat\n4,2\n5,ant\n6,9\n")
    data = load_tabular(path, task="classification")
    assert data.label_map == {"2": 0, "9": 1, "10": 2, "ant": 3, "cat": 4}
    assert data.y.dtype == torch.int64 and data.y.tolist() == [2, 1, 4, 0, 3, 1]
    assert describe(data)["classes"] == 5


def test_jsonl_int_and_string_labels_are_one_label(tmp_path):
    path = write(tmp_path, "c.jsonl", jsonl({"f": 1, "y": 1}, {"f": 2, "y": "1"}, {"f": 3, "y": 0}))
    data = load_tabular(path, task="classification")
    assert data.label_map == {"0": 0, "1": 1} and data.y.tolist() == [1, 1, 0]


def test_eval_uses_train_label_map(tmp_path):
    train = load_tabular(write(tmp_path, "tr.csv", "f,y\n1,b\n2,c\n3,a\n"), task="classification")
    evalset = load_tabular(write(tmp_path, "ev.csv", "f,y\n1,c\n2,c\n"), task="classification",
                           label_map=train.label_map)
    assert evalset.label_map == train.label_map == {"a": 0, "b": 1, "c": 2}
    assert evalset.y.tolist() == [2, 2]


def test_unseen_eval_label(tmp_path):
    path = write(tmp_path, "ev.csv", "f,y\n1,a\n2,zebra\n")
    raises_at(path, 3, lambda: load_tabular(path, task="classification",
                                            label_map={"a": 0, "b": 1}), "'zebra'", "'a', 'b'")


# ----------------------------------------------------------------------------- tabular errors


def test_missing_file_and_unknown_extension(tmp_path):
    missing = tmp_path / "nope.csv"
    raises_at(missing, None, lambda: load_tabular(missing, task="regression"), "not found")
    tsv = write(tmp_path, "t.tsv", "a\tb\n")
    raises_at(tsv, None, lambda: load_tabular(tsv, task="regression"), ".csv", ".jsonl")
    raises_at(tsv, None, lambda: load_text(tsv, tokenizer=TOK), ".txt", ".jsonl")
    raises_at(tmp_path, None, lambda: load_text(tmp_path, tokenizer=TOK))  # no extension


def test_unreadable_and_not_utf8(tmp_path):
    folder = tmp_path / "dir.csv"
    folder.mkdir()
    raises_at(folder, None, lambda: load_tabular(folder, task="regression"), "cannot read")
    path = tmp_path / "latin.csv"
    path.write_bytes(b"a,y\n1,2\n\xe9,3\n")
    raises_at(path, 3, lambda: load_tabular(path, task="regression"), "UTF-8")


@pytest.mark.parametrize("name,text,line,words", [
    ("e.csv", "", 1, ["empty"]),
    ("e.csv", "\n\n", 1, ["empty"]),
    ("h.csv", "a,y\n", 1, ["no data rows"]),
    ("e.jsonl", "\n  \n", 1, ["no rows"]),
    ("t.csv", "a,b,yy\n1,2,3\n", 1, ["'y'", "did you mean 'yy'", "['a', 'b', 'yy']"]),
    ("d.csv", "a,a,y\n1,2,3\n", 1, ["twice"]),
    ("o.csv", "y\n1\n", 1, ["no feature"]),
    ("r.csv", "a,b,y\n1,2,3\n1,2\n", 3, ["2 fields", "header has 3"]),
    ("r.csv", "a,b,y\n\n1,2,3\n\n1,2,3,4\n", 5, ["4 fields"]),
    ("q.csv", 'a,b,y\n" 1\n",2,3\n4,abc,6\n', 4, ["'abc'", "'b'"]),
    ("v.csv", "a,y\n1,2\n3,oops\n", 3, ["'oops'", "'y'"]),
    ("n.csv", "a,y\n1,2\nnan,3\n", 3, ["'nan'", "finite"]),
    ("i.csv", "a,y\n1,2\n3,-inf\n", 3, ["'-inf'"]),
    ("o.csv", "a,y\n1,2\n1e39,3\n", 3, ["'1e39'"]),
    ("b.csv", "a,y\n1,\n", 2, ["empty"]),
    ("j.jsonl", jsonl({"a": 1, "y": 2}) + '{"a": 1, "y": \n', 2, ["not valid JSON"]),
    ("j.jsonl", jsonl({"a": 1, "y": 2}) + "\n[1, 2]\n", 3, ["JSON object", "[1, 2]"]),
    ("j.jsonl", jsonl({"a": 1, "y": 2}, {"a": 1}), 2, ["lacks column 'y'"]),
    ("j.jsonl", jsonl({"a": 1, "y": 2}, {"y": 1, "A": 3}), 2, ["'a'", "did you mean 'A'"]),
    ("j.jsonl", jsonl({"x1": 1, "x2": 1, "y": 2}, {"x2": 1, "y": 1}), 2, ["'x1'; it has"]),
    ("j.jsonl", jsonl({"a": 1, "y": 2}, {"a": True, "y": 1}), 2, ["True"]),
    ("j.jsonl", jsonl({"a": 1, "y": 2}, {"a": [1], "y": 1}), 2, ["[1]"]),
    ("j.jsonl", jsonl({"a": 1, "y": 2}) + '{"a": NaN, "y": 1}\n', 2, ["nan"]),
    ("j.jsonl", jsonl({"a": 1, "y": 2}) + '{"a": 1e999, "y": 1}\n', 2, ["inf"]),
    ("j.jsonl", jsonl({"a": 1, "y": 2}) + '{"a": 1%s, "y": 1}\n' % ("0" * 400), 2, ["finite"]),
    ("j.jsonl", jsonl({"a": 1, "Y": 2}), 1, ["'y'", "did you mean 'Y'"]),
])
def test_tabular_errors_name_file_and_line(tmp_path, name, text, line, words):
    path = write(tmp_path, name, text)
    raises_at(path, line, lambda: load_tabular(path, task="regression"), *words)


def test_missing_feature_column(tmp_path):
    path = write(tmp_path, "f.csv", "alpha,beta,y\n1,2,3\n")
    raises_at(path, 1, lambda: load_tabular(path, task="regression", features=["alpah"]),
              "'alpah'", "did you mean 'alpha'")
    raises_at(path, 1, lambda: load_tabular(path, task="regression", features=["alpha", "y"]),
              "also listed")


@pytest.mark.parametrize("text,line,words", [
    ("f,y\n1,a\n2,a\n", None, ["2 distinct", "'a'"]),
    ("f,y\n1,a\n2,\n", 3, ["not a class label"]),
])
def test_classification_errors(tmp_path, text, line, words):
    path = write(tmp_path, "c.csv", text)
    raises_at(path, line, lambda: load_tabular(path, task="classification"), *words)


def test_jsonl_bad_labels(tmp_path):
    path = write(tmp_path, "c.jsonl", jsonl({"f": 1, "y": "a"}, {"f": 1, "y": 1.5}))
    raises_at(path, 2, lambda: load_tabular(path, task="classification"), "1.5")


# ----------------------------------------------------------------------------- text


def test_txt_windows_cover_the_text(tmp_path):
    text = "hello world, this is byte level text é\n" * 3
    path = write(tmp_path, "t.txt", text)
    data = load_text(path, tokenizer=TOK, max_seq_len=16)
    ids = TOK.encode(text)
    assert all(len(w) == 16 for w, _ in data.examples[:-1])
    joined = [t for w, _ in data.examples for t in w]
    tail = len(ids) % 16
    assert joined == (ids if tail != 1 else ids[:-1])  # a 1-token tail is dropped
    assert all(m == [1] * len(w) for w, m in data.examples) and data.truncated == 0
    # a tail of exactly one token is dropped
    one_over = write(tmp_path, "o.txt", "x" * 17)
    assert [len(w) for w, _ in load_text(one_over, tokenizer=TOK, max_seq_len=16).examples] == [16]


def test_jsonl_text_appends_eos(tmp_path):
    path = write(tmp_path, "t.jsonl", jsonl({"body": "hi"}, {"body": "yo!", "id": 3}))
    data = load_text(path, tokenizer=TOK, text_field="body")
    assert data.examples == [([104, 105, 256], [1, 1, 1]), ([121, 111, 33, 256], [1, 1, 1, 1])]
    assert data.num_tokens == 7 and len(data) == 2


def test_prompt_completion_mask_covers_completion_and_eos(tmp_path):
    path = write(tmp_path, "pc.jsonl", jsonl({"prompt": "Q: 2+2? A:", "completion": " 4"}))
    (ids, mask), = load_text(path, tokenizer=TOK).examples
    n_prompt = len(TOK.encode("Q: 2+2? A:"))
    assert ids == TOK.encode("Q: 2+2? A:") + TOK.encode(" 4") + [TOK.eos_id]
    assert mask == [0] * n_prompt + [1] * 3
    assert [t for t, m in zip(ids, mask) if m] == TOK.encode(" 4") + [TOK.eos_id]


def test_truncation_keeps_beginning_and_counts(tmp_path):
    path = write(tmp_path, "t.jsonl", jsonl(
        {"text": "abcdefgh"},                               # 9 tokens -> cut
        {"prompt": "a long prompt", "completion": "xyz"},   # completion cut off entirely
        {"text": "ab"},                                     # fits
    ))
    data = load_text(path, tokenizer=TOK, max_seq_len=6)
    assert data.truncated == 2 and data.was_truncated == [True, True, False]
    assert data.examples[0][0] == TOK.encode("abcdef")
    assert data.examples[1] == (TOK.encode("a long"), [0] * 6)  # kept, no loss
    assert describe(data)["truncated"] == 2


@pytest.mark.parametrize("name,text,line,words", [
    ("e.txt", "", 1, ["empty"]),
    ("e.txt", " \n\n", 1, ["empty"]),
    ("s.txt", "a", 1, ["2 tokens"]),
    ("e.jsonl", "\n\n", 1, ["no examples"]),
    ("j.jsonl", jsonl({"text": "a"}) + "{oops}\n", 2, ["not valid JSON"]),
    ("j.jsonl", jsonl({"text": "a"}) + '"just a string"\n', 2, ["JSON object", "just a string"]),
    ("k.jsonl", jsonl({"text": "a"}, {"txt": "b", "id": 1}), 2,
     ["['txt', 'id']", "'text'", "'prompt' and 'completion'", "did you mean"]),
    ("k.jsonl", jsonl({"prompt": "a"}), 1, ["keys ['prompt'];", "'completion'"]),
    ("k.jsonl", jsonl({"prompt": "a", "Completion": "b"}), 1, ["did you mean 'Completion'"]),
    ("k.jsonl", jsonl({"text": "a", "prompt": "b", "completion": "c"}), 1, ["mixes the text and prompt/completion formats"]),
    ("v.jsonl", jsonl({"text": "a"}, {"text": 5}), 2, ["'text' must be a string", "5"]),
    ("v.jsonl", jsonl({"prompt": None, "completion": "a"}), 1, ["'prompt' must be a string"]),
    ("v.jsonl", jsonl({"text": "a"}, {"text": "  "}), 2, ["empty"]),
    ("v.jsonl", jsonl({"prompt": "p", "completion": ""}), 1, ["'completion' is empty"]),
    ("u.jsonl", '{"text": "\\ud800"}\n', 1, ["surrogate"]),
])
def test_text_errors_name_file_and_line(tmp_path, name, text, line, words):
    path = write(tmp_path, name, text)
    raises_at(path, line, lambda: load_text(path, tokenizer=TOK), *words)


def test_text_missing_file(tmp_path):
    path = tmp_path / "missing.jsonl"
    raises_at(path, None, lambda: load_text(path, tokenizer=TOK), "not found")


# ----------------------------------------------------------------------------- batches


def text_data(*examples) -> TextData:
    return TextData(list(examples), source="mem")


def test_text_batch_shifts_and_masks():
    data = text_data(([1, 2, 3, 4, 5], [0, 0, 1, 1, 1]), ([7, 8, 9], [1, 1, 1]))
    inputs, labels = text_batch(data, torch.tensor([1, 0]), pad_id=256)
    assert inputs.dtype == labels.dtype == torch.int64 and inputs.shape == labels.shape == (2, 4)
    assert inputs.tolist() == [[7, 8, 256, 256], [1, 2, 3, 4]]
    assert labels.tolist() == [[8, 9, -100, -100], [-100, 3, 4, 5]]
    # every label that counts is the next input token
    for row_in, row_lab, (ids, mask) in zip(inputs, labels, [data.examples[1], data.examples[0]]):
        n = len(ids) - 1
        assert row_in[:n].tolist() == ids[:-1]
        kept = row_lab != IGNORE_INDEX
        assert row_lab[kept].tolist() == [t for t, m in zip(ids[1:], mask[1:]) if m]


def test_text_batch_from_loaded_prompt_completion(tmp_path):
    path = write(tmp_path, "pc.jsonl", jsonl({"prompt": "ab", "completion": "c"}, {"text": "xyzw"}))
    data = load_text(path, tokenizer=TOK)
    inputs, labels = text_batch(data, torch.arange(2), pad_id=TOK.pad_id)
    assert inputs.tolist() == [[97, 98, 99, 256], list(b"xyzw")]
    assert labels.tolist() == [[-100, 99, 256, -100], [*b"yzw", 256]]


def test_tabular_batch():
    data = TabularData(torch.arange(12.0).view(6, 2), torch.arange(6.0), ["a", "b"], "y")
    x, y = tabular_batch(data, torch.tensor([4, 1]))
    assert x.tolist() == [[8, 9], [2, 3]] and y.tolist() == [4, 1]


def test_num_batches():
    assert [num_batches(n, 4) for n in (0, 1, 4, 5, 8)] == [0, 1, 1, 2, 2]
    assert [num_batches(n, 4, drop_last=True) for n in (0, 3, 4, 7, 8)] == [0, 0, 1, 1, 2]


def test_epoch_order_permutation_deterministic_per_epoch():
    a = epoch_order(50, seed=3, epoch=0)
    assert a.dtype == torch.int64 and sorted(a.tolist()) == list(range(50))
    assert torch.equal(a, epoch_order(50, seed=3, epoch=0))
    assert not torch.equal(a, epoch_order(50, seed=3, epoch=1))
    assert not torch.equal(a, epoch_order(50, seed=4, epoch=0))
    assert not torch.equal(epoch_order(50, seed=0, epoch=1), epoch_order(50, seed=1, epoch=0))
    assert epoch_order(5, seed=3, epoch=2, shuffle=False).tolist() == [0, 1, 2, 3, 4]
    assert epoch_order(0, seed=0, epoch=0).numel() == 0


def test_split_tabular_deterministic_disjoint_complete():
    data = TabularData(torch.arange(20.0).view(10, 2), torch.arange(10.0), ["a", "b"], "y",
                       source="t.csv")
    train, val = split(data, 0.3, seed=1)
    assert len(train) == 7 and len(val) == 3
    rows = train.y.tolist() + val.y.tolist()
    assert sorted(rows) == list(range(10))  # disjoint and complete
    assert train.x[:, 0].tolist() == [2 * r for r in train.y.tolist()]  # rows stay whole
    again = split(data, 0.3, seed=1)
    assert torch.equal(again[1].y, val.y) and torch.equal(again[0].x, train.x)
    other = {tuple(split(data, 0.3, seed=s)[1].y.tolist()) for s in range(10)}
    assert len(other) > 1


def test_split_text_keeps_truncation_counts():
    data = TextData([([i, i], [1, 1]) for i in range(8)], truncated=3, source="t.jsonl",
                    was_truncated=[i < 3 for i in range(8)])
    train, val = split(data, 0.25, seed=0)
    assert len(train) == 6 and len(val) == 2
    assert sorted(ids[0] for ids, _ in train.examples + val.examples) == list(range(8))
    assert train.truncated + val.truncated == 3
    assert val.truncated == sum(ids[0] < 3 for ids, _ in val.examples)


@pytest.mark.parametrize("n,val_split", [(1, 0.5), (10, 0.01), (10, 0.99)])
def test_split_too_small(n, val_split):
    data = TextData([([1, 2], [1, 1])] * n, source="small.jsonl")
    raises_at("small.jsonl", None, lambda: split(data, val_split, seed=0), "too small")


# ----------------------------------------------------------------------------- fuzzing

number = st.one_of(st.integers(-9, 9).map(str), st.floats(-1e3, 1e3).map(repr))
cell = st.one_of(
    number, number, number,
    st.sampled_from(["", " ", "nan", "NaN", "inf", "-inf", "1e999", "1e39", "cat", '"',
                     '""', '"1,2"', '" 3 "', "1_0", "\u00e9", "\u2028", "\r", "\x00"]),
    st.text(max_size=6),
)


@st.composite
def csv_text(draw) -> str:
    """A header of 1-3 unique names, then rows mostly of the header's width."""
    names = draw(st.lists(st.sampled_from(["a", "b", "y", "Y", ""]), min_size=1, max_size=3,
                          unique=True))
    row = st.lists(cell, min_size=len(names), max_size=len(names))
    rows = draw(st.lists(st.one_of(row, row, st.lists(cell, max_size=4)), max_size=6))
    return "\n".join(",".join(r) for r in [names, *rows])


json_value = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=5) | number,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=3), inner,
                                                               max_size=3),
    max_leaves=6)
json_line = st.one_of(
    st.fixed_dictionaries({"a": st.integers(-3, 3) | number, "y": st.integers(0, 2)}).map(json.dumps),
    st.fixed_dictionaries({"prompt": st.text(max_size=4), "completion": st.text(max_size=4)}
                          ).map(json.dumps),
    st.fixed_dictionaries({"text": st.text(max_size=6)}).map(json.dumps),
    st.dictionaries(st.sampled_from(["a", "y", "text", "prompt", "completion", "b"]),
                    json_value, max_size=4).map(json.dumps),
    json_value.map(json.dumps),
    st.text(max_size=10),
    st.sampled_from(['{"a": NaN, "y": 1}', '{"a": 1e999, "y": "1"}', '{"text": "\\ud800"}', ""]),
)
FUZZ = settings(max_examples=100, deadline=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture])


def only_data_errors(call):
    try:
        call()
    except DataError:
        pass


@FUZZ
@given(text=csv_text(), task=st.sampled_from(["regression", "classification"]))
def test_fuzz_csv_returns_data_or_data_error(tmp_path, text, task):
    path = write(tmp_path, "fuzz.csv", text)
    only_data_errors(lambda: load_tabular(path, task=task))
    only_data_errors(lambda: load_tabular(path, task=task, label_map={"1": 0, "a": 1}))


@FUZZ
@given(lines=st.lists(json_line, max_size=5), task=st.sampled_from(["regression", "classification"]))
def test_fuzz_jsonl_returns_data_or_data_error(tmp_path, lines, task):
    path = write(tmp_path, "fuzz.jsonl", "\n".join(lines))
    only_data_errors(lambda: load_tabular(path, task=task))
    only_data_errors(lambda: load_text(path, tokenizer=TOK, max_seq_len=4))


def test_split_labelled_texts_keeps_truncation_counts(tmp_path):
    """Each half of a split counts its own truncated texts (both reported the whole set's)."""
    from lora_cli.data import load_text_classification
    from lora_cli.models.tokenizers import ByteTokenizer
    rows = [{"text": ("long " * 20 if i % 3 == 0 else "short"), "label": "ab"[i % 2]} for i in range(30)]
    (tmp_path / "cls.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    data = load_text_classification(tmp_path / "cls.jsonl", tokenizer=ByteTokenizer(), max_seq_len=16)
    assert data.truncated == 10
    train, val = split(data, 0.3, seed=0)
    assert train.truncated + val.truncated == 10
    assert val.truncated == sum(len(ids) == 16 for ids in val.examples) and 0 < val.truncated < 10
