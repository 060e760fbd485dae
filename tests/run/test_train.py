"""The output folder of a run: a failed or interrupted first run costs nothing, and a
run that cannot write its adapter keeps what it trained.

Each case runs the real command in-process (Typer's CliRunner) on a tiny regression
project under ``tmp_path``: a one-hidden-layer ``mlp``, 64 rows, a few steps.
"""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from typer.testing import CliRunner

from lora_cli.run import checkpoint as ckpt
from lora_cli.run import loop as looplib
from lora_cli.run import train as trainlib
from lora_cli.cli import app
from lora_cli.errors import UserError
from lora_cli.models import build_model, save_state_dict
from lora_cli.run.output_dir import prepare_output_dir

runner = CliRunner()

CONFIG = {
    "seed": 0, "device": "cpu", "task": "regression", "output_dir": "run",
    "model": {"arch": "mlp", "args": {"hidden": 8}, "base": "base.safetensors"},
    "data": {"train": "train.csv", "eval": "eval.csv"},
    "lora": {"rank": 2, "alpha": 4},
    "train": {"max_steps": 6, "batch_size": 16, "log_every": 2, "lr": 0.01},
}


def rows(n: int, seed: int) -> str:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, generator=g)
    return "a,b,c,y\n" + "".join(",".join(f"{v:.5f}" for v in r) + f",{sum(r):.5f}\n" for r in x.tolist())


@pytest.fixture
def proj(tmp_path, monkeypatch) -> Path:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "train.csv").write_text(rows(64, 0))
    (tmp_path / "eval.csv").write_text(rows(16, 1))
    torch.manual_seed(1)
    save_state_dict(build_model(arch="mlp", args={"in_features": 3, "out_features": 1, "hidden": 8}).state_dict(),
                    tmp_path / "base.safetensors")
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(CONFIG))
    return tmp_path


def train(*args):
    result = runner.invoke(app, ["train", "config.yaml", *args])
    assert not isinstance(result.exception, (AssertionError, TypeError, KeyError)), result.exception
    return result


def succeeded(result, run: Path) -> None:
    assert result.exit_code == 0, result.output
    assert (run / "adapter" / "adapter_model.safetensors").is_file()


def metrics(run: Path) -> list[dict]:
    """metrics.jsonl without the timing fields."""
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if not k.endswith("_per_s")} for line in lines]


def test_a_bad_row_late_in_the_data_leaves_nothing_behind(proj):
    good = (proj / "train.csv").read_text()
    (proj / "train.csv").write_text(good + "1,2,oops,4\n")
    result = train()
    assert result.exit_code == 2 and "train.csv:66" in result.output
    assert not (proj / "run").exists()
    (proj / "train.csv").write_text(good)
    succeeded(train(), proj / "run")


def test_a_run_that_fails_mid_training_does_not_block_the_same_command(proj):
    failed = train("train.lr=1e30", "train.optimizer=sgd")      # the loss overflows after a step or two
    assert failed.exit_code == 2 and "became non-finite" in failed.output
    assert sorted(p.name for p in (proj / "run").iterdir()) == ["config.yaml", "metrics.jsonl"]
    again = train("train.lr=1e30", "train.optimizer=sgd")       # the same command fails the same way
    assert again.exit_code == 2 and "became non-finite" in again.output
    fixed = train()
    succeeded(fixed, proj / "run")
    assert "stopped before its first checkpoint" in fixed.output
    train(f"output_dir={proj / 'ref'}")
    assert metrics(proj / "run") == metrics(proj / "ref")     # nothing of the failed runs is left in the log


def test_an_interrupt_before_the_first_checkpoint_does_not_block_the_same_command(proj, monkeypatch):
    real = looplib.make_optimizer

    def interrupted(cfg, params):           # Ctrl-C once output_dir exists, before a step ran
        os.kill(os.getpid(), signal.SIGINT)
        return real(cfg, params)

    monkeypatch.setattr(looplib, "make_optimizer", interrupted)
    result = train()
    assert result.exit_code == 130 and (proj / "run" / "config.yaml").exists()
    monkeypatch.setattr(looplib, "make_optimizer", real)
    succeeded(train(), proj / "run")


def test_a_second_ctrl_c_mid_step_does_not_block_the_same_command(proj, monkeypatch):
    real = looplib.Run.step

    def step(self, group, *rest):
        if self.loop.step == 3:
            raise KeyboardInterrupt         # what the signal handler raises on a second Ctrl-C
        return real(self, group, *rest)

    monkeypatch.setattr(looplib.Run, "step", step)
    assert train().exit_code == 130
    assert not ckpt.checkpoints(proj / "run") and (proj / "run" / "metrics.jsonl").exists()
    monkeypatch.setattr(looplib.Run, "step", real)
    succeeded(train(), proj / "run")


def test_a_failure_while_saving_keeps_the_trained_state_and_resume_writes_the_adapter(proj, monkeypatch):
    succeeded(train(f"output_dir={proj / 'ref'}"), proj / "ref")

    def broken(*args, **kwargs):
        raise ModuleNotFoundError("No module named 'numpy'")

    with monkeypatch.context() as patch:
        patch.setattr(looplib, "write_adapter", broken)
        result = train()
    assert result.exit_code == 2
    message = " ".join(result.output.split())
    kept = proj / "run" / ckpt.UNSAVED
    assert "the adapter could not be written (ModuleNotFoundError: No module named 'numpy')" in message
    assert f"kept in run/{ckpt.UNSAVED}" in message and "with: lora-train config.yaml --resume" in message
    assert not (proj / "run" / "adapter").exists()
    payload = torch.load(kept, weights_only=True)
    reference = load_file(proj / "ref" / "adapter" / "adapter_model.safetensors")
    assert payload["adapter"].keys() == reference.keys()
    assert all(torch.equal(payload["adapter"][k], reference[k]) for k in reference)

    blocked = train()                        # without --resume: refused, the copy stays
    assert blocked.exit_code == 2 and "--resume" in blocked.output and kept.exists()
    succeeded(train("--resume"), proj / "run")
    assert not kept.exists()
    written = load_file(proj / "run" / "adapter" / "adapter_model.safetensors")
    assert written.keys() == reference.keys() and all(torch.equal(written[k], reference[k]) for k in reference)
    assert metrics(proj / "run") == metrics(proj / "ref")


def test_when_no_copy_can_be_kept_either_the_message_says_so(proj, monkeypatch):
    def broken(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(looplib, "write_adapter", broken)
    monkeypatch.setattr(ckpt, "save_unsaved", broken)
    result = train()
    assert result.exit_code == 2
    message = " ".join(result.output.split())
    assert "could not be written" in message and "nor a copy of its tensors" in message and "train again" in message


def test_leftovers_of_a_run_that_produced_nothing_do_not_block_it(tmp_path):
    run = tmp_path / "run"
    (run / "checkpoints" / ".step_3.tmp").mkdir(parents=True)      # a checkpoint write that was cut short
    for name in ("config.yaml", "metrics.jsonl", ".lock", ".config.yaml.tmp-123"):
        (run / name).write_text("x")
    notes = prepare_output_dir(run, overwrite=False)
    assert notes and "checkpoints" in notes[0] and "config.yaml" in notes[0]
    assert sorted(p.name for p in run.iterdir()) == [".lock"]      # another process's lock is not ours to remove


@pytest.mark.parametrize("holds, says", [
    ("adapter", "holds a trained adapter"),
    ("checkpoints/step_4", "holds checkpoints of an unfinished run (newest: step_4)"),
    (ckpt.UNSAVED, "could not write its adapter"),
    ("notes.txt", "holds files lora-cli did not write: notes.txt"),
])
def test_a_folder_with_something_to_lose_needs_resume_or_overwrite(tmp_path, holds, says):
    run = tmp_path / "run"
    target = run / holds
    if holds.startswith("checkpoints"):
        target.mkdir(parents=True)
        (target / "trainer_state.json").write_text("{}")
    elif holds == "adapter":
        target.mkdir(parents=True)
    else:
        run.mkdir()
        target.write_text("x")
    (run / ".lock").write_text("")
    with pytest.raises(UserError) as info:
        prepare_output_dir(run, overwrite=False)
    assert says in info.value.what and "--overwrite" in info.value.fix
    assert ("--resume" in info.value.fix) == (holds != "adapter" and holds != "notes.txt")
    prepare_output_dir(run, overwrite=True)
    left = sorted(p.name for p in run.iterdir())
    assert left == ([".lock", "notes.txt"] if holds == "notes.txt" else [".lock"])


@pytest.mark.parametrize("flags", [[], ["--overwrite"]])
def test_a_run_never_writes_over_the_files_it_reads(proj, flags):
    """output_dir set to the config's own folder: the run would write its config.yaml over
    the user's (comments and all), or replace the data it reads."""
    exp = proj / "exp"
    exp.mkdir()
    mine = "# my notes\n" + yaml.safe_dump({**CONFIG, "output_dir": "exp"})
    (exp / "config.yaml").write_text(mine)
    result = runner.invoke(app, ["train", "exp/config.yaml", *flags])
    assert result.exit_code == 2 and "config.yaml" in result.output and "Traceback" not in result.output
    assert (exp / "config.yaml").read_text() == mine
    (proj / "run").mkdir()
    held = "".join(json.dumps({"a": i, "b": 1, "c": 2, "y": i + 3}) + "\n" for i in range(8))
    (proj / "run" / "metrics.jsonl").write_text(held)            # a leftover's name, but the eval data
    reads_it = runner.invoke(app, ["train", "config.yaml", "data.eval=run/metrics.jsonl"])
    assert reads_it.exit_code == 2 and "which this run reads" in " ".join(reads_it.output.split())
    assert (proj / "run" / "metrics.jsonl").read_text() == held
