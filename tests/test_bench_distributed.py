"""Smoke test of bench/distributed.py --quick: it runs, the DDP comm hook counts exactly
the trainable parameters' bytes, 1 and 2 workers train the same, and the memory figures
are there: every worker's peak RSS, and the parameter bytes each holds (all of them
under ddp, about 1/W under fsdp, never all of them even while a block is gathered). No timing
assertions: speed is measured in bench/, never asserted here."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_quick_run(tmp_path):
    out, md = tmp_path / "dist.json", tmp_path / "dist.md"
    done = subprocess.run([sys.executable, "bench/distributed.py", "--quick", "--out", str(out), "--markdown", str(md)],
                          check=False, cwd=ROOT, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert sum(line.startswith("| --- |") for line in md.read_text().splitlines()) == 2
    result = json.loads(out.read_text())

    (row,) = result["comm"]                                   # --quick: the quickstart model only
    adapter, full, fsdp = (row["variants"][v] for v in ("adapter", "full", "adapter-fsdp"))
    for v in (adapter, full):
        assert v["matches_analytic"] and v["same_every_step_and_rank"], v
        assert v["measured_bytes_per_step"] == v["analytic_bytes"] == 4 * v["trainable_params"]
    assert adapter["trainable_params"] < full["trainable_params"] and row["full_over_adapter_measured"] > 1
    # fsdp reduce-scatters the adapter's gradients, and all-gathers the (frozen) weights
    assert fsdp["ops_bytes_per_step"]["reduce_scatter_single"] == adapter["analytic_bytes"]
    assert fsdp["ops_bytes_per_step"]["all_gather_single"] > 0

    summary = result["throughput"]["summary"]
    assert summary["single"]["global_batch"] == summary["ddp"]["global_batch"] == summary["fsdp"]["global_batch"]
    for kind in ("ddp", "fsdp"):
        assert summary[kind]["workers"] == 2 and summary[kind]["same_loss"], summary[kind]
        assert summary[kind]["tokens_per_s"]["median"] > 0 and summary[kind]["over_single"] > 0
    check_memory(result)


def check_memory(result: dict) -> None:
    (row,) = result["comm"]
    ddp, fsdp = row["variants"]["adapter"], row["variants"]["adapter-fsdp"]
    whole = ddp["param_bytes_whole"]
    assert whole == fsdp["param_bytes_whole"] > 0
    assert ddp["param_bytes_held_per_rank"] == [whole, whole]             # ddp: every worker holds the model
    for held, peak in zip(fsdp["param_bytes_held_per_rank"], fsdp["param_bytes_held_in_forward_per_rank"]):
        assert 0.45 * whole <= held <= 0.6 * whole                         # fsdp: its half (+ the padding)
        assert held < peak < whole                                         # plus one gathered block, not all
    summary = result["throughput"]["summary"]
    for kind, workers in (("single", 1), ("ddp", 2), ("fsdp", 2)):
        per = summary[kind]["peak_rss_bytes_per_worker"]
        assert len(per) == workers and all(w["median"] > 2**20 for w in per), (kind, per)
    for run in result["throughput"]["runs"]["fsdp"]:
        assert [w["rank"] for w in run["worker_memory"]] == [0, 1] and run["launcher_peak_rss_bytes"] > 0

