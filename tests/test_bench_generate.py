"""Smoke test of bench/generate.py: it runs and writes the rates it promises (never asserted)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_generation_bench_runs_and_writes_every_rate(tmp_path: Path):
    pytest.importorskip("transformers")
    out = tmp_path / "g.json"
    done = subprocess.run([sys.executable, "bench/generate.py", "--new-tokens", "4", "--prompt-tokens", "8",
                           "--layers", "1", "--d-model", "32", "--repeats", "1", "--warmup", "0", "--threads", "1",
                           "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    result = json.loads(out.read_text())
    assert set(result["tokens_per_s"]) == {"gpt_kv_cache", "gpt_no_cache", "hf_transformers_generate",
                                           "hf_through_lora_cli"}
    assert all(rate > 0 for rate in result["tokens_per_s"].values())
