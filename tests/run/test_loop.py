"""The training loop and what ``train()`` returns (lora_cli/run/loop.py, run/train.py).

Every case trains a one-hidden-layer ``mlp`` on a 64-row regression set in-process
(the Python API, no CLI): a few steps take a fraction of a second.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lora_cli.lora.inject import lora_layers
from lora_cli.models import build_model, save_state_dict
from lora_cli.run import loop as looplib
from lora_cli.run.config import config_from_dict
from lora_cli.run.loop import lr_factor
from lora_cli.run.train import plan, train

N_TRAIN, N_EVAL = 64, 16


def rows(n: int, seed: int) -> str:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, generator=g)
    y = x @ torch.tensor([1.5, -2.0, 0.5]) + 0.3
    return "a,b,c,y\n" + "".join(",".join(f"{v:.5f}" for v in r) + f",{t:.5f}\n" for r, t in zip(x.tolist(), y.tolist()))


def make_project(root: Path) -> Path:
    """train.csv, eval.csv (y linear in a, b, c) and a random base in ``root``."""
    (root / "train.csv").write_text(rows(N_TRAIN, 0))
    (root / "eval.csv").write_text(rows(N_EVAL, 1))
    g = torch.Generator().manual_seed(1)
    model = build_model(arch="mlp", args={"in_features": 3, "out_features": 1, "hidden": 8})
    save_state_dict({k: torch.randn(v.shape, generator=g) * 0.5 for k, v in model.state_dict().items()},
                    root / "base.safetensors")
    return root


@pytest.fixture
def proj(tmp_path, monkeypatch) -> Path:
    monkeypatch.chdir(tmp_path)
    return make_project(tmp_path)


def config(output_dir: str = "run", **train):
    t = {"max_steps": 6, "batch_size": 16, "log_every": 2, "lr": 0.01, **train}
    return config_from_dict({
        "seed": 0, "device": "cpu", "task": "regression", "output_dir": output_dir,
        "model": {"arch": "mlp", "args": {"hidden": 8}, "base": "base.safetensors"},
        "data": {"train": "train.csv", "eval": "eval.csv"},
        "lora": {"rank": 2, "alpha": 4},
        "train": t,
    })


def log(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def adapter(run: Path) -> dict[str, torch.Tensor]:
    return load_file(run / "adapter" / "adapter_model.safetensors")


def test_train_returns_what_it_wrote_and_what_it_measured(proj):
    cfg = config(max_steps=None, epochs=2, eval_every=None)
    result = train(cfg)
    per_epoch = math.ceil(N_TRAIN / 16)
    assert result.steps == 2 * per_epoch and result.epochs == pytest.approx(2.0)
    assert result.global_batch == 16 and result.world.size == 1
    assert result.adapter_dir == Path("run") / "adapter"
    assert result.adapter_bytes == (proj / "run/adapter/adapter_model.safetensors").stat().st_size
    assert result.base_bytes == (proj / "base.safetensors").stat().st_size
    rows_ = log(proj / "run")
    train_rows = [r for r in rows_ if "loss" in r]
    eval_rows = [r for r in rows_ if "eval_loss" in r]
    assert [r["step"] for r in train_rows] == list(range(2, result.steps + 1, 2))
    assert result.train_loss == train_rows[-1]["loss"]
    # no eval_every: the base is evaluated before step 1, then each epoch's end
    assert [r["step"] for r in eval_rows] == [0, per_epoch, 2 * per_epoch]
    assert result.eval_base["loss"] == eval_rows[0]["eval_loss"] and result.eval_base["n"] == N_EVAL
    assert result.eval_final["loss"] == eval_rows[-1]["eval_loss"]
    assert result.summary.trainable == sum(t.numel() for t in adapter(proj / "run").values())
    assert 0 <= result.eval_seconds <= result.seconds and 0 <= result.train_seconds <= result.seconds


def test_plan_counts_steps_from_epochs_or_max_steps(proj):
    assert plan(config(max_steps=None, epochs=3, batch_size=10)).total_steps == 3 * math.ceil(N_TRAIN / 10)
    p = plan(config(max_steps=5, batch_size=8, grad_accum=3))
    assert p.steps_per_epoch == math.ceil(N_TRAIN / 24) and p.total_steps == 5 and p.epochs == 2


def test_the_held_out_loss_falls_on_a_learnable_task(proj):
    result = train(config(max_steps=40, lr=0.05, log_every=10, eval_every=40, scheduler="constant"))
    assert result.eval_final["loss"] < 0.5 * result.eval_base["loss"]
    losses = [r["loss"] for r in log(proj / "run") if "loss" in r]
    assert losses[-1] < losses[0]


def test_grad_accumulation_trains_as_one_batch_of_the_same_examples(proj):
    """batch 16 x 1 and batch 8 x 2 (and 4 x 4) see the same 16 examples per step; the loss
    is a mean over all of them either way, so the adapters agree to float rounding."""
    runs = {}
    for name, (batch, accum) in {"one": (16, 1), "two": (8, 2), "four": (4, 4)}.items():
        result = train(config(output_dir=name, batch_size=batch, grad_accum=accum, log_every=1, optimizer="sgd",
                              lr=0.1))
        assert result.global_batch == 16
        runs[name] = (adapter(proj / name), [r["loss"] for r in log(proj / name) if "loss" in r])
    ref_tensors, ref_losses = runs["one"]
    assert any(bool(t.abs().sum() > 0) for k, t in ref_tensors.items() if "lora_B" in k)    # it trained
    for tensors, losses in (runs["two"], runs["four"]):
        assert tensors.keys() == ref_tensors.keys()
        for k in tensors:
            torch.testing.assert_close(tensors[k], ref_tensors[k], atol=1e-6, rtol=1e-5, msg=k)
        assert losses == pytest.approx(ref_losses, rel=1e-5)


@pytest.mark.parametrize("scheduler", ["cosine", "linear", "constant"])
def test_the_logged_learning_rate_is_the_schedule_and_the_one_the_optimizer_used(proj, monkeypatch, scheduler):
    """With plain SGD (no momentum, no decay, no clipping) a step moves each trained
    tensor by exactly -lr * grad: the lr it used is read back from the update itself."""
    used: list[float] = []
    real = looplib.make_optimizer

    def watched(cfg, params):
        opt = real(cfg, params)
        before: dict = {}

        def pre(o, args, kwargs):
            before.update({id(q): (q.detach().clone(), q.grad.detach().clone()) for q in params if q.grad is not None})

        def post(o, args, kwargs):
            ratios = []
            for q in params:
                old, grad = before[id(q)]
                big = grad.abs() > 1e-3
                ratios += ((old - q.detach())[big] / grad[big]).tolist()
            used.append(sum(ratios) / len(ratios))

        opt.register_step_pre_hook(pre)
        opt.register_step_post_hook(post)
        return opt

    monkeypatch.setattr(looplib, "make_optimizer", watched)
    total, warmup, lr = 8, 3, 0.05
    train(config(max_steps=total, warmup_steps=warmup, scheduler=scheduler, optimizer="sgd", lr=lr,
                 clip_grad_norm=None, log_every=1))
    expected = [lr * lr_factor(s, total=total, warmup=warmup, kind=scheduler) for s in range(total)]
    logged = [r["lr"] for r in log(proj / "run") if "loss" in r]
    assert logged == pytest.approx(expected, rel=1e-9)
    assert used == pytest.approx(expected, rel=1e-3)
    assert logged[0] < logged[warmup]             # warmup ramps up from below the peak


def test_lr_factor_warms_up_linearly_then_decays_to_zero():
    total, warmup = 20, 4
    for kind in ("cosine", "linear"):
        f = [lr_factor(s, total=total, warmup=warmup, kind=kind) for s in range(total + 1)]
        assert f[:warmup] == pytest.approx([(s + 1) / (warmup + 1) for s in range(warmup)])
        assert f[warmup] == 1.0 and f[total] == pytest.approx(0.0, abs=1e-12)
        assert all(a >= b for a, b in zip(f[warmup:], f[warmup + 1:]))       # never rises after warmup
    assert lr_factor(15, total=total, warmup=warmup, kind="constant") == 1.0


def test_only_the_lora_factors_change_and_the_base_is_bitwise_the_file(proj):
    p = plan(config())
    base = load_file(proj / "base.safetensors")
    train(config(), prepared=p)
    state = p.built.model.state_dict()
    for k, v in base.items():
        assert torch.equal(state[k], v), k
    for layer in lora_layers(p.built.model).values():
        assert layer.lora_B.abs().sum() > 0
