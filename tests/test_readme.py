"""The README cannot drift: its config reference is generated from the schema, CI runs
the command lines it shows, and a slow test re-checks the figures it states."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from lora_cli.run.config import schema_markdown

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"


def test_config_reference_matches_the_schema():
    text = README.read_text()
    start, end = "<!-- config-reference:start -->\n", "\n<!-- config-reference:end -->"
    table = text[text.index(start) + len(start):text.index(end)]
    assert table == schema_markdown(), (
        "README config reference is out of date; regenerate it with\n"
        "python -c 'from lora_cli.run.config import schema_markdown; print(schema_markdown())'")


def test_readme_commands_name_real_files():
    text = README.read_text()
    for path in ("configs/quickstart.yaml", "configs/seed_linear.yaml", "data/make_quickstart.py",
                 "configs/hf_causal_lm.yaml", "configs/hf_classification.yaml"):
        assert path in text
        assert (README.parent / path).exists(), path


def test_every_shipped_config_is_valid():
    from lora_cli.run.config import load_config
    configs = sorted((README.parent / "configs").glob("*.yaml"))
    assert len(configs) >= 4
    for path in configs:
        load_config(path, check_files=False)


# --------------------------------------------------------------------------- CI runs the README's commands

def _shown_code(heading: str, after: str = "") -> list[str]:
    """The first block of indented code lines a reader sees under ``heading`` (after the
    text ``after``, if given), each line stripped."""
    text = README.read_text()
    section = text[text.index(heading):]
    section = section[section.index(after) + len(after):] if after else section
    lines = section.splitlines()
    first = next(i for i, line in enumerate(lines) if line.startswith("    "))
    block = []
    for line in lines[first:]:
        if not line.startswith("    "):
            break
        block.append(line.strip())
    return block


def _ci_commands() -> dict[str, list[str]]:
    done = subprocess.run(["bash", str(ROOT / ".ci" / "run"), "--print"], capture_output=True, text=True,
                          env={**os.environ, "PYTHON": sys.executable})
    assert done.returncode == 0, done.stderr
    ran: dict[str, list[str]] = {}
    for line in done.stdout.splitlines():
        block, _, command = line.partition(": ")
        ran.setdefault(block, []).append(command)
    return ran


def test_ci_runs_the_commands_the_readme_shows():
    ran = _ci_commands()
    assert ran["quickstart"] == _shown_code("## Quickstart\n")
    assert ran["quickstart-after"] == _shown_code("## Quickstart\n", after="Then:\n")
    assert ran["tests"] == _shown_code("## Tests\n")
    [quickstart], [tests] = ran["quickstart"], ran["tests"]
    for line in (quickstart, tests):
        assert line.startswith("pip install torch==2.13.0 && ")     # the pin first: no multi-GB CUDA build
    assert "pip install -e . &&" in quickstart and "[" not in quickstart   # no extra: the bare install
    assert "pytest" in tests


def _ci_tool():
    """.ci/readme.py as a module."""
    import importlib.util
    spec = importlib.util.spec_from_file_location("ci_readme", ROOT / ".ci" / "readme.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _fake_readme(tmp_path, block: str, *lines) -> Path:
    readme = tmp_path / "README.md"
    readme.write_text(f"text\n\n<!-- ci:{block}:start -->\n" + "".join(f"    {a}\n" for a in lines)
                      + f"<!-- ci:{block}:end -->\n")
    return readme


@pytest.mark.parametrize("command, code", [
    ("echo '12 passed, 1 skipped in 3.2s'", 0),
    ("exit 5", 1),                                        # pytest collected no tests
    ("true", 1),                                          # exit 0 but no test ran
    ("echo '1 failed, 3 passed'; exit 1", 1),
    ("exit 3", 3),
])
def test_ci_fails_a_test_command_that_fails_or_runs_no_test(tmp_path, command, code):
    assert _ci_tool().run("tests", _fake_readme(tmp_path, "tests", command)) == code


def test_ci_runs_every_line_of_a_block_and_stops_at_the_first_failure(tmp_path, capfd):
    tool = _ci_tool()
    assert tool.run("quickstart", _fake_readme(tmp_path, "quickstart", "echo one", "false", "echo three")) == 1
    out = capfd.readouterr().out
    assert "one" in out and "three" not in out
    with pytest.raises(SystemExit, match="expected one <!-- ci:tests:start -->"):
        tool.commands("tests", tmp_path / "README.md")
    assert tool.commands("x", _fake_readme(tmp_path, "x", "a \\", "  b", "# a comment", "c")) == ["a b", "c"]


@pytest.mark.parametrize("losses, code", [([(0, 5.9), (10, 1.0)], 0), ([(0, 5.9), (10, 6.0)], 1), ([(10, 1.0)], 1)])
def test_ci_checks_the_adapter_and_that_the_eval_loss_fell(tmp_path, losses, code):
    run = tmp_path / "run"
    (run / "adapter").mkdir(parents=True)
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        (run / "adapter" / name).write_text("x")
    (run / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "eval_loss": v}) + "\n" for s, v in losses))
    tool = _ci_tool()
    assert tool.check(run) == code
    (run / "adapter" / "adapter_model.safetensors").unlink()
    assert tool.check(run) == 1


# --------------------------------------------------------------------------- the README's figures

def _figure(pattern: str, text: str) -> tuple[str, ...]:
    found = re.search(pattern, " ".join(text.split()))
    assert found, f"README no longer states {pattern!r}: update the figure and this test together"
    return found.groups()


def _agrees(stated: str, value: float, digits: int = 3) -> bool:
    """``stated`` (as the README writes it) is ``value`` to its last digit, and has at
    least ``digits`` significant digits."""
    plain = stated.replace(",", "")
    decimals = len(plain.partition(".")[2])
    assert len(plain.replace(".", "").lstrip("0")) >= digits, f"{stated}: state at least {digits} digits"
    return abs(float(plain) - value) <= 0.5 * 10 ** -decimals + 1e-9


@pytest.mark.slow
def test_the_readme_figures_are_what_the_code_produces(tmp_path, monkeypatch):
    import torch

    from lora_cli.run.config import load_config
    from lora_cli.data import load_tabular
    from lora_cli.run.train import train

    monkeypatch.chdir(ROOT)                       # the configs' paths are read from the project root
    text = README.read_text()
    quick = text[text.index("## Quickstart"):text.index("## Tests")]

    runs = {}
    for name in ("quickstart", "seed_linear"):
        cfg = load_config(ROOT / "configs" / f"{name}.yaml", [f"output_dir={tmp_path / name}", "device=cpu"])
        runs[name] = train(cfg, search_path=ROOT / "configs")

    qs = runs["quickstart"]
    base_params = qs.summary.total - qs.summary.trainable
    params, megabytes = _figure(r"data/quickstart/` \(([\d,]+) parameters, ([\d.]+) MB\)", quick)
    assert int(params.replace(",", "")) == base_params
    assert _agrees(megabytes, (ROOT / "data/quickstart/base.safetensors").stat().st_size / 2**20, digits=2)
    trainable, percent, total = _figure(r"rank 8: ([\d,]+) trainable parameters, ([\d.]+) % of the adapted "
                                        r"model's ([\d,]+)", quick)
    assert int(trainable.replace(",", "")) == qs.summary.trainable and int(total.replace(",", "")) == qs.summary.total
    assert _agrees(percent, 100 * qs.summary.trainable / qs.summary.total)
    exact_base, exact_final = _figure(r"exactly right \(`eval.exact_match` in the config\): base ([\d.]+) %, "
                                      r"adapter ([\d.]+) %", quick)
    assert float(exact_base) == round(100 * qs.exact_base["exact_match"], 1)
    assert float(exact_final) == round(100 * qs.exact_final["exact_match"], 1)
    base, final, steps = _figure(r"falls from ([\d.]+) \(the base\) to ([\d.]+) after (\d+) steps", quick)
    assert _agrees(base, qs.eval_base["loss"]) and _agrees(final, qs.eval_final["loss"])
    assert int(steps) == qs.steps

    sl = runs["seed_linear"]
    base, final = _figure(r"held-out MSE falls from ([\d.]+) to ([\d.]+)", quick)
    assert _agrees(base, sl.eval_base["loss"]) and _agrees(final, sl.eval_final["loss"])
    [floor] = _figure(r"training rows scores an MSE of ([\d.]+) on the 50 held-out rows", quick)
    fit, held = (load_tabular(ROOT / f"data/seed_linear/{s}.csv", task="regression") for s in ("train", "eval"))
    w = torch.linalg.lstsq(fit.x.double(), fit.y.double().reshape(-1, 1)).solution
    assert _agrees(floor, float(((held.x.double() @ w).reshape(-1) - held.y.double().reshape(-1)).pow(2).mean()))

    scaling = " ".join(text[text.index("## Scaling out"):text.index("## Python API")].split())
    kb, full_mb, ratio = _figure(r"([\d.]+) KB per worker for the quickstart \(full fine-tuning of the same "
                                 r"model: ([\d.]+) MB, (\d+)x\)", scaling)
    assert float(kb) == qs.summary.trainable * 4 / 1024                 # float32 gradients of the adapter
    assert _agrees(full_mb, base_params * 4 / 2**20, digits=2)
    assert int(ratio) == round(base_params / qs.summary.trainable)
