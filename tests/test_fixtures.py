"""Files written by older releases keep working, and the files written now have their
format: tests/fixtures/lora-cli-0.1.0 (the first release) and
tests/fixtures/before-restructure (the last commit before the engine moved into
lora_cli/lora/), each an adapter, a checkpoint and the run's config and metrics, made by
the command in its README.md.

    their adapter evaluates (lora-eval) to the numbers its own run logged, and merges
        (lora-merge --verify) into the base it was trained on
    their checkpoint resumes training (from a copy of the run's folder, elsewhere)
    a run of the same command today writes the same key names and metadata fields
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from typer.testing import CliRunner

from lora_cli.cli import app

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = {name: ROOT / "tests" / "fixtures" / name for name in ("lora-cli-0.1.0", "before-restructure")}
BASE = ROOT / "data/quickstart/base.safetensors"
EVAL = ROOT / "data/quickstart/eval.jsonl"
WEIGHTS = "adapter_model.safetensors"
runner = CliRunner()


def invoke(*args: str):
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.output + repr(result.exception)
    return result.output


def logged(fixture: Path) -> list[dict]:
    return [json.loads(line) for line in (fixture / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(params=list(FIXTURES), ids=list(FIXTURES))
def fixture(request, monkeypatch) -> Path:
    monkeypatch.chdir(ROOT)              # their configs name data/quickstart/... relative to the repo
    return FIXTURES[request.param]


@pytest.mark.slow
def test_the_adapter_evaluates_to_what_its_run_logged(fixture):
    out = json.loads(invoke("eval", fixture / "adapter", "--base", BASE, "--data", EVAL, "--json"))
    rows = [r for r in logged(fixture) if "eval_loss" in r]
    base, final = rows[0], rows[-1]            # the base before step 1, the adapter after the last step
    for name in ("loss", "perplexity", "token_accuracy"):
        assert out["base"][name] == pytest.approx(base[f"eval_{name}"], rel=1e-6), name
        assert out["adapted"][name] == pytest.approx(final[f"eval_{name}"], rel=1e-6), name


def test_the_adapter_merges_and_verifies(fixture, tmp_path):
    merged = tmp_path / "merged.safetensors"
    output = " ".join(invoke("merge", BASE, fixture / "adapter", "-o", merged, "--verify", "--data", EVAL).split())
    assert "verify:" in output and ": ok" in output
    with safe_open(merged, "pt") as f, safe_open(BASE, "pt") as b:
        assert set(f.keys()) == set(b.keys())
        changed = [k for k in f.keys() if not torch.equal(f.get_tensor(k), b.get_tensor(k))]
    assert changed and all(k.endswith(("q_proj.weight", "v_proj.weight")) for k in changed)


def copy_run(fixture: Path, to: Path) -> Path:
    """The run's folder as the old release left it (its adapter aside), somewhere else."""
    to.mkdir(parents=True)
    shutil.copytree(fixture / "checkpoints", to / "checkpoints")
    shutil.copy(fixture / "metrics.jsonl", to / "metrics.jsonl")
    shutil.copy(fixture / "config.yaml", to / "config.yaml")
    return to


@pytest.mark.slow
def test_the_checkpoint_resumes_training(fixture, tmp_path):
    run = copy_run(fixture, tmp_path / "run")
    output = invoke("train", fixture / "config.yaml", f"output_dir={run}", "train.max_steps=6", "--resume")
    assert "resuming from" in output and "step 4" in output
    rows = logged(run)
    assert rows[:len(logged(fixture))] == logged(fixture)          # the old log is kept as it was
    steps = [r["step"] for r in rows if "loss" in r]
    assert steps == [2, 4, 6] and all(r["loss"] == r["loss"] for r in rows if "loss" in r)
    with safe_open(run / "adapter" / WEIGHTS, "pt") as new, safe_open(fixture / "adapter" / WEIGHTS, "pt") as old:
        assert set(new.keys()) == set(old.keys())
        assert any(not torch.equal(new.get_tensor(k), old.get_tensor(k)) for k in new.keys())   # it trained on


# --- formats: what is written today against what the old releases wrote ---------------------

@pytest.fixture(scope="module")
def today(tmp_path_factory) -> Path:
    """The fixtures' command, run by the current code (from the repo root, as they were)."""
    out = tmp_path_factory.mktemp("today") / "run"
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(ROOT)
        invoke("train", "configs/quickstart.yaml", f"output_dir={out}", "lora.rank=2",
               "lora.target_modules=[q_proj,v_proj]", "train.max_steps=4", "train.save_every=4", "train.log_every=2")
    return out


def header(path: Path) -> tuple[set[str], set[str]]:
    with safe_open(path, "pt") as f:
        return set(f.keys()), set((f.metadata() or {}).keys())


def shape_of(value, depth: int = 0):
    """The key structure of nested dicts (down to 3 levels), values left out."""
    if isinstance(value, dict) and depth < 3:
        return {str(k): shape_of(v, depth + 1) for k, v in value.items()}
    return type(value).__name__ if not isinstance(value, dict) else "dict"


# Fields added since a release, on purpose; everything else must be as it was.
# layers_to_transform / layers_pattern: PEFT's own LoraConfig fields, written (null: every layer)
# since lora.layers_to_transform exists.
_PEFT_LAYER_FIELDS = {"layers_to_transform", "layers_pattern"}
ADDED_SINCE = {"lora-cli-0.1.0": {"trainer_state.json": {"inputs"}, "adapter_config.json": _PEFT_LAYER_FIELDS},
               "before-restructure": {"adapter_config.json": _PEFT_LAYER_FIELDS}}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(FIXTURES))
def test_the_files_written_today_have_the_fixtures_format(today, name):
    old = FIXTURES[name]
    added = ADDED_SINCE[name]
    for where in ("adapter", "checkpoints/step_4/adapter"):
        assert header(today / where / WEIGHTS) == header(old / where / WEIGHTS), where
        new_cfg = json.loads((today / where / "adapter_config.json").read_text())
        old_cfg = json.loads((old / where / "adapter_config.json").read_text())
        assert set(new_cfg) - set(old_cfg) == added.get("adapter_config.json", set()), where
        assert set(old_cfg) <= set(new_cfg) and set(new_cfg["lora_cli"]) == set(old_cfg["lora_cli"]), where
        assert all(new_cfg[k] is None for k in added.get("adapter_config.json", set()))     # defaults: no change
        assert {k: v for k, v in new_cfg.items() if k in old_cfg and k not in ("lora_cli", "base_model_name_or_path")} == \
               {k: v for k, v in old_cfg.items() if k not in ("lora_cli", "base_model_name_or_path")}
    assert sorted(p.name for p in (today / "checkpoints/step_4").iterdir()) == \
        sorted(p.name for p in (old / "checkpoints/step_4").iterdir())
    new_state = json.loads((today / "checkpoints/step_4/trainer_state.json").read_text())
    old_state = json.loads((old / "checkpoints/step_4/trainer_state.json").read_text())
    assert set(new_state) - set(old_state) == added.get("trainer_state.json", set())
    assert set(old_state) <= set(new_state)
    # eval (samples, exact match) and log (tensorboard): config sections added since, defaults off
    assert set(new_state["config"]) - set(old_state["config"]) == {"eval", "log"}
    assert set(old_state["config"]) <= set(new_state["config"])
    new_pt = torch.load(today / "checkpoints/step_4/trainer_state.pt", weights_only=True)
    old_pt = torch.load(old / "checkpoints/step_4/trainer_state.pt", weights_only=True)
    assert set(new_pt) == set(old_pt)
    for key in new_pt:
        if isinstance(new_pt[key], dict) and key != "loop":
            assert shape_of(new_pt[key]).keys() == shape_of(old_pt[key]).keys(), key
    assert set(new_pt.get("loop", {})) >= set(old_pt.get("loop", {}))
    new_rows, old_rows = logged(today), logged(old)
    assert [set(r) for r in new_rows] == [set(r) for r in old_rows]
