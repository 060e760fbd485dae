"""End-to-end: lora-train, lora-merge and lora-eval on tiny configs, through the CLI."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from lora_cli.cli import app

runner = CliRunner()
ROOT = Path(__file__).resolve().parents[1]


def invoke(*args: str):
    return runner.invoke(app, [str(a) for a in args])


def write_csv(path: Path, x: torch.Tensor, y, header=None) -> None:
    header = header or [f"x{i}" for i in range(x.shape[1])] + ["y"]
    lines = [",".join(header)]
    lines += [",".join(f"{v:.6f}" for v in row) + f",{t}" for row, t in zip(x.tolist(), y)]
    path.write_text("\n".join(lines) + "\n")


@pytest.fixture
def regression_run(tmp_path: Path, monkeypatch) -> Path:
    """A 6-feature regression task, a seeded MLP base on disk, and a config that adapts it."""
    monkeypatch.chdir(tmp_path)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(96, 6, generator=g)
    y = (x @ torch.linspace(-1, 1, 6) * 3 + 1).tolist()
    write_csv(tmp_path / "train.csv", x[:64], [f"{v:.6f}" for v in y[:64]])
    write_csv(tmp_path / "eval.csv", x[64:], [f"{v:.6f}" for v in y[64:]])
    from lora_cli.models import build_model
    torch.manual_seed(1)
    base = build_model(arch="mlp", args={"in_features": 6, "out_features": 1, "hidden": 16})
    save_file({k: v.contiguous() for k, v in base.state_dict().items()}, tmp_path / "base.safetensors")
    config = {
        "seed": 0, "device": "cpu", "task": "regression", "output_dir": "run",
        "model": {"arch": "mlp", "args": {"hidden": 16}, "base": "base.safetensors"},
        "data": {"train": "train.csv", "eval": "eval.csv"},
        "lora": {"rank": 2, "alpha": 4, "target_modules": "all-linear"},
        "train": {"epochs": 15, "batch_size": 16, "lr": 0.02, "log_every": 4},
    }
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    return tmp_path


def rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_train_writes_adapter_config_and_metrics_and_loss_falls(regression_run: Path):
    before = load_file("base.safetensors")
    result = invoke("train", "config.yaml")
    assert result.exit_code == 0, result.output
    run = regression_run / "run"
    curves = {"curves.png"} if importlib.util.find_spec("matplotlib") else set()   # the plot extra
    assert {p.name for p in run.iterdir()} == {"adapter", "config.yaml", "metrics.jsonl"} | curves
    assert {p.name for p in (run / "adapter").iterdir()} == {"adapter_model.safetensors", "adapter_config.json"}
    log = rows(run / "metrics.jsonl")
    train_rows = [r for r in log if "loss" in r]
    eval_rows = [r for r in log if "eval_loss" in r]
    assert [r["step"] for r in train_rows] == sorted({r["step"] for r in train_rows})
    assert train_rows[-1]["loss"] < 0.5 * train_rows[0]["loss"]
    assert eval_rows[0]["step"] == 0 and eval_rows[-1]["eval_loss"] < 0.5 * eval_rows[0]["eval_loss"]
    # the base file is untouched, and the adapter holds exactly the LoRA tensors of the 3 Linear layers
    after = load_file("base.safetensors")
    assert all(torch.equal(before[k], after[k]) for k in before)
    keys = set(load_file(run / "adapter" / "adapter_model.safetensors"))
    # all-linear: every Linear but the output head (the MLP's last child, named "head")
    assert keys == {f"base_model.model.layers.{i}.lora_{f}.weight" for i in (0, 1) for f in "AB"}
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["lora"]["rank"] == 2 and saved["model"]["base"] == "base.safetensors"


def test_overrides_change_the_run(regression_run: Path):
    result = invoke("train", "config.yaml", "lora.rank=3", "train.max_steps=5", "output_dir=other")
    assert result.exit_code == 0, result.output
    tensors = load_file(regression_run / "other" / "adapter" / "adapter_model.safetensors")
    assert {t.shape[0] for k, t in tensors.items() if "lora_A" in k} == {3}
    assert max(r["step"] for r in rows(regression_run / "other" / "metrics.jsonl")) == 5


def test_dry_run_reports_plan_and_writes_nothing(regression_run: Path):
    result = invoke("train", "config.yaml", "--dry-run")
    assert result.exit_code == 0, result.output
    assert "layers.0" in result.output and "trainable parameters" in result.output
    assert "steps per epoch" in result.output and "rows 64" in result.output
    assert not (regression_run / "run").exists()


def test_bad_config_exit_2_with_key_path_and_no_traceback(regression_run: Path):
    result = invoke("train", "config.yaml", "lora.rank=0", "train.optimizr=adam")
    assert result.exit_code == 2
    assert "lora.rank" in result.output and "did you mean 'optimizer'" in result.output
    assert "Traceback" not in result.output
    assert not (regression_run / "run").exists()


def test_existing_output_dir_needs_overwrite(regression_run: Path):
    assert invoke("train", "config.yaml", "train.max_steps=2").exit_code == 0
    again = invoke("train", "config.yaml", "train.max_steps=2")
    assert again.exit_code == 2 and "--overwrite" in again.output
    (regression_run / "run" / "notes.txt").write_text("mine")
    assert invoke("train", "config.yaml", "train.max_steps=2", "--overwrite").exit_code == 0
    assert (regression_run / "run" / "notes.txt").read_text() == "mine"   # only the run's own files go


def test_merge_then_eval_merged_matches_base_plus_adapter(regression_run: Path):
    assert invoke("train", "config.yaml").exit_code == 0
    base_before = (regression_run / "base.safetensors").read_bytes()
    merged = invoke("merge", "base.safetensors", "run/adapter", "-o", "merged.safetensors", "--verify")
    assert merged.exit_code == 0, merged.output
    assert "verify" in merged.output and "ok" in merged.output
    assert (regression_run / "base.safetensors").read_bytes() == base_before

    adapted = invoke("eval", "run/adapter", "--json")
    from_merged = invoke("eval", "run/adapter", "--merged", "merged.safetensors", "--json")
    assert adapted.exit_code == 0 and from_merged.exit_code == 0, adapted.output + from_merged.output
    a, m = json.loads(adapted.stdout), json.loads(from_merged.stdout)
    assert a["base"] == m["base"]
    for key in ("mse", "mae", "r2"):
        assert m["merged"][key] == pytest.approx(a["adapted"][key], rel=1e-5, abs=1e-6)
    assert a["adapted"]["mse"] < a["base"]["mse"]


def test_merge_leaves_untouched_tensors_bit_identical(regression_run: Path):
    assert invoke("train", "config.yaml", "lora.target_modules=[layers.0]").exit_code == 0
    assert invoke("merge", "base.safetensors", "run/adapter").exit_code == 0
    base, merged = load_file("base.safetensors"), load_file("base-merged.safetensors")
    assert set(base) == set(merged)
    changed = {k for k in base if not torch.equal(base[k], merged[k])}
    assert changed == {"layers.0.weight"}


def test_merge_refuses_wrong_base_and_existing_output(regression_run: Path):
    assert invoke("train", "config.yaml", "train.max_steps=3").exit_code == 0
    other = {k: v + 0.5 for k, v in load_file("base.safetensors").items()}
    save_file(other, regression_run / "other.safetensors")
    wrong = invoke("merge", "other.safetensors", "run/adapter")
    assert wrong.exit_code == 2 and "different base" in wrong.output
    assert not (regression_run / "other-merged.safetensors").exists()
    assert invoke("merge", "other.safetensors", "run/adapter", "--ignore-fingerprint").exit_code == 0

    assert invoke("merge", "base.safetensors", "run/adapter").exit_code == 0
    exists = invoke("merge", "base.safetensors", "run/adapter")
    assert exists.exit_code == 2 and "--force" in exists.output
    assert invoke("merge", "base.safetensors", "run/adapter", "--force").exit_code == 0


def test_eval_from_config_and_adapter_agree(regression_run: Path):
    assert invoke("train", "config.yaml", "train.max_steps=6").exit_code == 0
    by_config = json.loads(invoke("eval", "config.yaml", "--json").stdout)
    by_adapter = json.loads(invoke("eval", "run/adapter", "--json").stdout)
    assert {k: v for k, v in by_config.items() if k != "data"} == {k: v for k, v in by_adapter.items() if k != "data"}
    assert Path(by_config["data"]).resolve() == Path(by_adapter["data"]).resolve()
    assert set(by_config) == {"task", "data", "base", "adapted", "delta"}


def test_eval_classification_reports_accuracy_f1_confusion(tmp_path: Path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(120, 4, generator=g)
    labels = ["cat" if v > 0.3 else "dog" if v > -0.3 else "eel" for v in (x[:, 0] + x[:, 1]).tolist()]
    write_csv(tmp_path / "train.csv", x[:90], labels[:90], header=["a", "b", "c", "d", "label"])
    write_csv(tmp_path / "eval.csv", x[90:], labels[90:], header=["a", "b", "c", "d", "label"])
    config = {"task": "classification", "device": "cpu", "output_dir": "run",
              "model": {"arch": "mlp", "args": {"hidden": 16}, "base": None},
              "data": {"train": "train.csv", "eval": "eval.csv", "target": "label"},
              "lora": {"rank": 4, "alpha": 8, "target_modules": ["layers.0"], "modules_to_save": ["head"]},
              "train": {"epochs": 20, "batch_size": 16, "lr": 0.02}}
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    trained = invoke("train", "config.yaml")
    assert trained.exit_code == 0, trained.output
    assert "random weights" in trained.output
    meta = json.loads((tmp_path / "run" / "adapter" / "adapter_config.json").read_text())["lora_cli"]
    assert meta["label_map"] == {"cat": 0, "dog": 1, "eel": 2}
    result = invoke("eval", "run/adapter")
    assert result.exit_code == 0, result.output
    assert "accuracy" in result.output and "macro_f1" in result.output and "confusion" in result.output
    data = json.loads(invoke("eval", "run/adapter", "--json").stdout)
    assert data["adapted"]["accuracy"] > data["base"]["accuracy"]
    assert sum(map(sum, data["adapted"]["confusion"])) == 30


@pytest.mark.slow
def test_console_scripts_and_module_entry_point(regression_run: Path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    for cmd in (["lora-train"], ["lora-merge"], ["lora-eval"], [sys.executable, "-m", "lora_cli", "train"]):
        done = subprocess.run([*cmd, "--help"], capture_output=True, text=True, env={**env, "COLUMNS": "80"})
        assert done.returncode == 0, done.stderr
        assert "Examples:" in done.stdout and max(map(len, done.stdout.splitlines())) <= 80
    for cmd in (["lora-train"], ["lora-merge"], ["lora-eval"], [sys.executable, "-m", "lora_cli"]):
        done = subprocess.run([*cmd, "--version"], capture_output=True, text=True, env=env)
        assert done.returncode == 0 and done.stdout.startswith("lora-cli "), done.stderr
    bad = subprocess.run(["lora-train", "config.yaml", "lora.alpha=0"], capture_output=True, text=True, env=env)
    assert bad.returncode == 2 and "lora.alpha" in bad.stderr and "Traceback" not in bad.stderr


def test_a_rank_beyond_the_layer_is_noted(regression_run: Path):
    result = invoke("train", "config.yaml", "lora.rank=8", "lora.target_modules=[head]", "--dry-run")
    assert result.exit_code == 0, result.output
    assert "lora.rank 8 is above what 'head'" in result.output and "rank at most 1" in result.output


# --- what is logged is what happened ---------------------------------------------------

def test_the_logged_lr_is_the_one_each_step_used(regression_run: Path):
    from lora_cli.run.train import lr_factor
    result = invoke("train", "config.yaml", "train.max_steps=6", "train.warmup_steps=3", "train.log_every=1",
                    "train.scheduler=linear")
    assert result.exit_code == 0, result.output
    logged = [r["lr"] for r in rows(regression_run / "run" / "metrics.jsonl") if "lr" in r]
    used = [0.02 * lr_factor(s, total=6, warmup=3, kind="linear") for s in range(6)]   # step s+1 uses factor(s)
    assert logged == pytest.approx(used) and logged[0] == pytest.approx(0.02 / 4)


def test_sizes_are_binary_units_named_as_such():
    from lora_cli.console import _size
    assert [_size(n) for n in (512, 1536, 3 * 2**20, 5 * 2**30)] == ["512 B", "1.5 KiB", "3.0 MiB", "5.0 GiB"]


def test_the_summary_separates_training_from_evaluation(regression_run: Path):
    from lora_cli.run.config import load_config
    from lora_cli.run.train import train
    result = train(load_config("config.yaml", ["train.max_steps=8", "train.eval_every=2"]))
    assert result.eval_seconds > 0 and result.checkpoint_seconds == 0
    assert result.train_seconds == pytest.approx(result.seconds - result.eval_seconds)
    shown = invoke("train", "config.yaml", "train.max_steps=4", "output_dir=again")
    assert shown.exit_code == 0 and "training " in shown.output and "evaluation " in shown.output


def test_the_dry_run_does_not_round_epochs_up(regression_run: Path):
    result = invoke("train", "config.yaml", "--dry-run", "train.max_steps=10")   # 4 steps per epoch
    assert result.exit_code == 0, result.output
    assert "10 steps in all (2.5 epochs)" in result.output
    assert "(1 epoch)" in invoke("train", "config.yaml", "--dry-run", "train.max_steps=4").output


@pytest.mark.parametrize("setting, env, expected", [("train.num_threads=1", None, 1), (None, "1", 1), (None, None, None)])
def test_threads_follow_the_config_then_omp_then_the_cores_this_process_may_use(regression_run, monkeypatch,
                                                                                setting, env, expected):
    from lora_cli.run.build import available_cores
    if env is None:
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    else:
        monkeypatch.setenv("OMP_NUM_THREADS", env)
    before = torch.get_num_threads()
    try:
        result = invoke("train", "config.yaml", "--dry-run", *([setting] if setting else []))
        assert result.exit_code == 0, result.output
        want = expected or available_cores()
        assert torch.get_num_threads() == want
        assert f"device cpu, {want} thread{'s' if want != 1 else ''}," in result.output
    finally:
        torch.set_num_threads(before)


HELP_CASES = [("lora-train", [], "TRAIN_COMMANDS"), ("lora-merge", [], "MERGE_COMMANDS"),
              ("lora-eval", [], "EVAL_COMMANDS"), ("python -m lora_cli", ["train"], "TRAIN_COMMANDS"),
              ("python -m lora_cli", ["merge"], "MERGE_COMMANDS"), ("python -m lora_cli", ["eval"], "EVAL_COMMANDS"),
              ("lora-generate", [], "GENERATE_COMMANDS"), ("python -m lora_cli", ["generate"], "GENERATE_COMMANDS")]


@pytest.mark.parametrize("columns", [80, 120])
@pytest.mark.parametrize("prog, args, commands", HELP_CASES)
def test_help_examples_copy_paste_whole_at_80_and_120_columns(prog, args, commands, columns):
    from lora_cli import cli
    entry = {"lora-train": cli.train_app, "lora-merge": cli.merge_app, "lora-eval": cli.eval_app,
             "lora-generate": cli.generate_app}.get(prog, cli.app)
    result = runner.invoke(entry, [*args, "--help"], env={"COLUMNS": str(columns)}, prog_name=prog)
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert all(len(line) <= min(columns, 80) for line in lines), max(lines, key=len)
    shown, pending = [], ""
    for line in lines[lines.index("  Examples:") + 1:]:
        if line.strip():
            pending += line.strip()
            if pending.endswith(" \\"):
                pending = pending[:-1]                  # a shell continuation: the command goes on
            else:
                shown.append(pending)
                pending = ""
    from lora_cli import cli_generate
    assert shown == list(getattr(cli, commands, None) or getattr(cli_generate, commands))   # each example whole
    for command in shown:
        for word in command.split():
            if word.startswith(("configs/", "data/")) and "-merged" not in word:   # (merge writes those)
                assert (ROOT / word).exists(), word     # the examples name real files


@pytest.mark.parametrize("entry, args", [("train_app", []), ("merge_app", []), ("eval_app", []),
                                         ("app", []), ("app", ["train"]), ("app", ["eval"])])
def test_version_on_every_command(entry, args):
    from importlib.metadata import version

    import lora_cli
    from lora_cli import cli
    result = runner.invoke(getattr(cli, entry), [*args, "--version"])
    assert result.exit_code == 0, result.output
    assert result.output.startswith(f"lora-cli {lora_cli.__version__} (torch ") and "Python 3." in result.output
    assert version("lora-cli") == lora_cli.__version__        # pyproject reads the one version


def test_plain_log_lines_are_never_wrapped():
    import io
    from types import SimpleNamespace

    from rich.console import Console

    from lora_cli.console import ProgressReporter
    buf = io.StringIO()
    reporter = ProgressReporter(Console(file=buf, width=30, force_terminal=False))
    world = SimpleNamespace(distributed=False, size=1, strategy="ddp")
    plan = SimpleNamespace(unit="tokens", epochs=6, total_steps=378, device=torch.device("cpu"), threads=2, world=world,
                           built=SimpleNamespace(notes=[]), summary=SimpleNamespace(trainable=81920, percent=8.19),
                           cfg=SimpleNamespace(train=SimpleNamespace(batch_size=16, grad_accum=1)))
    reporter.start(plan)
    reporter.step(10, 0, {"loss": 1.2345, "lr": 3e-3, "epoch": 0.16, "grad_norm": 0.5, "tokens_per_s": 12000.0})
    reporter.evaluated({"step": 63, "epoch": 1.0, "eval_loss": 0.1, "eval_perplexity": 1.1, "eval_token_accuracy": 0.9})
    reporter.finish()
    lines = buf.getvalue().splitlines()
    assert len(lines) == 3, lines
    assert lines[0].startswith("training 378 steps") and lines[0].endswith("8.190%)")
    assert lines[1].startswith("step 10 ") and lines[1].endswith("grad_norm 0.5")
    assert lines[2].startswith("eval @ step 63:") and lines[2].endswith("token_accuracy 0.9")
