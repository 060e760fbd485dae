"""The plan's memory estimate (lora_cli.run.memory): its arithmetic, its activation
measurement, and, in a fresh process, the estimate against a measured peak RSS."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from lora_cli.cli import app
from lora_cli.lora.inject import apply_lora
from lora_cli.models.gpt import GPT
from lora_cli.run.memory import Activations, MemoryEstimate, measure_activations

ROOT = Path(__file__).resolve().parents[2]


def _gpt() -> GPT:
    torch.manual_seed(0)
    model = GPT(vocab_size=64, max_seq_len=64, n_layer=3, n_head=2, d_model=32)
    apply_lora(model, rank=4, alpha=8, target_modules="all-linear")
    return model


def test_activations_scale_with_the_batch_and_checkpointing_keeps_less():
    model = _gpt()
    one = measure_activations(model, "causal_lm", torch.randint(0, 64, (1, 48)), torch.randint(0, 64, (1, 48)))
    four = measure_activations(model, "causal_lm", torch.randint(0, 64, (4, 48)), torch.randint(0, 64, (4, 48)))
    assert len(one.blocks) == 3 and all(b > 0 for b in one.blocks)
    assert abs(four.plain - one.plain) <= 0.05 * one.plain           # per example, whatever the batch
    assert one.checkpointed < 0.6 * one.plain
    assert one.block_inputs == (48 * 32 * 4,) * 3                     # (T, C) float32 per block
    model.gradient_checkpointing = True                              # measured as if off, left on
    again = measure_activations(model, "causal_lm", torch.randint(0, 64, (1, 48)), torch.randint(0, 64, (1, 48)))
    assert again.plain == one.plain and model.gradient_checkpointing


def test_the_largest_batch_fits_and_one_more_does_not():
    est = MemoryEstimate(base_weights=1000, lora_weights=10, gradients=10, optimizer=20,
                         per_example=Activations(outside=50, blocks=(100, 100), block_inputs=(5, 5), largest=10),
                         batch_size=4, checkpointing=False)
    for limit in (1040, 2000, 10_000, 123_456):
        for ck in (False, True):
            b = est.largest_batch(limit, ck)
            assert est.total(b, ck) <= limit < est.total(b + 1, ck) or (b == 0 and est.fixed > limit - 1)
    assert est.largest_batch(1000) == 0
    assert sum(n for _, n in est.parts()) == est.total()


def test_memory_limit_goes_with_dry_run(tmp_path):
    result = CliRunner().invoke(app, ["train", str(ROOT / "configs/quickstart.yaml"), "--memory-limit", "1"])
    assert result.exit_code == 2 and "--dry-run" in result.output


PROBE = r'''
import gc, json, os, sys
import torch
torch.set_num_threads(1)
from lora_cli.run.config import load_config
from lora_cli.run.train import plan, train
from lora_cli.run.memory import estimate
import lora_cli.run.loop, safetensors.torch
cfg = load_config("configs/quickstart.yaml", sys.argv[2:])
if sys.argv[1] == "estimate":
    print(json.dumps(estimate(plan(cfg)).total()))
    raise SystemExit
# warm the torch runtime (kernels, autograd and optimizer code paths) so the delta is the run's own
m = torch.nn.Sequential(torch.nn.Embedding(300, 64), torch.nn.Linear(64, 300))
opt = torch.optim.AdamW(m.parameters(), foreach=True)
for _ in range(2):
    torch.nn.functional.cross_entropy(m(torch.randint(0, 300, (8, 96))).flatten(0, 1),
                                      torch.randint(0, 300, (8 * 96,))).backward()
    opt.step()
del m, opt
gc.collect()
before = int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
train(cfg)
# VmHWM: this process's own high-water mark (ru_maxrss would carry the forking parent's across exec)
peak = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:")) * 1024
print(json.dumps(peak - before))
'''


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc and glibc's malloc settings")
@pytest.mark.parametrize("checkpointing", ["false", "true"])
def test_the_estimate_is_within_25_percent_of_the_measured_peak(tmp_path, checkpointing):
    # glibc's default keeps freed blocks of a growing mmap threshold in the heap, so its RSS
    # counts memory the run no longer holds; a fixed threshold hands big blocks back at free.
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": "1"}
    overrides = ["device=cpu", "data.eval=null", "train.max_steps=2", "train.batch_size=32",
                 f"train.gradient_checkpointing={checkpointing}", f"output_dir={tmp_path / 'run'}"]

    def probe(mode: str) -> int:
        done = subprocess.run([sys.executable, "-c", PROBE, mode, *overrides], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-2000:]
        return json.loads(done.stdout.strip().splitlines()[-1])

    estimated, measured = probe("estimate"), probe("measure")
    assert abs(estimated - measured) <= 0.25 * measured, (estimated, measured)
