"""Tests for lora_cli.run.config: schema defaults, overrides, validation messages, YAML loading."""

from __future__ import annotations

import subprocess
import sys

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from lora_cli.run.config import (
    REQUIRED, Config, LoraSection, TrainSection, apply_overrides, config_from_dict,
    config_to_dict, describe_schema, diff_fields, dump_config, load_config,
)
from lora_cli.errors import ConfigError, closest


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """A current directory holding a training file, so configs can use relative paths."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "train.csv").write_text("x,y\n1,2\n")
    return tmp_path


def minimal() -> dict:
    return {"model": {"arch": "mlp", "base": None}, "data": {"train": "train.csv"}}


def problems_of(data, overrides=(), **kw) -> list[str]:
    with pytest.raises(ConfigError) as info:
        config_from_dict(data, overrides, **kw)
    return info.value.problems


def with_value(dotted: str, value) -> dict:
    data = minimal()
    section, _, key = dotted.rpartition(".")
    (data.setdefault(section, {}) if section else data)[key] = value
    return data


# --------------------------------------------------------------------------- defaults

def test_minimal_config_gets_documented_defaults(workdir):
    cfg = config_from_dict(minimal())
    assert cfg.lora == LoraSection() and cfg.train == TrainSection()
    assert (cfg.seed, cfg.device, cfg.dtype, cfg.task) == (0, "auto", "float32", "regression")
    assert cfg.model.base is None and cfg.model.args == {} and cfg.data.train == "train.csv"
    schema = describe_schema()
    assert schema["lora.rank"] == ("int", 8, schema["lora.rank"].doc)
    assert schema["model.base"].default is REQUIRED and schema["data.train"].default is REQUIRED
    assert schema["lora.target_modules"].type == "list[str] | str"
    for path, info in schema.items():
        assert info.doc and "\n" not in info.doc, path
        if info.default is not REQUIRED and path != "model.arch":
            node = cfg
            for part in path.split("."):
                node = getattr(node, part)
            assert node == info.default, path


def test_defaults_round_trip_through_dict_yaml_and_file(workdir):
    cfg = config_from_dict(minimal(), ["model.args.hidden=[8, 4]", "lora.target_modules=[fc1]"])
    assert config_from_dict(config_to_dict(cfg)) == cfg
    text = dump_config(cfg)
    assert config_from_dict(yaml.safe_load(text)) == cfg
    (workdir / "cfg.yaml").write_text(text)
    assert load_config(workdir / "cfg.yaml") == cfg


def test_config_module_does_not_import_torch():
    code = "import sys, lora_cli.run.config; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


# --------------------------------------------------------------------------- overrides

def test_overrides_are_parsed_as_yaml_values(workdir):
    cfg = config_from_dict(minimal(), [
        "lora.rank=4", "train.lr=1e-3", "lora.alpha=32", "lora.use_rslora=true",
        "lora.target_modules=[q_proj,v_proj]", "train.clip_grad_norm=null",
        "model.args.hidden=64", "device=cuda:1", "data.features=[x]",
    ])
    assert cfg.lora.rank == 4 and type(cfg.lora.rank) is int
    assert cfg.train.lr == 1e-3 and type(cfg.train.lr) is float  # "1e-3" reads as a string in YAML
    assert cfg.lora.alpha == 32.0 and type(cfg.lora.alpha) is float
    assert cfg.lora.use_rslora is True and cfg.train.clip_grad_norm is None
    assert cfg.lora.target_modules == ["q_proj", "v_proj"]
    assert cfg.model.args == {"hidden": 64} and cfg.device == "cuda:1" and cfg.data.features == ["x"]


def test_override_can_set_base_to_null_or_a_path(workdir):
    (workdir / "w.pt").write_bytes(b"")
    assert config_from_dict(minimal(), ["model.base=w.pt"]).model.base == "w.pt"
    data = minimal()
    del data["model"]["base"]
    assert config_from_dict(data, ["model.base=null"]).model.base is None


def test_apply_overrides_creates_sections_and_leaves_input_untouched():
    data = {"lora": {"rank": 8}}
    out = apply_overrides(data, ["lora.rank=2", "train.lr=0.1", "model.args.depth=3"])
    assert out == {"lora": {"rank": 2}, "train": {"lr": 0.1}, "model": {"args": {"depth": 3}}}
    assert data == {"lora": {"rank": 8}}
    assert apply_overrides({"lora": None}, ["lora.rank=2"]) == {"lora": {"rank": 2}}


def test_bad_overrides_are_all_reported_by_name():
    with pytest.raises(ConfigError) as info:
        apply_overrides({"lora": {"rank": 8}}, ["lora.rank", "=3", "a..b=1", "lora.rank.x=1", "x=[1"])
    problems = info.value.problems
    assert len(problems) == 5
    assert problems[0].startswith("override 'lora.rank': expected dotted.key=value")
    assert problems[1].startswith("override '=3'") and problems[2].startswith("override 'a..b=1'")
    assert "lora.rank is not a section" in problems[3]
    assert "not valid YAML" in problems[4]


def test_errors_an_override_causes_name_the_override_not_the_file(workdir):
    path = workdir / "c.yaml"
    path.write_text(yaml.safe_dump({**minimal(), "train": {"lrr": 1}}))
    with pytest.raises(ConfigError) as info:
        load_config(path, ["oops"])
    assert info.value.where is None and str(info.value).startswith("override 'oops': expected dotted.key=value")

    path.write_text(yaml.safe_dump(minimal()))
    for override in ("lora.rank=0", "lora={rank: 0}"):
        with pytest.raises(ConfigError) as info:
            load_config(path, ["train.lr=0.1", override])
        assert info.value.where == f"override {override}"
        assert info.value.problems == ["lora.rank: must be an integer >= 1, got 0"]
    with pytest.raises(ConfigError) as info:
        load_config(path, ["lora.rank=0", "train.lrr=1"])
    assert info.value.where == "command-line overrides"
    assert info.value.problems[0].endswith("(override lora.rank=0)")
    assert info.value.problems[1].endswith("(override train.lrr=1)")

    path.write_text(yaml.safe_dump({**minimal(), "train": {"epochz": 2}}))
    with pytest.raises(ConfigError) as info:
        load_config(path, ["lora.rank=0"])
    assert info.value.where == str(path)      # the file is wrong too: each problem says whose it is
    by_key = {p.split(":")[0]: p for p in info.value.problems}
    assert by_key["lora.rank"].endswith("(override lora.rank=0)")
    assert "override" not in by_key["train.epochz"]


# --------------------------------------------------------------------------- unknown keys

@pytest.mark.parametrize("dotted, message", [
    ("sede", "sede: unknown key (did you mean 'seed'?)"),
    ("model.arc", "model.arc: unknown key (did you mean 'arch'?)"),
    ("model.clas_path", "model.clas_path: unknown key (did you mean 'class_path'?)"),
    ("data.val_splt", "data.val_splt: unknown key (did you mean 'val_split'?)"),
    ("lora.rnak", "lora.rnak: unknown key (did you mean 'rank'?)"),
    ("lora.target_module", "lora.target_module: unknown key (did you mean 'target_modules'?)"),
    ("train.epoch", "train.epoch: unknown key (did you mean 'epochs'?)"),
    ("train.optimiser", "train.optimiser: unknown key (did you mean 'optimizer'?)"),
    ("rank", "rank: unknown key (did you mean 'lora.rank'? it belongs in the lora section)"),
    ("lora.lr", "lora.lr: unknown key (did you mean 'train.lr'? it belongs in the train section)"),
    ("train.seed", "train.seed: unknown key (did you mean 'seed'? it belongs at the top level)"),
])
def test_unknown_keys_suggest_the_intended_key(workdir, dotted, message):
    assert problems_of(with_value(dotted, 1)) == [message]


@pytest.mark.parametrize("dotted, value, says", [
    ("lora.r", 8, "lora.rank"), ("r", 8, "lora.rank"), ("lora.lora_alpha", 16, "lora.alpha"),
    ("lora_dropout", 0.1, "lora.dropout"), ("lora.lora_target_modules", ["q"], "lora.target_modules"),
    ("train.learning_rate", 1e-3, "train.lr"), ("num_train_epochs", 3, "train.epochs"),
    ("train.num_epochs", 3, "train.epochs"), ("per_device_train_batch_size", 8, "train.batch_size"),
    ("train.micro_batch_size", 2, "train.batch_size"), ("gradient_accumulation_steps", 4, "train.grad_accum"),
    ("lr_scheduler_type", "cosine", "train.scheduler: cosine, linear or constant"),
    ("bf16", True, "dtype: bfloat16"), ("fp16", True, "dtype: float16"),
    ("sequence_len", 512, "data.max_seq_len"), ("train.max_grad_norm", 1.0, "train.clip_grad_norm"),
    ("warmup_ratio", 0.03, "set train.warmup_steps to 0.03 x the run's total steps"),
])
def test_other_tools_key_names_map_to_lora_cli_keys(workdir, dotted, value, says):
    [problem] = problems_of(with_value(dotted, value))
    assert problem.startswith(f"{dotted}: unknown key; ") and says in problem
    assert "did you mean" not in problem


def test_keys_in_the_wrong_section_name_the_right_one(workdir):
    data = minimal() | {"train": {"target_modules": ["q"], "output_dir": "x", "max_steps": 3}}
    assert problems_of(data) == [
        "train.target_modules: unknown key (did you mean 'lora.target_modules'? it belongs in the lora section)",
        "train.output_dir: unknown key (did you mean 'output_dir'? it belongs at the top level)"]
    assert problems_of(minimal() | {"max_steps": 3}) == [
        "max_steps: unknown key (did you mean 'train.max_steps'? it belongs in the train section)"]


@pytest.mark.parametrize("dotted, value, hint", [
    ("device", "gpu", "(did you mean 'cuda'?)"), ("dtype", "bf16", "(did you mean 'bfloat16'?)"),
    ("train.optimizer", "adamw_torch", "(did you mean 'adamw'?)"), ("train.scheduler", "cosin", "(did you mean 'cosine'?)"),
    ("train.optimizer", "lion", ""), ("task", "summarization", ""),
])
def test_choices_suggest_only_a_close_or_known_equivalent(workdir, dotted, value, hint):
    [problem] = problems_of(with_value(dotted, value))
    assert problem.endswith(hint) and (hint or "did you mean" not in problem)


@pytest.mark.parametrize("word, options, expected", [
    ("rnak", ["rank", "alpha"], "rank"), ("adamx", ["adamw", "adam", "sgd"], "adamw"), ("y", ["a", "yy"], "yy"),
    ("optim", ["optimizer", "epochs"], "optimizer"), ("EPOCHS", ["epochs"], "epochs"),
    ("warmup_ratio", ["warmup_steps"], None), ("max_length", ["max_steps"], None), ("y", ["a", "b"], None),
    ("lerning_rate", ["lr", "epochs"], None), ("", ["a"], None),
])
def test_did_you_mean_only_when_close(word, options, expected):
    assert closest(word, options) == expected


def test_unknown_key_without_close_match_lists_allowed_keys(workdir):
    [problem] = problems_of(with_value("lora.zzz", 1))
    assert problem.startswith("lora.zzz: unknown key; allowed keys: rank, alpha, dropout")


def test_non_string_keys_are_reported_not_crashed_on(workdir):
    problems = problems_of(with_value("lora.x", 1) | {3: "a"})
    assert problems[0].startswith("3: unknown key; allowed keys: seed") and problems[1].startswith("lora.x")


# --------------------------------------------------------------------------- types and ranges

@pytest.mark.parametrize("dotted, value, message", [
    ("lora.rank", 0, "lora.rank: must be an integer >= 1, got 0"),
    ("lora.rank", True, "lora.rank: must be an integer >= 1, got true"),
    ("lora.rank", 2.5, "lora.rank: must be an integer >= 1, got 2.5"),
    ("lora.rank", "8", "lora.rank: must be an integer >= 1, got '8'"),
    ("lora.alpha", 0, "lora.alpha: must be a number > 0 and <= 3.4e38, got 0"),
    ("lora.dropout", 1.0, "lora.dropout: must be a number >= 0 and < 1, got 1.0"),
    ("lora.dropout", float("nan"), "lora.dropout: must be a number >= 0 and < 1, got nan"),
    ("lora.use_rslora", "yes", "lora.use_rslora: must be true or false, got 'yes'"),
    ("lora.bias", "some", "lora.bias: must be one of none, all, lora_only, got 'some'"),
    ("lora.target_modules", [], "lora.target_modules: must be a non-empty list of strings or a non-empty string"),
    ("lora.target_modules", ["q", 1], "lora.target_modules: must be a non-empty list of strings"),
    ("lora.target_modules", "((", "lora.target_modules: not a valid regular expression (missing )"),
    ("lora.exclude_modules", "q", "lora.exclude_modules: must be a list of strings, got 'q'"),
    ("train.optimizer", "adamx",
     "train.optimizer: must be one of adamw, adam, sgd, got 'adamx' (did you mean 'adamw'?)"),
    ("train.scheduler", "Cosine", "train.scheduler: must be one of cosine, linear, constant, got 'Cosine' "
     "(did you mean 'cosine'?)"),
    ("train.lr", "fast", "train.lr: must be a number > 0 and <= 3.4e38, got 'fast'"),
    ("train.lr", -1e-3, "train.lr: must be a number > 0 and <= 3.4e38, got -0.001"),
    ("train.max_steps", 0, "train.max_steps: must be an integer >= 1 or null, got 0"),
    ("train.clip_grad_norm", 0, "train.clip_grad_norm: must be a number > 0 or null, got 0"),
    ("train.weight_decay", -0.1, "train.weight_decay: must be a number >= 0, got -0.1"),
    ("train.warmup_steps", -1, "train.warmup_steps: must be an integer >= 0, got -1"),
    ("train.eval_every", 0, "train.eval_every: must be an integer >= 1 or null, got 0"),
    ("data.val_split", 1.5, "data.val_split: must be a number > 0 and < 1 or null, got 1.5"),
    ("data.max_seq_len", 1, "data.max_seq_len: must be an integer >= 2, got 1"),
    ("data.features", ["x", "y"], "data.features: must not include the target column 'y'"),
    ("data.train", "train.parquet",
     "data.train: unsupported file type '.parquet' for task 'regression', expected .csv or .jsonl"),
    ("data.eval", "eval.txt", "data.eval: unsupported file type '.txt' for task 'regression', expected"),
    ("device", "cuda:x", "device: must be one of auto, cpu, cuda, cuda:N, mps, got 'cuda:x'"),
    ("device", "gpu", "device: must be one of auto, cpu, cuda, cuda:N, mps, got 'gpu'"),
    ("dtype", "fp16", "dtype: must be one of float32, bfloat16, float16, got 'fp16'"),
    ("task", "ranking", "task: must be one of regression, classification, causal_lm, got 'ranking'"),
    ("seed", -1, "seed: must be an integer >= 0 and <= 4294967295, got -1"),
    ("output_dir", "", "output_dir: must be a non-empty string, got ''"),
    ("model.args", [1], "model.args: must be a mapping with string keys, got [1]"),
    ("model.args", {1: 2}, "model.args: must be a mapping with string keys, got {1: 2}"),
    ("model.class_path", "my_model.Net",
     "model.class_path: must look like 'package.module:ClassName', got 'my_model.Net'"),
    ("lora", 3, "lora: must be a section (a mapping of keys), got 3"),
    ("train", ["lr"], "train: must be a section (a mapping of keys), got ['lr']"),
])
def test_bad_values_are_reported_with_key_path(workdir, dotted, value, message):
    problems = problems_of(with_value(dotted, value))
    assert any(p.startswith(message) for p in problems), problems


@pytest.mark.parametrize("dotted, value, expected", [
    ("lora.alpha", 8, 8.0),                # int where a float is expected
    ("train.lr", "1e-4", 1e-4),            # YAML 1.1 reads 1e-4 as a string
    ("device", "cuda:3", "cuda:3"),
    ("train.clip_grad_norm", None, None),
    ("lora.target_modules", r".*\.(q|v)_proj", r".*\.(q|v)_proj"),
    ("lora.target_modules", ("q", "v"), ["q", "v"]),
    ("lora", None, LoraSection()),         # `lora:` with everything under it commented out
    ("model.args", {"n": {"deep": [1, None]}}, {"n": {"deep": [1, None]}}),
])
def test_accepted_values_are_converted(workdir, dotted, value, expected):
    node = config_from_dict(with_value(dotted, value))
    for part in dotted.split("."):
        node = getattr(node, part)
    assert node == expected and type(node) is type(expected)


def test_all_problems_are_reported_together(workdir):
    data = {
        "model": {"arch": "mlp"},
        "data": {"train": "missing.csv"},
        "lora": {"rank": 0, "rnak": 4, "dropout": 2},
        "train": {"optimizer": "adamx", "lr": "x"},
        "device": "gpu",
    }
    err = pytest.raises(ConfigError, config_from_dict, data).value
    paths = [p.split(":")[0] for p in err.problems]
    assert sorted(paths) == sorted(["model.base", "data.train", "lora.rank", "lora.rnak",
                                    "lora.dropout", "train.optimizer", "train.lr", "device"])
    assert str(err).startswith("<dict>: 8 problems:")


# --------------------------------------------------------------------------- required keys, files

def test_missing_base_key_is_an_error_but_explicit_null_is_allowed(workdir):
    data = minimal()
    assert config_from_dict(data).model.base is None
    del data["model"]["base"]
    assert problems_of(data) == [
        "model.base: required: a path to the base weights (.pt or .safetensors), "
        "or null to start from random weights (demo only)"]


def test_missing_sections_report_their_required_keys(workdir):
    problems = problems_of({})
    assert problems[0].startswith("model.base: required")
    assert problems[1].startswith("data.train: required")
    assert "got none" in problems[2]


def test_missing_files_are_reported_per_key(workdir):
    data = with_value("model.base", "w.safetensors")
    data["data"] |= {"train": "nope.csv", "eval": "gone.jsonl"}
    err = pytest.raises(ConfigError, config_from_dict, data).value
    assert err.problems == ["data.train: file not found: nope.csv", "data.eval: file not found: gone.jsonl",
                            "model.base: file not found: w.safetensors"]
    assert str(workdir) in err.fix
    assert config_from_dict(data, check_files=False).data.eval == "gone.jsonl"
    (workdir / "w.safetensors").mkdir()
    assert "model.base: not a file: w.safetensors" in problems_of(data)


def test_paths_are_relative_to_the_current_directory_not_the_config(workdir):
    (workdir / "configs").mkdir()
    (workdir / "configs" / "run.yaml").write_text(yaml.safe_dump(minimal()))
    assert load_config(workdir / "configs" / "run.yaml").data.train == "train.csv"
    (workdir / "configs" / "train.csv").write_text("x,y\n")
    (workdir / "train.csv").unlink()
    with pytest.raises(ConfigError, match="data.train: file not found: train.csv"):
        load_config("configs/run.yaml")


# --------------------------------------------------------------------------- cross-field checks

def test_eval_and_val_split_are_exclusive(workdir):
    (workdir / "eval.csv").write_text("x,y\n")
    assert config_from_dict(with_value("data.val_split", 0.2)).data.val_split == 0.2
    assert config_from_dict(with_value("data.eval", "eval.csv")).data.eval == "eval.csv"
    data = with_value("data.eval", "eval.csv")
    data["data"]["val_split"] = 0.2
    [problem] = problems_of(data)
    assert problem.startswith("data.val_split: cannot be combined with data.eval")


@pytest.mark.parametrize("model, expected", [
    ({"arch": "mlp", "class_path": "pkg.mod:Net"}, "got arch and class_path"),
    ({}, "got none"),
    ({"arch": None, "class_path": None}, "got none"),
])
def test_model_sources_are_exclusive(workdir, model, expected):
    [problem] = problems_of({"model": {"base": None, **model}, "data": {"train": "train.csv"}})
    assert problem.startswith("model: set exactly one of model.arch") and problem.endswith(expected)


def test_hf_model_needs_no_base_and_refuses_one(workdir):
    (workdir / "hf-model").mkdir()
    cfg = config_from_dict({"task": "causal_lm", "model": {"hf": "hf-model"}, "data": {"train": "train.jsonl"}},
                           check_files=False)
    assert cfg.model.hf == "hf-model" and cfg.model.base is None
    problems = problems_of({"task": "causal_lm", "model": {"hf": "gone", "base": "w.pt"},
                            "data": {"train": "train.jsonl"}})
    assert any(p.startswith("model.base: not used with model.hf") for p in problems)
    assert "model.hf: directory not found: gone" in problems
    regression = problems_of({"model": {"hf": "hf-model"}, "data": {"train": "train.csv"}})
    assert any("supports causal_lm and classification" in p for p in regression)


def test_data_file_types_depend_on_the_task(workdir):
    (workdir / "corpus.txt").write_text("hello")
    data = with_value("data.train", "corpus.txt")
    assert "for task 'regression'" in problems_of(data)[0]
    assert config_from_dict(data | {"task": "causal_lm"}).data.train == "corpus.txt"


def test_class_path_is_checked_for_shape_but_not_imported(workdir):
    cfg = config_from_dict({"model": {"class_path": "no_such_pkg.models:Net", "base": None,
                                      "args": {"d": 4}}, "data": {"train": "train.csv"}})
    assert cfg.model.class_path == "no_such_pkg.models:Net" and cfg.model.arch is None
    assert "no_such_pkg" not in sys.modules


# --------------------------------------------------------------------------- YAML loading

@pytest.mark.parametrize("text, fragment", [
    ("model:\n  arch: mlp\n   base: x\n", "invalid YAML at line 3, column 8"),
    ("model:\n\tarch: mlp\n", "invalid YAML at line 2, column 1"),
    ("lora: [1, 2\n", "invalid YAML at line 2"),
    ("lora:\n  rank: 2\nlora:\n  rank: 3\n", "invalid YAML at line 3, column 1: duplicate key 'lora'"),
])
def test_malformed_yaml_reports_file_and_line(workdir, text, fragment):
    path = workdir / "bad.yaml"
    path.write_text(text)
    err = pytest.raises(ConfigError, load_config, path).value
    assert fragment in err.what and err.where == str(path) and str(path) in str(err)


def test_self_referencing_yaml_anchor_is_a_config_error(workdir):
    (workdir / "c.yaml").write_text("model: {arch: mlp, base: null, args: &a {x: *a}}\ndata: {train: train.csv}\n")
    with pytest.raises(ConfigError, match="model.args: must be a mapping with string keys"):
        load_config("c.yaml")


@pytest.mark.parametrize("text, fragment", [
    ("", "the config file is empty"),
    ("- a\n- b\n", "the top level must be a mapping"),
    ("just a string\n", "the top level must be a mapping"),
])
def test_config_file_without_a_mapping_is_an_error(workdir, text, fragment):
    (workdir / "c.yaml").write_text(text)
    with pytest.raises(ConfigError, match=fragment):
        load_config("c.yaml")


def test_unreadable_config_file_is_a_config_error(workdir):
    with pytest.raises(ConfigError, match="config file not found") as info:
        load_config("nope.yaml")
    assert info.value.where == "nope.yaml"
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_config(workdir)
    (workdir / "bin.yaml").write_bytes(b"\xff\xfe\x00")
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_config("bin.yaml")


def test_load_config_applies_overrides_and_converts_yaml_floats(workdir):
    (workdir / "c.yaml").write_text(
        "model: {arch: gpt, base: null}\ndata: {train: train.csv}\ntrain:\n  lr: 1e-4\n")
    cfg = load_config("c.yaml", ["train.epochs=1", "lora.rank=2"])
    assert (cfg.train.lr, cfg.train.epochs, cfg.lora.rank) == (1e-4, 1, 2)


# --------------------------------------------------------------------------- diff_fields

def test_diff_fields_names_changed_leaves(workdir):
    a = config_from_dict(minimal(), ["model.args.hidden=8"])
    assert diff_fields(a, a) == []
    b = config_from_dict(config_to_dict(a), ["lora.rank=4", "train.lr=0.01", "model.args.depth=2"])
    assert sorted(diff_fields(a, b)) == ["lora.rank", "model.args.depth", "train.lr"]


# --------------------------------------------------------------------------- property

_KEYS = st.sampled_from(sorted({p.split(".")[-1] for p in describe_schema()}
                               | {"model", "data", "lora", "train"})) | st.text(max_size=6) | st.integers()
_SCALARS = (st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8)
            | st.sampled_from(["train.csv", "all-linear", "(", "mlp", "1e-4", "cuda:0", "a.b:C"]))
_LEAVES = _SCALARS | st.lists(_SCALARS, max_size=3)
_SECTION = st.dictionaries(_KEYS, _LEAVES | st.dictionaries(_KEYS, _LEAVES, max_size=3), max_size=5)


@st.composite
def _near_valid(draw) -> dict:
    """A valid minimal config with a few schema fields set to random values."""
    data = minimal()
    for path, info in draw(st.lists(st.sampled_from(list(describe_schema().items())), max_size=4)):
        section, _, key = path.rpartition(".")
        good = st.just(info.default) | st.integers(1, 5) | st.floats(0.01, 0.99) | st.sampled_from(["a", "mlp"])
        (data.setdefault(section, {}) if section else data)[key] = draw(good | _LEAVES)
    return data


@settings(max_examples=120, deadline=None)
@given(data=_near_valid() | st.dictionaries(_KEYS, _LEAVES | _SECTION, max_size=8) | _LEAVES,
       overrides=st.just(()) | st.lists(st.text(max_size=12) | st.sampled_from(
           ["lora.rank=2", "model.base=null", "train.lr=1e-3", "lora=3", "x.y.z=[1"]), max_size=3),
       check_files=st.booleans())
def test_any_input_gives_a_config_or_a_config_error(data, overrides, check_files):
    try:
        cfg = config_from_dict(data, overrides, check_files=check_files)
    except ConfigError as err:
        assert err.problems and all(isinstance(p, str) and p for p in err.problems)
    else:
        assert isinstance(cfg, Config)
        assert config_from_dict(config_to_dict(cfg), check_files=False) == cfg
