"""bench/memory.py runs (a smoke run on the tiny size) and reports every variant."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_memory_tier_smoke(tmp_path):
    pytest.importorskip("torchao")
    out = tmp_path / "memory.json"
    done = subprocess.run([sys.executable, "bench/memory.py", "--sizes", "tiny", "--steps", "1", "--threads", "1",
                           "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = json.loads(out.read_text())
    assert {(r["base"], r["checkpointing"]) for r in rows} == {
        (b, c) for b in ("float32", "nf4", "int8") for c in (False, True)}
    assert all(r["peak_rss_bytes"] > 0 and r["estimate_bytes"] > 0 and r["loss"] > 0 for r in rows)
