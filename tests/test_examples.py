"""The example configs ship with the package: --list-configs lists them, --init copies
one (with the files it reads) into a folder to edit and run.

The slow test at the end builds a wheel, installs it into a fresh virtual environment
and trains the quickstart from an --init copy, far from the source tree.
"""

from __future__ import annotations

import fnmatch
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from lora_cli.cli import app
from lora_cli.run.config import load_config
from lora_cli.errors import UserError
from lora_cli.examples import init_example, list_examples

ROOT = Path(__file__).resolve().parents[1]
runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, ["train", *map(str, args)])


def test_every_config_in_configs_is_an_example_with_a_one_line_summary():
    examples = {e.name: e for e in list_examples()}
    assert sorted(examples) == sorted(p.stem for p in (ROOT / "configs").glob("*.yaml"))
    for e in examples.values():
        assert e.summary.endswith(".") and "\n" not in e.summary and 20 < len(e.summary) < 100, e.summary
    for name in ("quickstart", "seed_linear"):          # self-contained: they ship what they read
        assert sorted(examples[name].ships) == ["data.eval", "data.train", "model.base"]
        assert not examples[name].needs
    assert "model.hf" in examples["hf_causal_lm"].needs and not examples["hf_causal_lm"].ships


def test_list_configs_prints_one_line_per_example():
    result = invoke("--list-configs")
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    examples = list_examples()
    assert len(lines) == len(examples) + 1 and "lora-train --init NAME" in lines[-1]
    for line, e in zip(lines, examples):
        assert line.startswith(e.name + " ") and e.summary in line


def test_init_writes_a_copy_that_runs_from_here(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = invoke("--init", "seed_linear", "my run")
    assert result.exit_code == 0, result.output
    assert "train it with: lora-train 'my run/seed_linear.yaml'" in result.output
    copy = tmp_path / "my run" / "seed_linear.yaml"
    original = (ROOT / "configs" / "seed_linear.yaml").read_text()
    cfg = load_config(copy)                    # every file it names exists, seen from here
    assert cfg.data.train == "my run/data/seed_linear/train.csv" and cfg.output_dir == "my run/runs/seed_linear"
    for rel in ("data/seed_linear/train.csv", "data/seed_linear/eval.csv", "data/seed_linear/base.safetensors"):
        assert (tmp_path / "my run" / rel).read_bytes() == (ROOT / rel).read_bytes()
    comments = [line.partition("#")[2] for line in original.splitlines()]
    assert [line.partition("#")[2] for line in copy.read_text().splitlines()] == [
        c.replace("configs/seed_linear.yaml", "my run/seed_linear.yaml") for c in comments]   # comments kept
    trained = invoke(copy, "train.epochs=3")
    assert trained.exit_code == 0, trained.output
    assert (tmp_path / "my run" / "runs" / "seed_linear" / "adapter" / "adapter_model.safetensors").is_file()


def test_init_without_a_folder_copies_here_with_the_paths_unchanged(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert invoke("--init", "quickstart").exit_code == 0
    assert yaml.safe_load((tmp_path / "quickstart.yaml").read_text()) == \
        yaml.safe_load((ROOT / "configs" / "quickstart.yaml").read_text())
    assert (tmp_path / "data" / "quickstart" / "base.safetensors").stat().st_size > 1_000_000


def test_init_never_replaces_a_different_file_unless_asked(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert invoke("--init", "seed_linear", "x").exit_code == 0
    again = invoke("--init", "seed_linear", "x")             # identical files: nothing to do
    assert again.exit_code == 0 and "unchanged" in again.output
    mine = tmp_path / "x" / "data" / "seed_linear" / "eval.csv"
    mine.write_text("my own data\n")
    refused = invoke("--init", "seed_linear", "x")
    assert refused.exit_code == 2 and "x/data/seed_linear/eval.csv" in refused.output
    assert "--overwrite" in refused.output and mine.read_text() == "my own data\n"
    replaced = invoke("--init", "seed_linear", "x", "--overwrite")
    assert replaced.exit_code == 0 and "replaced: x/data/seed_linear/eval.csv" in replaced.output
    assert mine.read_bytes() == (ROOT / "data" / "seed_linear" / "eval.csv").read_bytes()


def test_init_errors_are_user_errors(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    unknown = invoke("--init", "quickstrat")
    assert unknown.exit_code == 2 and "did you mean 'quickstart'?" in unknown.output
    (tmp_path / "file").write_text("")
    assert invoke("--init", "quickstart", "file").exit_code == 2
    (tmp_path / "y" / "quickstart.yaml").mkdir(parents=True)   # a folder where the config goes
    with pytest.raises(UserError, match="folder is in the way"):
        init_example("quickstart", "y")
    assert not (tmp_path / "y" / "data").exists()           # nothing written
    both = invoke("--init", "quickstart", "z", "train.lr=1")
    assert both.exit_code == 2 and "does not combine" in both.output
    assert invoke("--list-configs", "--dry-run").exit_code == 2


def test_an_example_that_needs_your_files_says_which(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = invoke("--init", "hf_causal_lm", "p")
    assert result.exit_code == 0, result.output
    assert "model.hf (models/my-llama)" in result.output
    copy = yaml.safe_load((tmp_path / "p" / "hf_causal_lm.yaml").read_text())
    assert copy["model"]["hf"] == "models/my-llama" and copy["output_dir"] == "p/runs/hf_causal_lm"


def test_the_package_carries_every_example_and_the_files_they_read():
    tomllib = pytest.importorskip("tomllib")
    setup = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    packages = {".".join(p.relative_to(ROOT).parts[:-1]) for p in (ROOT / "lora_cli").rglob("__init__.py")}
    assert packages | {"lora_cli._configs", "lora_cli._data"} == set(setup["packages"])
    assert setup["package-dir"] == {"lora_cli._configs": "configs", "lora_cli._data": "data"}
    for e in list_examples():
        assert any(fnmatch.fnmatch(e.path.name, pat) for pat in setup["package-data"]["lora_cli._configs"])
        for rel in e.ships.values():
            inside = rel.removeprefix("data/")
            assert any(fnmatch.fnmatch(inside, pat) for pat in setup["package-data"]["lora_cli._data"]), rel


def _source_copy(dest: Path) -> Path:
    """The files a wheel is built from, without run outputs, build trees or environments."""
    def skip(folder, names):
        return [n for n in names if n in {".git", "runs", "build", "dist", "__pycache__", ".pytest_cache"}
                or n.endswith((".egg-info", "-merged.safetensors")) or (Path(folder) / n / "pyvenv.cfg").exists()]
    return Path(shutil.copytree(ROOT, dest, ignore=skip))


@pytest.mark.slow
def test_a_wheel_in_a_fresh_venv_ships_the_examples_and_trains_an_init_copy(tmp_path):
    src = _source_copy(tmp_path / "src")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"

    def run(*cmd, cwd=tmp_path):
        done = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True)
        assert done.returncode == 0, f"{cmd}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
        return done.stdout

    run(sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", tmp_path / "wheels", src)
    [wheel] = (tmp_path / "wheels").glob("lora_cli-*.whl")
    shutil.rmtree(src)                           # the installed copy must not lean on a source tree
    run(sys.executable, "-m", "venv", tmp_path / "venv")
    bin_ = tmp_path / "venv" / "bin"
    run(bin_ / "pip", "install", "-q", "torch==2.13.0")
    run(bin_ / "pip", "install", "-q", wheel)
    work = tmp_path / "work"
    work.mkdir()
    where = run(bin_ / "python", "-c", "import lora_cli, pathlib; print(pathlib.Path(lora_cli.__file__).parent)",
                cwd=work).strip()
    assert "site-packages" in where and (Path(where) / "_configs" / "quickstart.yaml").is_file()
    listed = run(bin_ / "lora-train", "--list-configs", cwd=work)
    assert "quickstart" in listed and "seed_linear" in listed
    run(bin_ / "lora-train", "--init", "quickstart", "qs", cwd=work)
    run(bin_ / "lora-train", "qs/quickstart.yaml", "train.max_steps=5", "train.log_every=1", cwd=work)
    assert (work / "qs" / "runs" / "quickstart" / "adapter" / "adapter_model.safetensors").is_file()
    assert '"adapted"' in run(bin_ / "lora-eval", "qs/runs/quickstart/adapter", "--json", cwd=work)
