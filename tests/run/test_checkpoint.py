"""Checkpoints and resume: a run killed at any point, then resumed, ends exactly as an
uninterrupted one; signals stop cleanly; config changes on resume are checked."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import fault_env, write_lm_run
from lora_cli.run.checkpoint import trim_metrics

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """A small causal-LM run on the built-in gpt with dropout (so RNG state matters)."""
    pairs = [(f"{a}+{b}=", str(a + b)) for a in range(12) for b in range(6)]
    return write_lm_run(tmp_path, pairs, eval_every_nth=7, seed=3, n_layer=1, seq=32, dropout=0.1,
                        train={"epochs": 4, "batch_size": 8, "lr": 0.01, "log_every": 3, "eval_every": 7,
                               "save_every": 4, "keep_last": 2})


def lora_train(cwd: Path, *args: str, env: dict | None = None, wait: bool = True):
    cmd = [sys.executable, "-m", "lora_cli", "train", "config.yaml", *args]
    full_env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    if not wait:
        return subprocess.Popen(cmd, cwd=cwd, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return subprocess.run(cmd, cwd=cwd, env=full_env, capture_output=True, text=True, timeout=300)


def wait_until(condition, timeout: float = 120.0) -> None:
    """Poll ``condition`` until it holds (a running subprocess got that far)."""
    deadline = time.time() + timeout
    while time.time() < deadline and not condition():
        time.sleep(0.02)


def adapter(run: Path) -> dict[str, torch.Tensor]:
    return load_file(run / "adapter" / "adapter_model.safetensors")


def metric_rows(run: Path) -> list[dict]:
    """Log rows without the wall-clock throughput, which no two runs share."""
    out = []
    for line in (run / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        out.append({k: v for k, v in row.items() if not k.endswith("_per_s")})
    return out


def assert_same_run(a: Path, b: Path) -> None:
    ta, tb = adapter(a), adapter(b)
    assert set(ta) == set(tb)
    assert max(float((ta[k] - tb[k]).abs().max()) for k in ta) <= 1e-6
    ra, rb = metric_rows(a), metric_rows(b)
    assert ra == rb
    train_steps = [r["step"] for r in rb if "loss" in r]
    assert len(train_steps) == len(set(train_steps))      # every logged step exactly once


@pytest.fixture
def reference(project: Path, tmp_path_factory) -> Path:
    """The uninterrupted run."""
    done = lora_train(project, "output_dir=ref")
    assert done.returncode == 0, done.stderr
    return project / "ref"


@pytest.mark.slow
@pytest.mark.parametrize("fault", ["ckpt-write:8", "ckpt-write:16"])
def test_sigkill_during_checkpoint_write_then_resume_matches(project: Path, reference: Path, fault: str):
    killed = lora_train(project, env=fault_env(fault))
    assert killed.returncode == -signal.SIGKILL
    step = int(fault.split(":")[1])
    ckpts = sorted(p.name for p in (project / "run" / "checkpoints").iterdir())
    assert f"step_{step}" not in ckpts                       # the half-written one never became visible
    resumed = lora_train(project, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming from" in resumed.stderr
    assert not any(".tmp" in p.name for p in (project / "run" / "checkpoints").iterdir())
    assert_same_run(reference, project / "run")


@pytest.mark.slow
def test_sigkill_mid_step_then_resume_matches(project: Path):
    proc = lora_train(project, "train.log_every=1", "train.save_every=3", wait=False)
    wait_until(lambda: any((project / "run" / "checkpoints").glob("step_6")))
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    resumed = lora_train(project, "train.log_every=1", "train.save_every=3", "--resume")
    assert resumed.returncode == 0, resumed.stderr
    reference_every_step = lora_train(project, "output_dir=ref1", "train.log_every=1", "train.save_every=3")
    assert reference_every_step.returncode == 0
    assert_same_run(project / "ref1", project / "run")


@pytest.mark.slow
def test_sigterm_checkpoints_exits_143_and_says_how_to_resume(project: Path):
    proc = lora_train(project, "train.log_every=1", "train.save_every=1000", wait=False)
    log = project / "run" / "metrics.jsonl"
    wait_until(lambda: log.exists() and '"loss"' in log.read_text())
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 143, stderr
    assert "--resume" in stderr and "Traceback" not in stderr
    assert any((project / "run" / "checkpoints").glob("step_*"))
    resumed = lora_train(project, "train.log_every=1", "train.save_every=1000", "--resume")
    assert resumed.returncode == 0, resumed.stderr
    again = lora_train(project, "output_dir=ref2", "train.log_every=1", "train.save_every=1000")
    assert again.returncode == 0
    assert_same_run(project / "ref2", project / "run")


@pytest.mark.slow
def test_resume_refuses_changed_rank_and_allows_changed_max_steps(project: Path):
    assert lora_train(project, "train.max_steps=8").returncode == 0
    changed = lora_train(project, "train.max_steps=8", "lora.rank=2", "--resume")
    assert changed.returncode == 2
    assert "lora.rank" in changed.stderr and "Traceback" not in changed.stderr
    longer = lora_train(project, "train.max_steps=12", "--resume")
    assert longer.returncode == 0, longer.stderr
    assert "changed train.max_steps" in longer.stderr
    steps = [r["step"] for r in metric_rows(project / "run") if "loss" in r]
    assert steps == sorted(set(steps)) and steps[-1] == 12


@pytest.mark.slow
def test_resume_without_checkpoint_and_nan_handling(project: Path):
    none = lora_train(project, "train.save_every=null", "--resume")
    assert none.returncode == 2 and "no complete checkpoint" in none.stderr
    diverge = lora_train(project, "train.lr=1e30", "train.clip_grad_norm=null", "lora.alpha=1e6",
                         "output_dir=nan")
    assert diverge.returncode == 2 and "non-finite" in diverge.stderr and "Traceback" not in diverge.stderr
    skip = lora_train(project, "train.lr=1e30", "train.clip_grad_norm=null", "lora.alpha=1e6",
                      "train.on_nan=skip", "output_dir=skip", "train.max_steps=6")
    assert skip.returncode == 0, skip.stderr


def test_an_optimizer_step_that_overflows_is_a_user_error(project: Path, monkeypatch):
    """Adam's first step divides lr by 1 - beta1 = 0.1: lr 1e38 overflows float32 there."""
    from lora_cli.run.config import load_config
    from lora_cli.run.train import TrainingError, train

    monkeypatch.chdir(project)
    with pytest.raises(TrainingError, match="overflowed at step 1") as info:
        train(load_config("config.yaml", ["train.lr=1e38", "train.max_steps=2", "train.eval_every=null"]),
              search_path=project)
    assert "lower train.lr" in info.value.fix


def test_trim_metrics_keeps_rows_up_to_step_and_drops_a_torn_line(tmp_path: Path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 1}\n{"step": 2, "loss": 0.5}\n{"step": 2, "eval_loss": 0.7}\n'
                    '{"step": 3, "loss": 0.4}\n{"step": 4, "lo')
    trim_metrics(path, 2)
    assert [json.loads(x) for x in path.read_text().splitlines()] == [
        {"step": 1, "loss": 1}, {"step": 2, "loss": 0.5}, {"step": 2, "eval_loss": 0.7}]
