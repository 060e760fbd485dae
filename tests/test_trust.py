"""Trust boundaries: what lora-cli reads never runs code or destroys data, and a run owns
its folder. One section per point of issue 14 (point 2, Hugging Face folders that need
their own code, is in test_hf.py):

  1  an adapter's class_path, model_args and search_path are data: nothing is imported
     unless the user confirms it (--model-code, --trust-adapter-code) or passes the config
  3  a model folder's symlinks and shard index never lead a merge out of the folder
  4  --force replaces only an earlier output of the same kind: never an input, . or ..
  5  --weights is one comma-separated list, one weight per adapter; all else is refused
  6  the output format follows -o's suffix; a value the output dtype cannot hold, or a
     NaN/inf in the base (train, eval, merge), is refused naming the tensor
  7  resume refuses data files or base weights that changed since the checkpoint
  8  one run per output_dir (an OS lock naming the holder's PID); what killed processes
     left behind is removed by the next one

The project and the checks (exit 2, one message, the project directory unchanged) are
test_errors.py's.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from test_errors import (  # noqa: F401  (proj and trained are fixtures)
    assert_user_error, csv_text, describe, invoke, proj, save_mlp_base, trained)
from conftest import fault_env
from lora_cli.lora.adapter import read_adapter
from lora_cli.errors import UserError
from lora_cli.lora.files import remove_stale_temps, temp_path
from lora_cli.run.lock import LOCK_NAME, run_lock
from lora_cli.lora.merge import merge_state_dict
from lora_cli.lora.merge_files import MERGE_MARKER

ROOT = Path(__file__).resolve().parents[1]
WEIGHTS = "adapter_model.safetensors"


def ok(result) -> str:
    assert result.exit_code == 0, describe(result)
    return result.output


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def dead_pid() -> int:
    """The PID of a process that has exited (and been reaped)."""
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


# --------------------------------------------------------------------------- 1: adapter code

def tamper(adapter: Path, model: dict, model_args: dict, **meta) -> None:
    """Rewrite the model an adapter records, in adapter_config.json and in the safetensors
    header alike (the header is what the .safetensors file alone is read by)."""
    config_file = adapter / "adapter_config.json"
    config = json.loads(config_file.read_text())
    own = config["lora_cli"]
    own["config"]["model"] = {**own["config"]["model"], **model}
    own["model_args"] = model_args
    own.update(meta)
    config_file.write_text(json.dumps(config))
    weights = adapter / "adapter_model.safetensors"
    save_file(load_file(weights), weights, metadata={"format": "pt", "adapter_config": json.dumps(config)})


def malicious(project: Path, form: str) -> tuple[Path, str]:
    """Make run/adapter ask to run code that creates a marker file: ``os:system`` with a
    shell command, or a module shipped beside the adapter (its search_path points there)
    that creates it on import and then builds the real model, so nothing looks wrong."""
    marker = project / f"MARKER-{form}"
    adapter = project / "run" / "adapter"
    if form == "os-system":
        tamper(adapter, {"arch": None, "class_path": "os:system"}, {"command": f"touch {marker}"})
        return marker, "os:system"
    name = f"evil_{uuid.uuid4().hex[:8]}"
    code = adapter / "code"
    code.mkdir()
    (code / f"{name}.py").write_text(f"import pathlib\npathlib.Path({str(marker)!r}).touch()\n"
                                     "from lora_cli.models.builtin import MLP as Net\n")
    args = json.loads((adapter / "adapter_config.json").read_text())["lora_cli"]["model_args"]
    tamper(adapter, {"arch": None, "class_path": f"{name}:Net"}, args, search_path=str(code))
    return marker, f"{name}:Net"


COMMANDS = {
    "eval": ("eval", "run/adapter"),
    "eval-safetensors-alone": ("eval", "run/adapter/adapter_model.safetensors"),
    "merge-verify": ("merge", "base.safetensors", "run/adapter", "-o", "merged.safetensors", "--verify"),
}


@pytest.mark.parametrize("form", ["os-system", "module-beside-the-adapter"])
def test_a_malicious_adapter_runs_no_code(trained, form):
    marker, class_path = malicious(trained, form)
    for command in COMMANDS.values():
        err = assert_user_error(invoke(*command), f"asks to import '{class_path}'", f"--model-code {class_path}",
                                "--trust-adapter-code")
        assert not marker.exists(), command
        if form == "os-system":
            assert "touch" in err            # what it would be called with is shown
    assert not (trained / "merged.safetensors").exists()


def test_trusting_an_adapter_still_never_imports_from_a_folder_it_names(trained):
    marker, class_path = malicious(trained, "module-beside-the-adapter")
    module = class_path.partition(":")[0]
    assert_user_error(invoke("eval", "run/adapter", "--trust-adapter-code"), f"no module named '{module}'")
    assert not marker.exists()


def test_builtin_arch_args_are_checked_not_called_blindly(trained):
    marker = trained / "MARKER"
    tamper(trained / "run" / "adapter", {}, {"command": f"touch {marker}", "in_features": 3})
    assert_user_error(invoke("eval", "run/adapter"), "unexpected argument 'command'")
    assert not marker.exists()


USER_MODEL = '''
import torch.nn as nn


class Reg(nn.Module):
    def __init__(self, n_in=3, hidden=8):
        super().__init__()
        self.body = nn.Linear(n_in, hidden)
        self.head = nn.Linear(hidden, 1)

    def forward(self, x):
        return self.head(self.body(x).tanh())
'''


@pytest.fixture
def own_model(proj: Path) -> str:
    """A run of the user's own model class: code/<module>.py beside code/own.yaml, a base
    saved from it, trained into own/. The module is unloaded again afterwards, so every
    later use imports it afresh."""
    import yaml

    name = f"user_model_{uuid.uuid4().hex[:8]}"
    (proj / "code").mkdir()
    (proj / "code" / f"{name}.py").write_text(USER_MODEL)
    spec = importlib.util.spec_from_file_location(name, proj / "code" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    torch.manual_seed(5)
    save_file(module.Reg().state_dict(), proj / "own_base.safetensors")
    config = {"seed": 0, "device": "cpu", "task": "regression", "output_dir": "own",
              "model": {"class_path": f"{name}:Reg", "base": "own_base.safetensors"},
              "data": {"train": "train.csv", "eval": "eval.csv"}, "lora": {"rank": 2, "alpha": 4},
              "train": {"max_steps": 3, "batch_size": 8, "lr": 0.05}}
    (proj / "code" / "own.yaml").write_text(yaml.safe_dump(config))
    ok(invoke("train", "code/own.yaml"))
    sys.modules.pop(name, None)
    yield name
    sys.modules.pop(name, None)


def test_an_adapter_of_your_own_model_needs_your_confirmation(own_model: str):
    class_path = f"{own_model}:Reg"
    assert_user_error(invoke("eval", "own/adapter"), f"asks to import '{class_path}'", f"--model-code {class_path}")
    # confirmed, it is imported from --model-path (or the current directory), never from a folder the adapter names
    assert_user_error(invoke("eval", "own/adapter", "--model-code", class_path), f"no module named '{own_model}'")
    confirmed = ok(invoke("eval", "own/adapter", "--model-code", class_path, "--model-path", "code", "--json"))
    assert f"importing {class_path} (--model-code) from {Path('code').resolve() / own_model}.py" in \
        " ".join(confirmed.split())
    sys.modules.pop(own_model, None)
    trusted = ok(invoke("eval", "own/adapter", "--trust-adapter-code", "--model-path", "code"))
    assert f"importing {class_path} (--trust-adapter-code)" in trusted
    # the training config is the user's own: its class_path is used as in training
    by_config = invoke("eval", "code/own.yaml", "--json")
    by_adapter = invoke("eval", "own/adapter", "--model-code", class_path, "--model-path", "code", "--json")
    ok(by_config)
    ok(by_adapter)
    assert json.loads(by_config.stdout)["adapted"] == json.loads(by_adapter.stdout)["adapted"]
    verified = ok(invoke("merge", "own_base.safetensors", "own/adapter", "--verify", "--model-code", class_path,
                         "--model-path", "code"))
    assert "verify" in verified and "ok" in verified


def test_model_code_flags_that_mean_nothing_are_refused(trained):
    for args, expect in [(("eval", "run/adapter", "--model-code", "x:Y"), "built-in arch 'mlp'"),
                         (("eval", "config.yaml", "--trust-adapter-code"), "are for adapters"),
                         (("merge", "base.safetensors", "run/adapter", "--model-code", "x:Y"),
                          "only matter with --verify")]:
        assert_user_error(invoke(*args), expect)


def test_model_code_flags_are_checked(own_model: str):
    assert_user_error(invoke("eval", "own/adapter", "--model-code", "not a path"), "--model-code", "must look like")
    assert_user_error(invoke("eval", "own/adapter", "--model-code", f"{own_model}:Reg", "--trust-adapter-code"),
                      "pass one of them")
    assert_user_error(invoke("eval", "own/adapter", "--model-path", "code"), "nothing allows the import")
    assert_user_error(invoke("eval", "own/adapter", "--model-code", f"{own_model}:Reg", "--model-path", "nowhere"),
                      "--model-path nowhere", "folder not found")


# --------------------------------------------------------------------------- 3: model folders

@pytest.fixture
def model_dir(trained: Path) -> Path:
    """model/: the base as one model.safetensors with a config.json, the adapter's base."""
    d = trained / "model"
    d.mkdir()
    shutil.copy(trained / "base.safetensors", d / "model.safetensors")
    (d / "config.json").write_text('{"model_type": "mlp"}\n')
    return d


def test_merge_copies_no_file_that_a_symlink_brings_in_from_outside(model_dir: Path, trained: Path):
    (trained / "secret.txt").write_text("private key")
    (model_dir / "tokenizer.json").symlink_to(trained / "secret.txt")
    assert_user_error(invoke("merge", "model", "run/adapter"), "tokenizer.json is a symlink to",
                      "outside the model folder", "cp -rL")


def test_merge_copies_a_symlink_inside_the_folder_as_its_content(model_dir: Path, trained: Path):
    (model_dir / "vocab.json").symlink_to(model_dir / "config.json")
    ok(invoke("merge", "model", "run/adapter"))
    copied = trained / "model-merged" / "vocab.json"
    assert copied.is_file() and not copied.is_symlink() and copied.read_text() == '{"model_type": "mlp"}\n'


def test_a_shard_index_entry_that_leaves_the_folder_is_refused(model_dir: Path, trained: Path):
    keys = list(load_file(trained / "base.safetensors"))
    for entry in ["../base.safetensors", str(trained / "base.safetensors"), "sub/model.safetensors", 7]:
        index = {"metadata": {}, "weight_map": {k: "model.safetensors" for k in keys[1:]} | {keys[0]: entry}}
        (model_dir / "model.safetensors.index.json").write_text(json.dumps(index))
        said = f"the index names the shard {entry!r}" if isinstance(entry, str) else \
            f"weight_map values must be shard file names, got {entry!r}"      # not even a name
        assert_user_error(invoke("merge", "model", "run/adapter"), "model.safetensors.index.json", said)


def test_a_shard_that_is_a_symlink_out_of_the_folder_is_refused(model_dir: Path, trained: Path):
    (model_dir / "model.safetensors").unlink()
    (model_dir / "model.safetensors").symlink_to(trained / "base.safetensors")
    assert_user_error(invoke("merge", "model", "run/adapter"), "model.safetensors is a symlink",
                      "outside the model folder")


# --------------------------------------------------------------------------- 4: --force

def test_force_never_replaces_an_input_or_a_folder_around_one(model_dir, trained):
    (trained / "models").mkdir()
    shutil.copy(trained / "base.safetensors", trained / "models" / "base.safetensors")
    before = sha(trained / "models" / "base.safetensors")
    for base, output in [
        ("models/base.safetensors", "models"),              # a folder holding the base
        ("models/base.safetensors", "models/base.safetensors"),
        ("base.safetensors", "run"),                        # a folder holding the adapter
        ("base.safetensors", "run/adapter/merged.safetensors"),   # inside the adapter
        ("base.safetensors", "run/adapter/adapter_model.safetensors"),
        ("base.safetensors", "."),
        ("base.safetensors", ".."),
        ("model", "model/merged"),                          # inside a base directory
        ("model", "."),
    ]:
        assert_user_error(invoke("merge", base, "run/adapter", "-o", output, "--force"), "the output would")
        assert sha(trained / "models" / "base.safetensors") == before   # assert_user_error: nothing else changed


def test_force_replaces_an_earlier_output_of_the_same_kind_only(model_dir, trained):
    ok(invoke("merge", "base.safetensors", "run/adapter"))
    ok(invoke("merge", "base.safetensors", "run/adapter", "--force"))           # its own earlier output
    ok(invoke("merge", "model", "run/adapter"))
    assert (trained / "model-merged" / MERGE_MARKER).is_file()
    ok(invoke("merge", "model", "run/adapter", "--force"))
    (trained / "precious.safetensors").write_text("my notes")
    (trained / "precious.pt").write_text("my notes")
    (trained / "mine").mkdir()
    (trained / "mine" / "notes.txt").write_text("mine")
    (trained / "dir.safetensors").mkdir()
    (trained / "plain").write_text("my notes")
    for base, output, expect in [("base.safetensors", "precious.safetensors", "not a safetensors file"),
                                 ("base.safetensors", "precious.pt", "not a PyTorch file"),
                                 ("base.safetensors", "dir.safetensors", "is a folder, not a file"),
                                 ("model", "mine", f"no {MERGE_MARKER}"),
                                 ("model", "plain", "a file, not a model folder")]:
        assert_user_error(invoke("merge", base, "run/adapter", "-o", output, "--force"),
                          "--force replaces only an earlier output of lora-merge", expect)


# --------------------------------------------------------------------------- 5: --weights

@pytest.fixture
def two_adapters(trained: Path) -> Path:
    ok(invoke("train", "config.yaml", "output_dir=run2", "seed=1", "train.lr=0.05"))
    return trained


def test_weights_are_one_comma_separated_list_in_adapter_order(two_adapters: Path):
    ok(invoke("merge", "base.safetensors", "run/adapter", "run2/adapter", "--weights", "0.7, -0.3"))
    expected = merge_state_dict(load_file("base.safetensors"), [read_adapter("run/adapter"),
                                                                read_adapter("run2/adapter")], weights=[0.7, -0.3])
    merged = load_file("base-merged.safetensors")
    assert set(merged) == set(expected) and all(torch.equal(merged[k], expected[k]) for k in expected)


def test_ambiguous_weights_are_refused(two_adapters: Path):
    for weights, expect in [
        (["0.7", "0.3"], "0.3 after --weights 0.7 would be read as adapter path"),
        (["0.7,0.2", "0.1"], "0.1 after --weights 0.7,0.2"),
        (["0.7"], "1 weight for 2 adapters"),
        (["0.7,0.2,0.1"], "3 weights for 2 adapters"),
        (["0.7", "--weights", "0.3"], "--weights given 2 times"),
        (["0.7,nan"], "must be finite numbers"),
        (["0.7,,0.3"], "must be finite numbers"),
        (["0.7;0.3"], "must be finite numbers"),
    ]:
        assert_user_error(invoke("merge", "base.safetensors", "run/adapter", "run2/adapter", "--weights", *weights),
                          "--weights", expect, "--weights 0.5,0.5")


# --------------------------------------------------------------------------- 6: formats and values

def test_the_output_format_follows_the_output_suffix(trained: Path):
    torch.save(load_file("base.safetensors"), "base.pt")
    ok(invoke("merge", "base.pt", "run/adapter", "-o", "from_pt.safetensors"))
    ok(invoke("merge", "base.pt", "run/adapter", "-o", "from_pt.pt"))
    ok(invoke("merge", "base.safetensors", "run/adapter", "-o", "from_st.pt"))
    ok(invoke("merge", "base.safetensors", "run/adapter", "-o", "from_st.safetensors"))
    reference = load_file("from_st.safetensors")
    for name in ("from_pt.safetensors", "from_pt.pt", "from_st.pt"):
        got = load_file(name) if name.endswith(".safetensors") else torch.load(name, weights_only=True)
        assert set(got) == set(reference) and all(torch.equal(got[k], reference[k]) for k in reference), name
    assert Path("from_pt.pt").read_bytes()[:4] == b"PK\x03\x04"                # torch.save's zip, not safetensors


def test_an_output_suffix_that_names_no_format_is_refused(model_dir, trained):
    for base, output, expect in [("base.safetensors", "merged.txt", "unknown output format '.txt'"),
                                 ("base.safetensors", "merged", "unknown output format '(no suffix)'"),
                                 ("model", "merged.safetensors", "a model directory merges into a directory")]:
        assert_user_error(invoke("merge", base, "run/adapter", "-o", output), expect)


@pytest.mark.parametrize("key", ["head.bias", "layers.0.weight"], ids=["untouched", "merged"])
def test_a_value_that_overflows_the_output_dtype_is_refused(trained: Path, key):
    big = load_file("base.safetensors")
    big[key] = big[key].clone()
    big[key].view(-1)[0] = 1e5                                   # float16 tops out at 65504
    save_file(big, "big.safetensors")
    assert_user_error(invoke("merge", "big.safetensors", "run/adapter", "--dtype", "float16", "--ignore-fingerprint"),
                      f"'{key}' does not fit float16", "--dtype bfloat16")
    ok(invoke("merge", "big.safetensors", "run/adapter", "--dtype", "bfloat16", "--ignore-fingerprint"))
    merged = load_file("big-merged.safetensors")
    assert all(torch.isfinite(t).all() and t.dtype == torch.bfloat16 for t in merged.values())


def test_training_in_a_dtype_the_base_overflows_is_refused_up_front(trained: Path):
    big = load_file("base.safetensors")
    big["layers.1.weight"] = big["layers.1.weight"] * 1e6
    save_file(big, "big.safetensors")
    assert_user_error(invoke("train", "config.yaml", "model.base=big.safetensors", "dtype=float16",
                             "output_dir=run16"), "dtype: the base tensor 'layers.1.weight' overflows float16",
                      "bfloat16")


def test_a_nan_in_the_base_is_caught_when_it_is_loaded(trained: Path):
    bad = load_file("base.safetensors")
    bad["layers.1.weight"][2, 3] = float("nan")
    save_file(bad, "nan.safetensors")
    torch.save(bad, "nan.pt")
    for args in [("train", "config.yaml", "model.base=nan.safetensors", "output_dir=run_nan"),
                 ("merge", "nan.safetensors", "run/adapter"), ("merge", "nan.pt", "run/adapter"),
                 ("eval", "run/adapter", "--merged", "nan.safetensors"), "eval"]:
        if args == "eval":                   # the adapter's own base, broken after training
            save_file(bad, "base.safetensors")
            args = ("eval", "run/adapter")
        err = assert_user_error(invoke(*args), "the tensor 'layers.1.weight' holds non-finite values (nan)")
        assert "train.lr" not in err


# --------------------------------------------------------------------------- 7: resume

@pytest.fixture
def checkpointed(proj: Path) -> Path:
    """A 2-step run with a checkpoint after each step, in ck/."""
    ok(invoke("train", "config.yaml", "output_dir=ck", "train.save_every=1"))
    return proj


RESUME = ("train", "config.yaml", "output_dir=ck", "train.save_every=1", "train.max_steps=3", "--resume")


def test_checkpoints_record_the_inputs_content(checkpointed: Path):
    info = json.loads((checkpointed / "ck/checkpoints/step_2/trainer_state.json").read_text())
    assert set(info["inputs"]) == {"data.train", "data.eval", "model.base"}
    assert info["inputs"]["data.train"] == {"path": str(checkpointed / "train.csv"),
                                            "sha256": sha(checkpointed / "train.csv")}
    assert info["inputs"]["model.base"]["sha256"] == sha(checkpointed / "base.safetensors")   # small: hashed whole


@pytest.mark.parametrize("key, name", [("data.train", "train.csv"), ("data.eval", "eval.csv"),
                                       ("model.base", "base.safetensors")])
def test_resume_refuses_inputs_that_changed_unless_allowed(checkpointed: Path, key, name):
    if name.endswith(".csv"):
        (checkpointed / name).write_text(csv_text(24, seed=9))
    else:
        save_mlp_base(checkpointed / name, seed=7)
    assert_user_error(invoke(*RESUME), f"cannot resume: {key} ({checkpointed / name}) changed",
                      "--allow-changed-data")
    resumed = ok(invoke(*RESUME, "--allow-changed-data"))
    assert f"resuming with a changed {key}" in resumed
    info = json.loads((checkpointed / "ck/checkpoints/step_3/trainer_state.json").read_text())
    assert info["inputs"][key]["sha256"] == sha(checkpointed / name)       # the new content from here on


def test_resume_of_a_checkpoint_without_fingerprints_says_so(checkpointed: Path):
    state = checkpointed / "ck/checkpoints/step_2/trainer_state.json"
    info = json.loads(state.read_text())
    del info["inputs"]
    state.write_text(json.dumps(info))
    assert "records no fingerprint" in ok(invoke(*RESUME))


def test_large_base_weights_are_sampled_and_data_is_hashed_whole(tmp_path: Path, monkeypatch):
    from lora_cli.run import resume as ckpt

    monkeypatch.setattr(ckpt, "WHOLE_LIMIT", 4096)
    monkeypatch.setattr(ckpt, "SAMPLE_BYTES", 256)
    blob = bytearray(os.urandom(64 * 1024))
    for name in ("weights.safetensors", "data.jsonl"):
        (tmp_path / name).write_bytes(blob)
    files = {"model.base": str(tmp_path / "weights.safetensors"), "data.train": str(tmp_path / "data.jsonl")}
    before = ckpt.input_fingerprints(files)
    step = (len(blob) - 256) // (ckpt.SAMPLES - 1)
    unsampled = step // 2 + 300                                  # between the first two sampled blocks
    for name in files.values():
        changed = bytearray(blob)
        changed[unsampled] ^= 0xFF
        Path(name).write_bytes(changed)
    after = ckpt.input_fingerprints(files)
    assert after["data.train"] != before["data.train"]           # a data file: every byte counts
    assert after["model.base"] == before["model.base"]           # a large base: sampled blocks only
    blob[step + 10] ^= 0xFF                                      # inside a sampled block
    Path(files["model.base"]).write_bytes(blob)
    assert ckpt.input_fingerprints(files)["model.base"] != before["model.base"]


# --------------------------------------------------------------------------- 8: one run per folder

def test_a_second_run_on_a_folder_in_use_exits_2_naming_the_first(proj: Path):
    with run_lock(proj / "run"):
        assert (proj / "run" / LOCK_NAME).read_text().strip() == str(os.getpid())
        assert_user_error(invoke("train", "config.yaml"), "run: another lora-train", f"PID {os.getpid()}")
    assert not (proj / "run").exists()             # the folder made for the lock went with it
    ok(invoke("train", "config.yaml"))             # and nothing of it stays in the way
    assert LOCK_NAME not in os.listdir(proj / "run")


@pytest.mark.parametrize("plant", ["symlink", "hard link"])
def test_a_lock_file_planted_in_the_folder_is_never_written_through(tmp_path: Path, plant):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    (tmp_path / "run").mkdir()
    lock = tmp_path / "run" / LOCK_NAME
    lock.symlink_to(victim) if plant == "symlink" else os.link(victim, lock)
    with pytest.raises(UserError, match=f"{LOCK_NAME} in this folder is (a symlink|not lora-cli's lock file)"):
        with run_lock(tmp_path / "run"):
            pass
    assert victim.read_text() == "precious" and (lock.is_symlink() or lock.exists())


def test_the_next_run_removes_what_killed_processes_left(trained: Path):
    run, dead, live = trained / "run", dead_pid(), os.getppid()
    (run / f".adapter.tmp-{dead}-0badc0de").mkdir()
    (run / f".adapter.tmp-{dead}-0badc0de" / WEIGHTS).write_bytes(b"half")
    (run / f".config.yaml.tmp-{dead}-12345678").write_text("half")
    (run / f".config.yaml.tmp-{dead}").write_text("half, named by an older lora-cli")
    (run / f".metrics.jsonl.tmp-{live}-abcdef01").write_text("a live process's")
    (run / "checkpoints").mkdir()
    (run / "checkpoints" / f".step_9.tmp-{dead}-cafebabe").mkdir()
    ok(invoke("train", "config.yaml", "--overwrite"))
    assert sorted(p.name for p in run.iterdir() if p.name != "curves.png") == sorted(
        ["adapter", "config.yaml", "metrics.jsonl", f".metrics.jsonl.tmp-{live}-abcdef01"])


def test_temp_names_are_unique_and_a_half_replaced_folder_is_restored(tmp_path: Path):
    first, second = temp_path(tmp_path / "adapter"), temp_path(tmp_path / "adapter")
    assert first != second and f".adapter.tmp-{os.getpid()}-" in first.name
    dead = dead_pid()
    (tmp_path / f".adapter.old-{dead}-00112233").mkdir()        # killed between its two renames
    (tmp_path / f".adapter.old-{dead}-00112233" / "adapter_config.json").write_text("{}")
    (tmp_path / f".adapter.tmp-{dead}-44556677").mkdir()
    (tmp_path / f".other.tmp-{dead}-nothex!").write_text("not lora-cli's")
    (tmp_path / f".other.tmp-{dead}").write_text("not lora-cli's either: not a name it writes here")
    (tmp_path / f".mine.tmp-{dead}").write_text("an older lora-cli's")
    remove_stale_temps(tmp_path, names=["mine"])
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["adapter", f".other.tmp-{dead}-nothex!", f".other.tmp-{dead}"])
    assert (tmp_path / "adapter" / "adapter_config.json").read_text() == "{}"


def lora_cli(cwd: Path, *args: str, env: dict | None = None, wait: bool = True):
    cmd = [sys.executable, "-m", "lora_cli", *args]
    full_env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    if not wait:
        return subprocess.Popen(cmd, cwd=cwd, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return subprocess.run(cmd, cwd=cwd, env=full_env, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_two_concurrent_runs_on_one_folder_one_trains_the_other_exits_2(proj: Path):
    first = lora_cli(proj, "train", "config.yaml", "train.max_steps=20", wait=False)
    lock = proj / "run" / LOCK_NAME
    deadline = time.time() + 120
    while time.time() < deadline and not (lock.exists() and lock.read_text().strip() == str(first.pid)):
        time.sleep(0.02)
    first.send_signal(signal.SIGSTOP)                 # holding the lock, mid-run, for as long as we like
    try:
        second = lora_cli(proj, "train", "config.yaml", "train.max_steps=20")
    finally:
        first.send_signal(signal.SIGCONT)
    out, err = first.communicate(timeout=300)
    assert first.returncode == 0, err
    assert second.returncode == 2, second.stderr
    assert f"another lora-train (PID {first.pid}) is using this folder" in " ".join(second.stderr.split())
    assert "Traceback" not in second.stderr
    steps = [json.loads(line)["step"] for line in (proj / "run" / "metrics.jsonl").read_text().splitlines()
             if "loss" in json.loads(line)]
    assert steps == sorted(set(steps)) and steps[-1] == 20      # one run's log, each step once


@pytest.mark.slow
def test_a_merge_killed_mid_write_leaves_a_temp_that_the_next_merge_removes(trained: Path):
    (trained / "out").mkdir()
    killed = lora_cli(trained, "merge", "base.safetensors", "run/adapter", "-o", "out/merged.safetensors",
                      env=fault_env("merge-write"))
    assert killed.returncode == -signal.SIGKILL
    left = [p.name for p in (trained / "out").iterdir()]
    assert len(left) == 1 and left[0].startswith(".merged.safetensors.tmp-")
    ok(invoke("merge", "base.safetensors", "run/adapter", "-o", "out/other.safetensors"))
    assert sorted(p.name for p in (trained / "out").iterdir()) == ["other.safetensors"]
