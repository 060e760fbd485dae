"""Base against adapted (``lora-eval``) and merged against unmerged (``--verify``),
lora_cli/run/compare.py: the numbers are those a hand computation gives on the same
tiny model, and a merged file that is not base + adapter is caught."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from test_loop import config, make_project

from lora_cli.lora.adapter import load_adapter, read_adapter
from lora_cli.lora.merge_files import merge_checkpoint
from lora_cli.models import build_model
from lora_cli.run.compare import compare, verify_merge
from lora_cli.run.train import train


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    root = make_project(tmp_path_factory.mktemp("compare"))
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(root)
        train(config(max_steps=8, lr=0.05))
    return root


@pytest.fixture
def trained(project, monkeypatch) -> Path:
    monkeypatch.chdir(project)         # the adapter names its base and data relative to here
    return project


def base_model(root: Path) -> torch.nn.Module:
    model = build_model(arch="mlp", args={"in_features": 3, "out_features": 1, "hidden": 8})
    model.load_state_dict(load_file(root / "base.safetensors"))
    return model.eval()


def by_hand(model: torch.nn.Module, path: Path) -> dict:
    with open(path) as fh:
        table = [[float(v) for v in row.values()] for row in csv.DictReader(fh)]
    with torch.no_grad():
        pred = model(torch.tensor([r[:3] for r in table])).squeeze(-1).tolist()
    y = [r[3] for r in table]
    n = len(y)
    mse = sum((p - t) ** 2 for p, t in zip(pred, y)) / n
    var = sum((t - sum(y) / n) ** 2 for t in y) / n
    return {"mse": mse, "mae": sum(abs(p - t) for p, t in zip(pred, y)) / n, "r2": 1 - mse / var, "n": n}


def assert_metrics(got: dict, want: dict) -> None:
    assert got["n"] == want["n"]
    for k in ("mse", "mae", "r2"):
        assert got[k] == pytest.approx(want[k], rel=1e-5, abs=1e-7), k


def test_lora_eval_numbers_are_the_hand_computed_ones(trained):
    result = compare(trained / "run" / "adapter", batch_size=5)            # 16 rows: uneven batches
    assert_metrics(result.base, by_hand(base_model(trained), trained / "eval.csv"))
    adapted = load_adapter(base_model(trained), trained / "run" / "adapter")
    assert_metrics(result.adapted, by_hand(adapted.eval(), trained / "eval.csv"))
    assert result.adapted["mse"] != result.base["mse"]                     # the adapter changed something
    assert result.delta()["mse"] == pytest.approx(result.adapted["mse"] - result.base["mse"])
    other = compare(trained / "run" / "adapter", data=str(trained / "train.csv"))
    assert_metrics(other.base, by_hand(base_model(trained), trained / "train.csv"))


def test_lora_eval_of_a_merged_file_equals_base_plus_adapter(trained):
    merged = trained / "merged-eval.safetensors"
    merge_checkpoint(trained / "base.safetensors", [read_adapter(trained / "run" / "adapter")], merged, force=True)
    adapted = compare(trained / "run" / "adapter")
    via_merge = compare(trained / "run" / "adapter", merged=str(merged))
    assert via_merge.adapted_label == "merged"
    assert_metrics(via_merge.adapted, adapted.adapted)


def test_verify_passes_a_true_merge_and_catches_a_tampered_one(trained):
    adapter, base = trained / "run" / "adapter", trained / "base.safetensors"
    merged = trained / "merged-verify.safetensors"
    merge_checkpoint(base, [read_adapter(adapter)], merged, force=True)
    good = verify_merge(adapter, base, merged)
    assert good.ok and good.batches >= 1 and good.max_abs_diff <= good.tolerance

    assert not verify_merge(adapter, base, base).ok                     # the adapter left out
    state = load_file(merged)
    (name,) = [k for k in state if k.endswith("weight") and state[k].shape == (8, 3)]   # the adapted layer
    state[name][0, 0] += 0.05                                           # one element off
    save_file(state, str(trained / "tampered.safetensors"))
    bad = verify_merge(adapter, base, trained / "tampered.safetensors")
    assert not bad.ok and bad.max_abs_diff > bad.tolerance
