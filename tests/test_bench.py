"""Smoke tests of the benchmark harness (bench/): it runs, writes the JSON it promises,
and PEFT and lora_cli agree on the losses. No timing assertions: speed is measured in
bench/, on a quiet machine, never asserted here."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("peft")
pytest.importorskip("transformers")

ROOT = Path(__file__).resolve().parents[1]
FAST = ["--quick", "--repeats", "1", "--steps", "2", "--warmup", "1", "--threads", "1", "--dropouts", "0"]


def run_bench(tmp_path: Path, *args: str) -> dict:
    out = tmp_path / "results.json"
    done = subprocess.run([sys.executable, "bench/run.py", *FAST, *args, "--out", str(out),
                           "--markdown", str(tmp_path / "RESULTS.md")],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert (tmp_path / "RESULTS.md").read_text().count("| ---") >= 1
    return json.loads(out.read_text())


def check_parity(row: dict) -> None:
    parity = row["parity"]
    assert parity["checked"] and parity["ok"], parity
    assert parity["max_rel_diff"] <= 1e-5 and parity["same_base_and_params"]
    peft, ours = row["stats"]["peft"], row["stats"]["ours"]
    assert peft["trainable_params"] == ours["trainable_params"] > 0
    assert peft["adapter_bytes"] > 0 and ours["adapter_bytes"] > 0


@pytest.mark.slow
def test_one_layer_without_peft(tmp_path):
    # PEFT is left out here only to keep the test fast (importing it takes ~10 s on a
    # busy machine); the tiny Llama test below checks it against ours.
    result = run_bench(tmp_path, "--tier", "A", "--variants", "floor,full,ours")
    assert {"cpu", "cores", "threads", "versions"} <= set(result["machine"])
    assert result["settings"]["adamw"]["foreach"] is True
    (row,) = result["rows"]                       # --quick: N=256, 768x768, r=8, dropout 0
    assert row["tier"] == "A" and {k: row["config"][k] for k in "Nkdr"} == {"N": 256, "k": 768, "d": 768, "r": 8}
    for variant in ("floor", "full", "ours"):
        (run,) = row["runs"][variant]
        assert "error" not in run, run.get("error")
        assert run["config"]["variant"] == variant and len(run["losses"]) == 2
        assert run["step_s"] > 0 and run["peak_rss_mb"] > 0
        assert row["stats"][variant]["n"] == 1
    # the same base weights everywhere; nothing trains in floor, everything in full
    assert len({row["runs"][v][0]["base_checksum"] for v in ("floor", "full", "ours")}) == 1
    assert row["stats"]["floor"]["trainable_params"] == 0
    assert row["stats"]["full"]["trainable_params"] == 768 * 768 + 768
    assert row["stats"]["ours"]["trainable_params"] == 8 * (768 + 768)
    assert row["stats"]["ours"]["adapter_bytes"] > 0 and row["stats"]["peft"] is None
    assert row["ratios"]["ours_over_full"] > 0 and row["ratios"]["ours_over_floor"] > 0
    assert row["ratios"]["ours_over_peft_time"] is None and not row["parity"]["checked"]
    assert row["ideal"]["ours_over_full"] == pytest.approx(2 / 3 + 8 * 1536 / 768**2)
    assert row["ideal"]["ours_over_floor"] == pytest.approx(1 + 1.5 * 8 * 1536 / 768**2)


@pytest.mark.slow
def test_tiny_llama_parity(tmp_path):
    result = run_bench(tmp_path, "--tier", "B", "--sizes", "tiny", "--variants", "peft,ours")
    (row,) = result["rows"]                       # --quick: all linear, r=16, dropout 0
    assert row["config"]["targets"] == "all" and row["config"]["r"] == 16
    assert row["runs"]["ours"][0]["adapted_modules"] == 2 * 7      # not lm_head
    assert row["stats"]["floor"] is None and row["ratios"]["ours_over_floor"] is None
    assert row["ratios"]["ours_over_peft_time"] > 0
    assert 2 / 3 < row["ideal"]["ours_over_full"] < 1.5
    check_parity(row)


@pytest.mark.slow
def test_tiny_llama_dora_rows(tmp_path):
    result = run_bench(tmp_path, "--tier", "B", "--sizes", "tiny", "--variants", "peft,ours", "--dora")
    plain, dora = result["rows"]                  # --quick --dora: all linear r=16, then the same with DoRA
    assert not plain["config"].get("dora") and dora["config"]["dora"] is True and dora["name"].endswith("DoRA")
    assert dora["ratios"]["dora_over_lora_time"] > 0 and dora["ratios"]["ours_over_peft_time"] > 0
    # a DoRA layer trains its magnitude too: one value per output row of every adapted layer
    assert dora["stats"]["ours"]["trainable_params"] > plain["stats"]["ours"]["trainable_params"]
    check_parity(dora)                            # same losses as PEFT's DoRA at dropout 0
    assert "Tier B, DoRA" in (tmp_path / "RESULTS.md").read_text()


@pytest.mark.slow
def test_tier_d_smoke(tmp_path):
    """bench/jobs.py --quick runs both tools on the tiny model and reports every column."""
    out = tmp_path / "d.json"
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "jobs.py"), "--quick", "--repeats", "1",
                           "--out", str(out), "--threads", "1"], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    result = json.loads(out.read_text())
    for tool in ("lora-cli", "trainer+peft"):
        row = result["table"][tool]
        assert row["steps"] == 3 and row["wall_s"]["median"] > 0 and row["peak_rss_mb"]["median"] > 0
        assert row["heldout_loss"]["median"] > 0
    assert result["data"]["loss_tokens"] > 0 and result["data"]["packed_rows"] < result["data"]["examples"]
