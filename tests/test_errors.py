"""Every user mistake: one clear message, exit code 2, no traceback, nothing left behind.

Each case runs the real command through Typer's CliRunner (in-process, so it is fast)
in a tiny project under ``tmp_path``: a 3-feature regression CSV, a seeded ``mlp``
base, a byte-level text file for a one-layer ``gpt``. A case passes when

  * the exit code is 2 and the CLI caught a UserError (no traceback, nothing else raised),
  * the output holds exactly one ``error:`` line naming what and where (file, line or
    config key path), plus a ``fix:`` hint where one makes sense,
  * the project directory is bit-for-bit what it was before (no output_dir, no temp
    files, no half-written merge).

The property tests at the end feed random configs and random data files through
``config_from_dict`` and ``plan`` (and now and then a one-step ``train``): the result is
a plan or a UserError, never any other exception.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import pathlib
import stat
import tempfile
import traceback
from pathlib import Path

import pytest
import torch
import yaml
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from lora_cli.cli import app
from lora_cli.run.config import config_from_dict
from lora_cli.errors import UserError
from lora_cli.models import build_model
from lora_cli.run.train import TrainingError, plan, train

runner = CliRunner()

# --------------------------------------------------------------------------- the project

GPT_ARGS = {"n_layer": 1, "d_model": 16, "n_head": 2, "max_seq_len": 64}
CONFIG = {
    "seed": 0, "device": "cpu", "task": "regression", "output_dir": "run",
    "model": {"arch": "mlp", "args": {"hidden": 8}, "base": "base.safetensors"},
    "data": {"train": "train.csv", "eval": "eval.csv"},
    "lora": {"rank": 2, "alpha": 4, "target_modules": "all-linear"},
    "train": {"max_steps": 2, "batch_size": 8, "log_every": 1, "lr": 0.01},
}
LM_CONFIG = {
    "seed": 0, "device": "cpu", "task": "causal_lm", "output_dir": "lm_run",
    "model": {"arch": "gpt", "args": dict(GPT_ARGS), "base": None},
    "data": {"train": "text.jsonl", "max_seq_len": 32},
    "lora": {"rank": 2, "alpha": 4},
    "train": {"max_steps": 1, "batch_size": 4},
}
TEXTS = ["hello world", "the quick brown fox", "lorem ipsum dolor", "a b c d e f"]


def csv_text(n: int, seed: int, header: str = "a,b,c,y", labels: list[str] | None = None) -> str:
    """``n`` rows of 3 features and a target (a number, or the given labels in turn)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, generator=g)
    lines = [header]
    for i, row in enumerate(x.tolist()):
        target = labels[i % len(labels)] if labels else f"{sum(row):.5f}"
        lines.append(",".join(f"{v:.5f}" for v in row) + f",{target}")
    return "\n".join(lines) + "\n"


def save_mlp_base(path: Path, hidden: int = 8, seed: int = 1, in_features: int = 3) -> None:
    torch.manual_seed(seed)
    model = build_model(arch="mlp", args={"in_features": in_features, "out_features": 1, "hidden": hidden})
    sd = {k: v.contiguous() for k, v in model.state_dict().items()}
    if path.suffix == ".pt":
        torch.save(sd, path)
    else:
        save_file(sd, path)


def write_config(name: str = "config.yaml", changes: dict | None = None, base: dict = CONFIG) -> str:
    """The base config with ``{"dotted.key": value}`` changes set, written as YAML."""
    data = copy.deepcopy(base)
    for key, value in (changes or {}).items():
        *sections, leaf = key.split(".")
        node = data
        for s in sections:
            node = node.setdefault(s, {})
        node[leaf] = value
    Path(name).write_text(yaml.safe_dump(data, sort_keys=False))
    return name


@pytest.fixture
def proj(tmp_path: Path, monkeypatch) -> Path:
    """A tiny regression + causal_lm project in tmp_path, which is the current directory."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "train.csv").write_text(csv_text(24, seed=0))
    (tmp_path / "eval.csv").write_text(csv_text(8, seed=1))
    (tmp_path / "text.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
    save_mlp_base(tmp_path / "base.safetensors")
    write_config()
    write_config("lm.yaml", base=LM_CONFIG)
    return tmp_path


@pytest.fixture
def trained(proj: Path) -> Path:
    """The project after a 2-step run: run/adapter exists."""
    result = invoke("train", "config.yaml")
    assert result.exit_code == 0, describe(result)
    assert (proj / "run" / "adapter" / "adapter_model.safetensors").is_file()
    return proj


# --------------------------------------------------------------------------- checking

def invoke(*args):
    """Run a CLI command in-process; the result also carries a snapshot of the current
    directory (the project) taken just before, for :func:`assert_user_error`."""
    before = snapshot(Path.cwd())
    result = runner.invoke(app, [str(a) for a in args])
    result.before = before
    return result


def describe(result) -> str:
    text = result.output
    if result.exc_info is not None and not isinstance(result.exception, SystemExit):
        text += "\n" + "".join(traceback.format_exception(*result.exc_info))
    return text


def snapshot(root: Path) -> dict:
    """Every path under root with its kind, mode and (for files) content hash."""
    out = {}
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root).as_posix()
        st_ = p.lstat()
        if stat.S_ISDIR(st_.st_mode):
            out[rel] = ("dir", stat.S_IMODE(st_.st_mode))
        elif os.access(p, os.R_OK):
            out[rel] = ("file", stat.S_IMODE(st_.st_mode), hashlib.sha256(p.read_bytes()).hexdigest())
        else:
            out[rel] = ("file", stat.S_IMODE(st_.st_mode), st_.st_size, st_.st_mtime_ns)
    return out


def squash(text: str) -> str:
    return " ".join(text.split())


def assert_user_error(result, *needles: str, fix: bool = True) -> str:
    """Exit 2, one ``error:`` message on stderr containing every needle, no traceback, and
    the project directory exactly as it was before the command (nothing written or removed)."""
    detail = describe(result)
    assert result.exit_code == 2, detail
    assert isinstance(result.exception, SystemExit), detail
    assert "Traceback" not in result.output, detail
    assert result.output.count("error:") == 1, detail
    assert "error:" in result.stderr, detail
    message = squash(result.stderr)
    for needle in needles:
        assert squash(needle) in message, f"{needle!r} not in:\n{result.stderr}"
    if fix:
        assert "fix:" in result.stderr, detail
    after = snapshot(Path.cwd())
    added = sorted(set(after) - set(result.before))
    removed = sorted(set(result.before) - set(after))
    changed = sorted(k for k in set(after) & set(result.before) if after[k] != result.before[k])
    assert not (added or removed or changed), f"left behind: {added}; removed: {removed}; changed: {changed}"
    return result.stderr


# --------------------------------------------------------------------------- config mistakes

@pytest.mark.parametrize("text, line", [
    ("seed: 0\ndevice: cpu\nmodel:\n  arch: mlp\n   base: base.safetensors\n", 5),   # bad indent
    ("seed: 0\nmodel:\n\tarch: mlp\n", 3),                                             # a tab
    ("seed: 0\nlora:\n  target_modules: [layers.0, head\ntrain:\n  lr: 1\n", 4),      # unclosed [
], ids=["indent", "tab", "unclosed-bracket"])
def test_malformed_yaml_names_the_line(proj, text, line):
    Path("bad.yaml").write_text(text)
    assert_user_error(invoke("train", "bad.yaml"), "bad.yaml", f"invalid YAML at line {line}")


@pytest.mark.parametrize("key, suggestion", [
    ("lora.rnak", "did you mean 'rank'"),
    ("train.optimiser", "did you mean 'optimizer'"),
    ("lr", "did you mean 'train.lr'"),             # a key in the wrong section
])
def test_unknown_key_suggests_the_intended_one(proj, key, suggestion):
    write_config(changes={key: 4})
    assert_user_error(invoke("train", "config.yaml"), "config.yaml", f"{key}: unknown key", suggestion,
                      fix=False)


@pytest.mark.parametrize("key, value, expect", [
    ("lora.rank", "four", "must be an integer"),
    ("lora.rank", 2.5, "must be an integer"),
    ("train.lr", "fast", "must be a number"),
    ("lora.target_modules", 5, "must be a non-empty list of strings or a non-empty string"),
    ("data.train", ["a.csv"], "must be a non-empty string"),
    ("model.args", [1, 2], "must be a mapping"),
])
def test_wrong_type_names_the_key_and_the_expected_type(proj, key, value, expect):
    write_config(changes={key: value})
    assert_user_error(invoke("train", "config.yaml"), f"{key}: {expect}", fix=False)


@pytest.mark.parametrize("config, args, expect", [
    pytest.param(CONFIG, {"hidden": 8, "activation": "relux"}, "use one of: gelu, relu", id="mlp-unknown-activation"),
    pytest.param(CONFIG, {"hidden": 8, "widht": 3}, "unexpected argument 'widht'", id="mlp-unknown-arg"),
    pytest.param(LM_CONFIG, {**GPT_ARGS, "d_model": 18, "n_head": 2}, "even head size", id="gpt-odd-head"),
    pytest.param(CONFIG, {"hidden": -1}, "model.args.hidden", id="mlp-negative-hidden"),
    pytest.param(LM_CONFIG, {**GPT_ARGS, "n_head": 0}, "model.args.n_head", id="gpt-zero-heads"),
])
def test_impossible_model_args(proj, config, args, expect):
    write_config(changes={"model.args": args, "model.base": None}, base=config)
    assert_user_error(invoke("train", "config.yaml"), "model.args", expect)


@pytest.mark.parametrize("rank", [0, -3])
def test_rank_below_one(proj, rank):
    write_config(changes={"lora.rank": rank})
    assert_user_error(invoke("train", "config.yaml"), f"lora.rank: must be an integer >= 1, got {rank}", fix=False)


def test_rank_larger_than_the_layer_allows(proj):
    # inject.py: rank <= max(weight.shape); layers.0 is (8, 3) -> at most 8
    write_config(changes={"lora.rank": 9})
    assert_user_error(invoke("train", "config.yaml"), "lora.rank", "rank 9 is larger than 'layers.0' allows",
                      "at most 8", "lora.rank <= 8")


@pytest.mark.parametrize("alpha", [0, -1.5])
def test_alpha_not_positive(proj, alpha):
    write_config(changes={"lora.alpha": alpha})
    assert_user_error(invoke("train", "config.yaml"), "lora.alpha: must be a number > 0", fix=False)


@pytest.mark.parametrize("dropout", [-0.1, 1, 1.5])
def test_dropout_outside_zero_one(proj, dropout):
    write_config(changes={"lora.dropout": dropout})
    assert_user_error(invoke("train", "config.yaml"), "lora.dropout: must be a number >= 0 and < 1", fix=False)


@pytest.mark.parametrize("config, adaptable", [
    pytest.param({"model.arch": "linear", "model.args": {}, "model.base": None}, ["linear"], id="linear"),
    pytest.param({}, ["layers.0", "layers.1", "head"], id="mlp"),
    pytest.param({"base": LM_CONFIG},
                 ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head"],
                 id="gpt"),
])
def test_target_matching_nothing_lists_the_adaptable_modules(proj, config, adaptable):
    config = dict(config)
    base = config.pop("base", CONFIG)
    write_config(changes={**config, "lora.target_modules": ["nope_proj"]}, base=base)
    err = assert_user_error(invoke("train", "config.yaml"), "lora.target_modules", "'nope_proj' matches no module")
    for name in adaptable:
        assert name in err, err


# --------------------------------------------------------------------------- files

@pytest.mark.parametrize("key", ["data.train", "data.eval", "model.base"])
def test_missing_file_in_config(proj, key):
    missing = "nowhere.safetensors" if key == "model.base" else "nowhere.csv"
    write_config(changes={key: missing})
    assert_user_error(invoke("train", "config.yaml"), f"{key}: file not found: {missing}")


@pytest.mark.parametrize("command", [
    ("merge", "nowhere.safetensors", "run/adapter"),
    ("merge", "base.safetensors", "nowhere"),
    ("eval", "nowhere"),
    ("eval", "run/adapter", "--data", "nowhere.csv"),
    ("train", "nowhere.yaml"),
], ids=["merge-base", "merge-adapter", "eval-adapter", "eval-data", "train-config"])
def test_missing_file_on_the_command_line(trained, command):
    assert_user_error(invoke(*command), "nowhere", "not found", fix=command[0] != "train")


def test_eval_when_the_adapters_base_file_is_gone(trained):
    (trained / "base.safetensors").rename(trained / "moved.safetensors")
    assert_user_error(invoke("eval", "run/adapter"), "base.safetensors", "not found")


@pytest.mark.parametrize("target", ["config.yaml", "train.csv", "base.safetensors"])
def test_unreadable_file(proj, target):
    path = proj / target
    path.chmod(0)
    try:
        if os.access(path, os.R_OK):
            pytest.skip("running as root: chmod 000 does not stop reading")
        assert_user_error(invoke("train", "config.yaml"), target, fix=False)
    finally:
        path.chmod(0o644)


# --------------------------------------------------------------------------- data

@pytest.mark.parametrize("name, content, config, expect", [
    ("empty.csv", "a,b,c,y\n", {}, "empty.csv:1: file has a header but no data rows"),
    ("empty.csv", "", {}, "empty.csv:1: file is empty"),
    ("empty.jsonl", "", {}, "empty.jsonl:1: file has no rows"),
    ("empty.jsonl", "\n\n", {"base": LM_CONFIG}, "empty.jsonl:1: file has no examples"),
], ids=["csv-header-only", "csv-zero-bytes", "jsonl-regression", "jsonl-causal-lm"])
def test_empty_dataset(proj, name, content, config, expect):
    Path(name).write_text(content)
    write_config(changes={"data.train": name}, base=config.get("base", CONFIG))
    assert_user_error(invoke("train", "config.yaml"), expect)


def test_csv_without_the_target_column(proj):
    Path("notarget.csv").write_text(csv_text(6, seed=2, header="a,b,c,label"))
    assert_user_error(invoke("train", "config.yaml", "data.train=notarget.csv"),
                      "notarget.csv:1: target column 'y' not found", "'label'", "data.target")


@pytest.mark.parametrize("row", ["1,2,3,4,5", "1,2"], ids=["too-many", "too-few"])
def test_ragged_csv_row_names_the_line(proj, row):
    lines = csv_text(5, seed=2).splitlines()
    lines[3] = row                       # line 4 of the file (the header is line 1)
    Path("ragged.csv").write_text("\n".join(lines) + "\n")
    assert_user_error(invoke("train", "config.yaml", "data.train=ragged.csv"),
                      "ragged.csv:4: row has", "header has 4")


@pytest.mark.parametrize("split", ["train", "eval"])
def test_non_numeric_value_names_line_and_column(proj, split):
    lines = csv_text(5, seed=2).splitlines()
    lines[2] = "0.5,abc,1.0,2.0"         # line 3
    Path("bad.csv").write_text("\n".join(lines) + "\n")
    assert_user_error(invoke("train", "config.yaml", f"data.{split}=bad.csv"),
                      "bad.csv:3: column 'b': 'abc' is not a number")


@pytest.mark.parametrize("value", ["nan", "NaN", "inf", "-inf", "1e39"])
@pytest.mark.parametrize("column", ["b", "y"])
def test_nan_and_inf_values_are_refused(proj, value, column):
    lines = csv_text(5, seed=2).splitlines()
    lines[5] = f"0.5,{value},1.0,2.0" if column == "b" else f"0.5,1.0,1.0,{value}"     # line 6
    Path("nonfinite.csv").write_text("\n".join(lines) + "\n")
    assert_user_error(invoke("train", "config.yaml", "data.train=nonfinite.csv"),
                      f"nonfinite.csv:6: column '{column}'", "not a finite")


@pytest.mark.parametrize("config, good", [
    ({}, '{"a": 1, "b": 2, "c": 3, "y": 4}'),
    ({"base": LM_CONFIG}, '{"text": "fine"}'),
], ids=["regression", "causal-lm"])
def test_jsonl_line_that_is_not_json_names_the_line(proj, config, good):
    Path("broken.jsonl").write_text(f"{good}\n{good}\n{{\"a\": 1,\n{good}\n")
    write_config(changes={"data.train": "broken.jsonl", "data.eval": None}, base=config.get("base", CONFIG))
    assert_user_error(invoke("train", "config.yaml"), "broken.jsonl:3: not valid JSON")


def test_jsonl_object_without_the_text_field(proj):
    Path("notext.jsonl").write_text('{"text": "fine"}\n{"txt": "typo"}\n')
    assert_user_error(invoke("train", "lm.yaml", "data.train=notext.jsonl"),
                      "notext.jsonl:2: object has keys ['txt']", "expected 'text'", "data.text_field")


@pytest.fixture
def classification(proj: Path) -> Path:
    Path("cls_train.csv").write_text(csv_text(24, seed=3, header="a,b,c,label", labels=["cat", "dog"]))
    Path("cls_eval.csv").write_text(csv_text(6, seed=4, header="a,b,c,label", labels=["dog", "cat", "eel"]))
    write_config("cls.yaml", {"task": "classification", "output_dir": "cls_run", "model.base": None,
                              "data.train": "cls_train.csv", "data.eval": None, "data.target": "label"})
    return proj


def test_unseen_eval_labels_refused_by_train(classification):
    assert_user_error(invoke("train", "cls.yaml", "data.eval=cls_eval.csv"),
                      "cls_eval.csv:4: label 'eel' was not in the training data", "'cat', 'dog'")


def test_unseen_eval_labels_refused_by_eval(classification):
    assert invoke("train", "cls.yaml").exit_code == 0
    assert_user_error(invoke("eval", "cls_run/adapter", "--data", "cls_eval.csv"),
                      "cls_eval.csv:4: label 'eel' was not in the training data")


# --------------------------------------------------------------------------- base checkpoints

class _Marker:
    """Unpickling this would create a file: the proof that code ran."""

    def __init__(self, path: Path):
        self.path = path

    def __reduce__(self):
        return (pathlib.Path.touch, (pathlib.Path(self.path),))


def _not_a_state_dict(kind: str, path: Path) -> str:
    if kind == "list":
        torch.save([torch.zeros(2), torch.ones(2)], path)
        return "holds a list with 2 entries, not a state dict"
    torch.save({"layers.0.weight": torch.zeros(8, 3), "step": 7}, path)
    return "key 'step' holds an int, not a tensor"


@pytest.mark.parametrize("kind", ["list", "non-tensor-value"])
@pytest.mark.parametrize("command", ["train", "merge"])
def test_pt_base_that_is_not_a_state_dict(trained, command, kind):
    expect = _not_a_state_dict(kind, trained / "weird.pt")
    args = ("config.yaml", "model.base=weird.pt", "output_dir=run2") if command == "train" else \
        ("weird.pt", "run/adapter")
    assert_user_error(invoke(command, *args), "weird.pt", expect)


@pytest.mark.parametrize("nested", [False, True], ids=["top-level", "inside-dict"])
@pytest.mark.parametrize("command", ["train", "merge"])
def test_malicious_pickle_base_is_refused_without_running_it(trained, command, nested):
    marker = trained / "PWNED"
    evil = _Marker(marker)
    torch.save({"layers.0.weight": evil} if nested else evil, trained / "evil.pt")
    assert not marker.exists()
    args = ("config.yaml", "model.base=evil.pt", "output_dir=run2") if command == "train" else \
        ("evil.pt", "run/adapter")
    assert_user_error(invoke(command, *args), "evil.pt", "would run code", "safetensors")
    assert not marker.exists()


@pytest.mark.parametrize("command", ["train", "merge"])
def test_truncated_safetensors_base(trained, command):
    raw = (trained / "base.safetensors").read_bytes()
    (trained / "half.safetensors").write_bytes(raw[: len(raw) // 2])
    args = ("config.yaml", "model.base=half.safetensors", "output_dir=run2") if command == "train" else \
        ("half.safetensors", "run/adapter")
    assert_user_error(invoke(command, *args), "half.safetensors", "truncated or corrupt")


# --------------------------------------------------------------------------- adapters

def _corrupt(path: Path, how: str) -> None:
    raw = path.read_bytes()
    if how == "truncated":
        path.write_bytes(raw[: len(raw) // 2])
    elif how == "garbage":
        path.write_bytes(bytes(range(256)) * 4)
    else:   # a header whose length field points past the end of the file
        path.write_bytes((10**9).to_bytes(8, "little") + raw[8:])


@pytest.mark.parametrize("how", ["truncated", "garbage", "bad-header-length"])
@pytest.mark.parametrize("command", ["merge", "eval"])
def test_corrupt_adapter_is_refused(trained, command, how):
    weights = trained / "run" / "adapter" / "adapter_model.safetensors"
    _corrupt(weights, how)
    args = ("base.safetensors", "run/adapter") if command == "merge" else ("run/adapter",)
    assert_user_error(invoke(command, *args), "adapter_model.safetensors", "cannot read the adapter weights")


@pytest.mark.parametrize("ignore", [False, True], ids=["checked", "ignore-fingerprint"])
@pytest.mark.parametrize("command", ["merge", "eval"])
def test_adapter_for_a_base_of_other_shapes_is_refused(trained, command, ignore):
    flags = ["--ignore-fingerprint"] if ignore else []
    if command == "merge":
        save_mlp_base(trained / "wide.safetensors", hidden=12)
        assert_user_error(invoke("merge", "wide.safetensors", "run/adapter", *flags),
                          "wide.safetensors", "does not fit this base", "(12, 3) in the base")
    else:   # the base file the adapter was trained on was replaced by a wider model's
        save_mlp_base(trained / "base.safetensors", hidden=12)
        assert_user_error(invoke("eval", "run/adapter", *flags), "base.safetensors", "(12, 3)")


@pytest.mark.parametrize("command", ["merge", "eval"])
def test_adapter_for_a_base_of_other_values_needs_ignore_fingerprint(trained, command):
    other = {k: v + 0.5 for k, v in load_file(trained / "base.safetensors").items()}
    if command == "merge":
        save_file(other, trained / "other.safetensors")
        args = ("merge", "other.safetensors", "run/adapter")
        where = "other.safetensors"
    else:
        save_file(other, trained / "base.safetensors")
        args = ("eval", "run/adapter")
        where = "run/adapter"
    assert_user_error(invoke(*args), where, "trained on a different base", "values differ",
                      "--ignore-fingerprint")
    accepted = invoke(*args, "--ignore-fingerprint")
    assert accepted.exit_code == 0, describe(accepted)
    if command == "merge":
        assert (trained / "other-merged.safetensors").is_file()


# --------------------------------------------------------------------------- outputs

@pytest.mark.parametrize("command", [
    pytest.param("train", id="train-output_dir"),
    pytest.param("merge", id="merge-output"),
])
def test_output_under_a_regular_file_cannot_be_written(trained, command):
    (trained / "plainfile").write_text("not a folder")
    if command == "train":
        result = invoke("train", "config.yaml", "output_dir=plainfile/run")
    else:
        result = invoke("merge", "base.safetensors", "run/adapter", "-o", "plainfile/merged.safetensors")
    assert_user_error(result, "plainfile", "cannot be written")


def test_merge_output_into_a_missing_folder_is_created_or_refused(trained):
    result = invoke("merge", "base.safetensors", "run/adapter", "-o", "new/merged.safetensors")
    if result.exit_code == 0:
        assert (trained / "new" / "merged.safetensors").is_file()
    else:
        assert_user_error(result, "new", fix=False)


def test_an_output_dir_holding_a_run_or_foreign_files_needs_resume_or_overwrite(trained):
    (trained / "run" / "notes.txt").write_text("mine")
    assert_user_error(invoke("train", "config.yaml"), "run: output_dir holds a trained adapter", "--overwrite")
    (trained / "other").mkdir()
    (trained / "other" / "notes.txt").write_text("mine")
    assert_user_error(invoke("train", "config.yaml", "output_dir=other"),
                      "other: output_dir holds files lora-cli did not write: notes.txt", "--overwrite")
    assert sorted(p.name for p in (trained / "other").iterdir()) == ["notes.txt"]


def test_resume_and_overwrite_together(trained):
    assert_user_error(invoke("train", "config.yaml", "--resume", "--overwrite"), "contradict")


@pytest.mark.parametrize("output", ["merged.safetensors", None], ids=["-o", "default"])
def test_merge_output_that_exists_needs_force(trained, output):
    name = output or "base-merged.safetensors"
    (trained / name).write_bytes(b"precious")
    args = ["-o", output] if output else []
    assert_user_error(invoke("merge", "base.safetensors", "run/adapter", *args),
                      f"{name}: output already exists", "--force")


def test_eval_of_a_config_whose_run_has_no_adapter(proj):
    assert_user_error(invoke("eval", "config.yaml"), "run/adapter", "has no adapter yet", "lora-train")


@pytest.mark.parametrize("state", ["fresh", "finished-run-without-checkpoints"])
def test_resume_without_a_checkpoint(proj, state):
    if state != "fresh":
        assert invoke("train", "config.yaml").exit_code == 0
    assert_user_error(invoke("train", "config.yaml", "--resume"),
                      "checkpoints: no complete checkpoint to resume from", "save_every")
    if state == "fresh":
        assert not (proj / "run").exists()


@pytest.mark.parametrize("override", [
    pytest.param("lora.alpha=1e39", id="alpha"),
    pytest.param("train.lr=1e39", id="lr"),
])
def test_values_beyond_float32_are_refused_up_front(proj, override):
    key = override.partition("=")[0]
    assert_user_error(invoke("train", "config.yaml", override), key, fix=False)


def test_data_max_seq_len_longer_than_the_model_allows(proj):
    Path("long.jsonl").write_text(json.dumps({"text": "x" * 100}) + "\n" + json.dumps({"text": "y" * 90}) + "\n")
    result = invoke("train", "lm.yaml", "data.train=long.jsonl", "data.max_seq_len=100",
                    "model.args.max_seq_len=32")
    assert_user_error(result, "data.max_seq_len", "32")
    assert "training" not in result.stdout      # refused before the run starts


# --------------------------------------------------------------------------- properties

# LORA_FUZZ_EXAMPLES=2000 for a longer hunt; 30 keeps the file fast.
FUZZ = settings(max_examples=int(os.environ.get("LORA_FUZZ_EXAMPLES", "30")), deadline=None, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


@pytest.fixture(scope="module")
def fuzz_dir(tmp_path_factory) -> Path:
    """Read-only data for the property tests (absolute paths, so no chdir is needed)."""
    d = tmp_path_factory.mktemp("fuzz")
    (d / "tab.csv").write_text(csv_text(12, seed=5))
    (d / "cls.csv").write_text(csv_text(12, seed=6, labels=["0", "1", "2"]))
    (d / "text.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS)
                                  + json.dumps({"prompt": "Q: hi", "completion": " A: yo"}) + "\n")
    save_mlp_base(d / "mlp.safetensors", hidden=8)
    return d


REAL_NAMES = ["linear", "layers.0", "layers.1", "head", "layers", "act", "q_proj", "k_proj", "v_proj", "o_proj",
              "gate_proj", "up_proj", "down_proj", "lm_head", "embed_tokens", "norm", "self_attn", "mlp",
              "layers.0.self_attn.q_proj", "input_layernorm", "rope_cos", "dropout"]
JUNK = st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(),
                 st.text(max_size=6), st.lists(st.integers(-2, 2), max_size=2),
                 st.dictionaries(st.text(max_size=3), st.integers(), max_size=2))
INTS = st.one_of(st.integers(-2, 12), st.integers(-(2**70), 2**70), st.sampled_from([2**31, 10**18]))
NUMBERS = st.one_of(st.floats(-2, 2), st.floats(), st.integers(-3, 50),
                    st.sampled_from(["1e-3", "nan", "inf", "-0", "3"]))
NAMES = st.one_of(st.sampled_from(REAL_NAMES), st.text(alphabet="abcdeghklmnopqrsuvy_.0123", max_size=8))
REGEX = st.text(alphabet="().[]*+?|\\^${},_0123456789abdehklmnopqrsuvy", max_size=14)
TARGETS = st.one_of(st.just("all-linear"), st.lists(NAMES, max_size=4), REGEX,
                    st.sampled_from(["layers\\.\\d+", ".*proj", "(", "[", "a{2,1}", ".*", "layers.0|head",
                                     "(?P<x>", "*", "linear", "head"]))


def _or_none(strategy):
    return st.one_of(st.none(), strategy)


# dotted key -> (a plausible value, a wild one: out of range, wrong type, huge, garbage)
FIELDS = {
    "task": (st.sampled_from(["regression", "classification", "causal_lm"]), st.one_of(st.text(max_size=5), JUNK)),
    "data.max_seq_len": (st.integers(2, 64), st.one_of(INTS, JUNK)),
    "data.val_split": (st.floats(0.1, 0.5), st.one_of(NUMBERS, JUNK)),
    "lora.rank": (st.integers(1, 8), st.one_of(INTS, JUNK)),
    "lora.alpha": (st.floats(0.01, 64), st.one_of(NUMBERS, JUNK)),
    "lora.dropout": (st.floats(0, 0.9), st.one_of(NUMBERS, JUNK)),
    "lora.target_modules": (TARGETS, st.one_of(TARGETS, JUNK)),
    "lora.exclude_modules": (st.lists(NAMES, max_size=2), JUNK),
    "lora.use_rslora": (st.booleans(), JUNK),
    "lora.bias": (st.sampled_from(["none", "all", "lora_only"]), st.one_of(st.sampled_from(["lora-only", "All", ""]),
                                                                           JUNK)),
    "lora.modules_to_save": (st.lists(NAMES, max_size=2), st.one_of(st.lists(NAMES, max_size=4), JUNK)),
    "train.epochs": (st.integers(1, 3), st.one_of(INTS, JUNK)),
    "train.max_steps": (_or_none(st.integers(1, 5)), st.one_of(INTS, JUNK)),
    "train.batch_size": (st.integers(1, 32), st.one_of(INTS, JUNK)),
    "train.grad_accum": (st.integers(1, 4), st.one_of(INTS, JUNK)),
    "train.lr": (st.floats(1e-5, 0.5), st.one_of(NUMBERS, JUNK)),
    "train.optimizer": (st.sampled_from(["adamw", "adam", "sgd"]), st.one_of(st.sampled_from(["adamx", "SGD"]), JUNK)),
    "train.weight_decay": (st.floats(0, 0.1), st.one_of(NUMBERS, JUNK)),
    "train.scheduler": (st.sampled_from(["cosine", "linear", "constant"]), st.one_of(st.just("step"), JUNK)),
    "train.warmup_steps": (st.integers(0, 5), st.one_of(INTS, JUNK)),
    "train.clip_grad_norm": (_or_none(st.floats(0.1, 5)), st.one_of(NUMBERS, JUNK)),
    "train.log_every": (st.integers(1, 5), st.one_of(INTS, JUNK)),
    "train.eval_every": (_or_none(st.integers(1, 3)), st.one_of(INTS, JUNK)),
    "train.save_every": (_or_none(st.integers(1, 3)), st.one_of(INTS, JUNK)),
    "train.keep_last": (_or_none(st.integers(1, 3)), st.one_of(INTS, JUNK)),
    "train.resume": (st.sampled_from(["never", "auto"]), st.one_of(st.just("always"), JUNK)),
    "train.on_nan": (st.sampled_from(["stop", "skip"]), st.one_of(st.just("ignore"), JUNK)),
}


@st.composite
def random_config(draw, d: Path) -> dict:
    """A config for a linear/mlp model on a tiny table or a tiny gpt on a tiny jsonl, with
    random fields set: most to plausible values, in half the examples one or two to wild ones."""
    arch = draw(st.sampled_from(["linear", "mlp", "gpt"]))
    task = "causal_lm" if arch == "gpt" else draw(st.sampled_from(["regression", "classification"]))
    train_file = {"causal_lm": "text.jsonl", "classification": "cls.csv", "regression": "tab.csv"}[task]
    args = {"hidden": 8} if arch == "mlp" else dict(GPT_ARGS) if arch == "gpt" else {}
    # the saved base is the regression mlp's (one output)
    base = str(d / "mlp.safetensors") if arch == "mlp" and task == "regression" and draw(st.booleans()) else None
    config = {"seed": draw(st.integers(0, 3)), "device": "cpu", "task": task,
              "model": {"arch": arch, "args": args, "base": base},
              "data": {"train": str(d / train_file)}, "lora": {"rank": 2}, "train": {}}
    if task != "causal_lm" and draw(st.booleans()):
        config["data"]["eval"] = str(d / train_file)
    keys = draw(st.lists(st.sampled_from(sorted(FIELDS)), unique=True, max_size=12))
    wild = set(draw(st.lists(st.sampled_from(keys), unique=True, max_size=2))) if keys and draw(st.booleans()) \
        else set()
    for key in keys:
        plausible, wild_value = FIELDS[key]
        section, _, leaf = key.rpartition(".")
        (config[section] if section else config)[leaf] = draw(wild_value if key in wild else plausible)
    return config


def plan_or_user_error(data: dict):
    """config_from_dict then plan: the Plan, or None after a UserError; anything else fails."""
    try:
        cfg = config_from_dict(data)
    except UserError as err:
        assert str(err)
        event("config refused")
        return None
    try:
        planned = plan(cfg)
    except UserError as err:
        assert str(err)
        event(f"plan refused: {type(err).__name__}")
        return None
    event("planned")
    return planned


F32_MAX = float(torch.finfo(torch.float32).max)


def overflows_float32(cfg) -> bool:
    """The known bug test_values_beyond_float32_are_refused_up_front pins down: a LoRA
    scale or lr beyond float32 passes validation, then crashes mid-run."""
    scale = cfg.lora.alpha / (math.sqrt(cfg.lora.rank) if cfg.lora.use_rslora else cfg.lora.rank)
    return scale > F32_MAX or cfg.train.lr > F32_MAX


def train_once_or_user_error(data: dict) -> None:
    """A real one-step run into a fresh temp dir: it finishes, or it raises a UserError and
    (unless training itself diverged, whose log is kept on purpose) leaves no output_dir."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "out"
        data = {**data, "output_dir": str(out), "train": {**data["train"], "max_steps": 1}}
        try:
            cfg = config_from_dict(data)
        except UserError:
            return
        if overflows_float32(cfg):
            event("train skipped: known float32 overflow bug")
            return
        try:
            result = train(cfg)
        except TrainingError:
            event("train diverged")
        except UserError:
            event("train refused")
            assert not out.exists(), sorted(p.name for p in out.iterdir())
        else:
            event("trained")
            assert (result.adapter_dir / "adapter_model.safetensors").is_file()


@FUZZ
@pytest.mark.filterwarnings("ignore::FutureWarning")   # re's "possible nested set" on random regexes
@given(data=st.data(), run=st.integers(0, 4))
def test_random_configs_plan_or_raise_user_error(fuzz_dir, data, run):
    config = data.draw(random_config(fuzz_dir))
    planned = plan_or_user_error(config)
    if planned is not None:
        assert planned.total_steps >= 1 and planned.summary.trainable > 0
        if run == 0:     # one example in five also trains a step
            train_once_or_user_error(config)


CELL = st.one_of(
    st.floats().map(repr), st.integers(-(10**40), 10**40).map(str), st.floats(-5, 5).map(lambda v: f"{v:.3f}"),
    st.sampled_from(["", " ", "nan", "inf", "-inf", "1e39", "abc", '"1,2"', '"', "1_000", "０", "1e-45",
                     "0x10", "True", "\ufeff1", "1\n2"]),
    st.text(max_size=4),
)


@st.composite
def csv_file(draw) -> str:
    """Mostly a well-formed table of numbers, with now and then an odd header, odd cells,
    ragged rows, blank lines, CRLF, a BOM."""
    header = ["a", "b", "c", "y"] if draw(st.integers(0, 3)) else \
        draw(st.lists(st.sampled_from(["a", "b", "y", "", " y", "Y", "a"]), max_size=5))
    rows = []
    for _ in range(draw(st.integers(0, 8))):
        width = len(header) if draw(st.integers(0, 9)) else draw(st.integers(0, len(header) + 2))
        row = [f"{draw(st.floats(-5, 5)):.3f}" for _ in range(width)]
        if row and draw(st.integers(0, 4)) == 0:
            row[draw(st.integers(0, len(row) - 1))] = draw(CELL)
        rows.append(",".join(row))
    if task_labels := draw(st.sampled_from([None, None, ["0", "1"], ["cat", "dog", " cat "]])):
        rows = [r.rsplit(",", 1)[0] + "," + draw(st.sampled_from(task_labels)) if "," in r else r for r in rows]
    sep = draw(st.sampled_from(["\n", "\r\n"]))
    text = sep.join([",".join(header)] + rows) + draw(st.sampled_from(["", sep, sep + sep]))
    return draw(st.sampled_from(["", "", "\ufeff"])) + text


JSON_VALUE = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-(10**30), 10**30), st.floats(), st.text(max_size=4)),
    lambda inner: st.one_of(st.lists(inner, max_size=2), st.dictionaries(st.text(max_size=2), inner, max_size=2)),
    max_leaves=4)
WORDS = st.text(alphabet="abc xyz,.é€😀", min_size=1, max_size=10)
GOOD_ROW = {
    "regression": st.fixed_dictionaries({"a": st.floats(-3, 3), "b": st.integers(-3, 3), "c": st.just(1),
                                         "y": st.floats(-9, 9)}).map(json.dumps),
    "classification": st.fixed_dictionaries({"a": st.floats(-3, 3), "b": st.integers(-3, 3), "c": st.just(1),
                                             "y": st.sampled_from([0, 1, "1", "cat"])}).map(json.dumps),
    "causal_lm": st.one_of(
        st.fixed_dictionaries({"text": WORDS}).map(json.dumps),
        st.fixed_dictionaries({"prompt": st.text(max_size=6), "completion": WORDS}).map(json.dumps)),
}
ODD_LINE = st.one_of(
    st.fixed_dictionaries({"a": JSON_VALUE, "b": JSON_VALUE, "c": JSON_VALUE, "y": JSON_VALUE}).map(json.dumps),
    st.dictionaries(st.sampled_from(["a", "b", "c", "y", "text", "prompt", "completion"]), JSON_VALUE,
                    max_size=4).map(json.dumps),
    JSON_VALUE.map(json.dumps),
    st.text(max_size=8),
    st.sampled_from(['{"a": NaN, "b": 1, "c": 1, "y": 1}', '{"a": 1e999, "b": 1, "c": 1, "y": 1}',
                     '{"text": "\\ud800"}', "", "[]", '{"text": ""}', '{"a": 1', "\ufeff{}"]),
)


@FUZZ
@given(text=csv_file(), task=st.sampled_from(["regression", "classification"]),
       arch=st.sampled_from(["linear", "mlp"]), as_eval=st.booleans())
def test_random_csv_data_plans_or_raises_user_error(fuzz_dir, text, task, arch, as_eval):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "data.csv"
        path.write_bytes(text.encode("utf-8", "surrogatepass"))
        good = fuzz_dir / ("cls.csv" if task == "classification" else "tab.csv")
        data = {"train": str(good), "eval": str(path)} if as_eval else {"train": str(path)}
        plan_or_user_error({"device": "cpu", "task": task, "model": {"arch": arch, "base": None},
                            "data": data, "lora": {"rank": 1}})


@FUZZ
@given(task=st.sampled_from(["regression", "classification", "causal_lm"]), max_seq_len=st.integers(2, 16),
       data=st.data())
def test_random_jsonl_data_plans_or_raises_user_error(fuzz_dir, task, max_seq_len, data):
    good = GOOD_ROW[task]
    one_in_six_odd = st.integers(0, 5).flatmap(lambda i: ODD_LINE if i == 0 else good)
    lines = data.draw(st.lists(one_in_six_odd, max_size=6))
    sep = data.draw(st.sampled_from(["\n", "\r\n"]))
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "data.jsonl"
        path.write_bytes(sep.join(lines).encode("utf-8", "surrogatepass"))
        arch, args = ("gpt", dict(GPT_ARGS)) if task == "causal_lm" else ("mlp", {"hidden": 4})
        plan_or_user_error({"device": "cpu", "task": task, "model": {"arch": arch, "args": args, "base": None},
                            "data": {"train": str(path), "max_seq_len": max_seq_len}, "lora": {"rank": 1}})
