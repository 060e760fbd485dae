"""Training on several workers: W workers with the same global batch train the same
adapter as one process; a dead worker ends the run with a clear message, not a hang;
checkpoints resume on any number of workers and under either strategy."""

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
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file

from conftest import fault_env, write_lm_run
from lora_cli.run import distributed as dist
from lora_cli.run.checkpoint import checkpoints
from lora_cli.run.config import config_from_dict, config_to_dict
from lora_cli.errors import UserError
from lora_cli.run.evaluate import _Tally
from lora_cli.run.launch import Failure, explain
from lora_cli.run.train import train
from lora_cli.run.resume import resume_config

ROOT = Path(__file__).resolve().parents[2]
WEIGHTS = "adapter_model.safetensors"


# --- which examples each worker reads -------------------------------------------------------

@given(n=st.integers(1, 60), size=st.integers(1, 5))
@settings(max_examples=60, deadline=None)
def test_every_worker_gets_as_many_examples_and_each_example_counts_once(n, size):
    order = torch.randperm(n)
    shares = [dist.epoch_share(order, dist.World(rank=r, size=size)) for r in range(size)]
    assert len({len(ids) for ids, _ in shares}) == 1
    assert len(shares[0][0]) == -(-n // size)
    counted = torch.cat([ids[keep] for ids, keep in shares])
    assert sorted(counted.tolist()) == list(range(n))            # the padding does not count


@given(n=st.integers(1, 80), batch=st.integers(1, 4), accum=st.integers(1, 3), size=st.integers(2, 4),
       done=st.integers(0, 5))
@settings(max_examples=80, deadline=None)
def test_a_step_on_w_workers_counts_what_one_process_with_the_global_batch_reads(n, batch, accum, size, done):
    """Step k of an epoch on W workers counts exactly the examples of step k of one
    process with batch_size x grad_accum x W examples per step, from any resume point."""
    order = torch.randperm(n)
    G = batch * accum * size
    done = min(done, -(-n // G) - 1)
    shares = [dist.epoch_share(order, dist.World(rank=r, size=size), done=done * G) for r in range(size)]
    single = order[done * G:]
    for k in range(-(-len(single) // G)):
        part = slice(k * batch * accum, (k + 1) * batch * accum)
        spread = [i for ids, keep in shares for i in ids[part][keep[part]].tolist()]
        assert sorted(spread) == sorted(single[k * G:(k + 1) * G].tolist())


def test_ignored_rows_count_for_nothing_in_the_loss():
    from lora_cli.run.evaluate import ignore_rows, loss_fn, loss_items

    torch.manual_seed(0)
    keep = torch.tensor([True, False, True])
    cases = {"regression": (torch.randn(3, 1), torch.randn(3)),
             "classification": (torch.randn(3, 4), torch.tensor([1, 2, 3])),
             "causal_lm": (torch.randn(3, 5, 7), torch.randint(0, 7, (3, 5)))}
    for task, (output, target) in cases.items():
        masked = ignore_rows(task, target, keep)
        assert loss_items(task, masked) == loss_items(task, target[keep])
        torch.testing.assert_close(loss_fn(task, output, masked, reduction="sum"),
                                   loss_fn(task, output[keep], target[keep], reduction="sum"))
        torch.testing.assert_close(loss_fn(task, output, masked), loss_fn(task, output[keep], target[keep]))


def test_evaluation_sums_over_workers_equal_the_whole_set():
    torch.manual_seed(0)
    logits, labels = torch.randn(10, 6, 5), torch.randint(0, 5, (10, 6))
    labels[0, :3] = -100
    whole, a, b = _Tally("causal_lm", None), _Tally("causal_lm", None), _Tally("causal_lm", None)
    whole.add(logits, labels)
    a.add(logits[:4], labels[:4])
    b.add(logits[4:], labels[4:])
    other = []
    b.combine(lambda t: other.append(t) or t)
    a.combine(lambda t: t + other[0])
    assert a.result() == pytest.approx(whole.result())


def test_fsdp_units_are_the_blocks_and_tied_weights_stay_in_the_root():
    from torch import nn

    from lora_cli.models.gpt import GPT

    model = GPT(n_layer=3, n_head=2, d_model=16, max_seq_len=8, tie_embeddings=True)
    assert dist._shard_units(model) == list(model.layers)

    class Shared(nn.Module):                       # block 0 uses the embedding's weight
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(5, 4)
            self.blocks = nn.ModuleList([nn.Linear(5, 4), nn.Linear(4, 4)])
            self.blocks[0].weight = self.embed.weight

    shared = Shared()
    assert dist._shard_units(shared) == [shared.blocks[1]]


# --- resuming on another number of workers --------------------------------------------------

def _cfg(**train):
    return config_from_dict({"task": "regression", "model": {"arch": "linear", "args": {"in_features": 2}, "base": None},
                             "data": {"train": "t.csv"}, "train": {"batch_size": 4, **train}},
                            check_files=False)


def test_resume_on_fewer_workers_keeps_the_global_batch_by_raising_grad_accum(tmp_path):
    saved = {"workers": 4, "config": config_to_dict(_cfg(grad_accum=1))}
    cfg, notes = resume_config(saved, _cfg(grad_accum=1), 2, tmp_path)
    assert cfg.train.grad_accum == 2
    assert any("grad_accum 1 -> 2 keeps 16 examples per step" in n for n in notes)
    cfg, _ = resume_config(saved, _cfg(grad_accum=1), 1, tmp_path)
    assert cfg.train.grad_accum == 4


def test_resume_on_more_workers_lowers_grad_accum_or_accepts_a_matching_one(tmp_path):
    saved = {"workers": 1, "config": config_to_dict(_cfg(grad_accum=4))}
    assert resume_config(saved, _cfg(grad_accum=4), 2, tmp_path)[0].train.grad_accum == 2
    assert resume_config(saved, _cfg(grad_accum=1), 4, tmp_path)[0].train.grad_accum == 1


def test_resume_is_refused_when_no_whole_grad_accum_keeps_the_global_batch(tmp_path):
    saved = {"workers": 2, "config": config_to_dict(_cfg(grad_accum=1))}
    with pytest.raises(UserError, match=r"cannot resume on 3 worker\(s\).*8 examples per step") as info:
        resume_config(saved, _cfg(grad_accum=1), 3, tmp_path)
    assert "divides 2" in info.value.fix
    with pytest.raises(UserError, match="8 examples per step"):      # a changed grad_accum that does not fit
        resume_config(saved, _cfg(grad_accum=3), 1, tmp_path)


def test_grad_accum_cannot_change_on_the_same_number_of_workers(tmp_path):
    saved = {"workers": 2, "config": config_to_dict(_cfg(grad_accum=1))}
    with pytest.raises(UserError, match="changed train.grad_accum"):
        resume_config(saved, _cfg(grad_accum=2), 2, tmp_path)
    cfg, notes = resume_config(saved, _cfg(grad_accum=1, strategy="fsdp"), 2, tmp_path)
    assert notes == ["resuming with a changed train.strategy"]


# --- what the launcher says when workers fail ------------------------------------------------

def test_a_killed_worker_is_named_and_the_exit_code_is_the_shells():
    code, problem = explain([Failure(rank=1, exitcode=-signal.SIGKILL), Failure(rank=0, exitcode=dist.PEER_FAILED)], 2)
    assert code == 128 + signal.SIGKILL
    assert "worker rank 1 of 2 was killed by SIGKILL; rank 0 stopped after it" in problem.what


def test_a_crashed_worker_is_named_over_those_the_launcher_stopped():
    code, problem = explain([Failure(rank=0, exitcode=-signal.SIGTERM), Failure(rank=3, exitcode=1),
                             Failure(rank=1, exitcode=dist.PEER_FAILED)], 4)
    assert code == 1
    assert problem.what.startswith("worker rank 3 of 4 failed with exit code 1")


def test_user_errors_and_interrupts_are_reported_by_rank_0_alone():
    assert explain([Failure(0, 2), Failure(1, 2)], 2) == (2, None)
    assert explain([Failure(0, 130), Failure(1, 130)], 2) == (130, None)
    assert explain([Failure(0, 2), Failure(1, -signal.SIGTERM), Failure(2, -signal.SIGTERM)], 3) == (2, None)


def test_one_process_makes_no_collective_calls():
    world = dist.SINGLE
    assert world.sum([1.0, 2.0]) == [1.0, 2.0]
    assert world.gather("x") == ["x"] and world.broadcast(3) == 3
    assert world.on_all(lambda: 5) == 5 and world.on_main(lambda: 6) == 6
    assert not dist.launched() or os.environ.get("WORLD_SIZE") not in (None, "1")


# --- end to end: real workers on CPU with gloo ----------------------------------------------

@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    """A tiny causal-LM run whose examples differ in length (so the loss is a mean over
    tokens, not rows), whose count is odd, and whose 7 steps cross an epoch boundary."""
    pairs = [(f"{a}*{b}=", str(a * b)) for a in range(1, 9) for b in (3, 17, 41, 88, 97)][:-1]   # 39: uneven
    root = write_lm_run(tmp_path_factory.mktemp("dist"), pairs, eval_every_nth=3, seed=5, n_layer=2, seq=16,
                        dropout=0.0, train={"max_steps": 7, "batch_size": 4, "grad_accum": 2, "lr": 0.02,
                                            "log_every": 1, "eval_every": 4, "save_every": 2, "keep_last": None})
    from lora_cli.run.config import load_config
    here = Path.cwd()
    os.chdir(root)
    try:
        train(load_config("config.yaml"), search_path=root)             # the reference: one process, 4 x 2
    finally:
        os.chdir(here)
    return root


def lora_train(project: Path, *args: str, timeout: float = 180, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lora_cli", "train", "config.yaml", *args], cwd=project,
                          capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})})


def assert_same_adapter(a: Path, b: Path, atol: float = 1e-5) -> None:
    x, y = load_file(a / WEIGHTS), load_file(b / WEIGHTS)
    assert x.keys() == y.keys()
    for k in x:
        torch.testing.assert_close(x[k], y[k], atol=atol, rtol=0, msg=k)


def eval_losses(run: Path) -> list[float]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r["eval_loss"] for r in rows if "eval_loss" in r]


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_workers_train_the_adapter_one_process_trains_with_the_same_global_batch(project, strategy):
    # 2 workers x batch 2 x grad_accum 2 = the reference's batch 8
    run = lora_train(project, f"output_dir={strategy}", f"train.strategy={strategy}", "train.batch_size=2",
                     "train.grad_accum=2", "--nproc-per-node", "2")
    assert run.returncode == 0, run.stderr
    assert_same_adapter(project / "run/adapter", project / strategy / "adapter")
    assert eval_losses(project / strategy) == pytest.approx(eval_losses(project / "run"), abs=1e-5)
    assert "global batch 8 = batch 2 x grad_accum 2 x 2 workers" in " ".join(run.stdout.split())
    assert "rank 1" not in run.stdout + run.stderr                    # the other rank stays quiet
    steps = sorted(int(p.name.split("_")[1]) for p in (project / strategy / "checkpoints").iterdir())
    assert steps == [2, 4, 6]                                         # written once, by rank 0


@pytest.mark.slow
def test_a_user_error_found_by_the_workers_is_reported_once_with_exit_code_2(project):
    (project / "taken").mkdir(exist_ok=True)
    (project / "taken" / "notes.txt").write_text("mine")
    run = lora_train(project, "output_dir=taken", "--nproc-per-node", "2")
    assert run.returncode == 2
    assert run.stderr.count("output_dir holds files lora-cli did not write: notes.txt") == 1
    assert "worker rank" not in run.stderr and "Traceback" not in run.stderr
    assert sorted(p.name for p in (project / "taken").iterdir()) == ["notes.txt"]


@pytest.mark.slow
@pytest.mark.parametrize("first, then", [("ddp:2", "single:1"), ("single:1", "fsdp:2")])
def test_a_checkpoint_resumes_on_another_number_of_workers_and_strategy(project, first, then):
    """Killed while writing the step-4 checkpoint, resumed from step 2 elsewhere: the
    adapter equals the uninterrupted one-process run's."""
    out = f"resume-{first}-{then}".replace(":", "")

    def run(spec: str, *extra: str, env=None):
        strategy, workers = spec.split(":")
        batch = ["train.batch_size=4", "train.grad_accum=1"] if workers == "2" else []
        launch = ["--nproc-per-node", workers] if workers != "1" else []
        return lora_train(project, f"output_dir={out}", *batch, *launch, *extra,
                          *([f"train.strategy={strategy}"] if strategy != "single" else []), env=env)

    crashed = run(first, env=fault_env("ckpt-write:4"))
    assert crashed.returncode in (-signal.SIGKILL, 128 + signal.SIGKILL), crashed.stderr
    assert [c.step for c in checkpoints(project / out)] == [2]        # step 4 was cut short
    resumed = run(then, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    said = " ".join((resumed.stdout + resumed.stderr).split())
    assert "resuming from" in said and "keeps 8 examples per step" in said
    assert_same_adapter(project / "run/adapter", project / out / "adapter")


def _worker_pid(launcher: int, rank: int) -> int | None:
    """The pid of the worker with ``rank`` started (directly) by process ``launcher``."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            environ = (entry / "environ").read_bytes().split(b"\0")
        except (OSError, IndexError, ValueError):
            continue
        if ppid == launcher and f"RANK={rank}".encode() in environ:
            return int(entry.name)
    return None


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="finds workers through /proc")
def test_killing_a_worker_ends_the_run_with_its_rank_and_the_exit_code(project):
    proc = subprocess.Popen([sys.executable, "-m", "lora_cli", "train", "config.yaml", "output_dir=killed",
                             "train.max_steps=100000", "train.save_every=null", "train.eval_every=null",
                             "train.batch_size=4", "--nproc-per-node", "2"],
                            cwd=project, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        metrics = project / "killed" / "metrics.jsonl"
        while not (metrics.exists() and metrics.read_text().count("\n") >= 3):   # training is under way
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.2)
        victim = _worker_pid(proc.pid, rank=1)
        assert victim is not None
        os.kill(victim, signal.SIGKILL)
        stdout, stderr = proc.communicate(timeout=60)                  # ends: no hang
    finally:
        proc.kill()
    assert proc.returncode == 128 + signal.SIGKILL
    assert "worker rank 1 of 2 was killed by SIGKILL" in stderr
    assert "Traceback" not in stderr and "ChildFailedError" not in stderr
    assert not (project / "killed" / "adapter").exists()
