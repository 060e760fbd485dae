"""lora-generate end to end: adapter against its merged checkpoint, Hugging Face models
against PEFT's generate, --compare, --chat and the user errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from typer.testing import CliRunner

from lora_cli.cli import app
from lora_cli.models import build_model, save_state_dict

runner = CliRunner()
PAIRS = [(f"n={a} m={b}\n", f"{a}+{b}={a + b}") for a in range(12) for b in range(6)]


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def gpt_run(tmp_path_factory) -> Path:
    """A built-in gpt base file, a few training steps on it, and its merged checkpoint."""
    root = tmp_path_factory.mktemp("gen")
    args = {"vocab_size": 257, "n_layer": 2, "n_head": 2, "d_model": 32, "max_seq_len": 64}
    torch.manual_seed(0)
    save_state_dict(build_model(arch="gpt", args=args).state_dict(), root / "base.safetensors")
    lines = [json.dumps({"prompt": p, "completion": c}) for p, c in PAIRS]
    (root / "train.jsonl").write_text("\n".join(lines) + "\n")
    (root / "eval.jsonl").write_text("\n".join(lines[::9]) + "\n")
    config = {"seed": 0, "device": "cpu", "task": "causal_lm", "output_dir": str(root / "run"),
              "model": {"arch": "gpt", "args": args, "base": str(root / "base.safetensors")},
              "data": {"train": str(root / "train.jsonl"), "eval": str(root / "eval.jsonl"), "max_seq_len": 64},
              "lora": {"rank": 4, "alpha": 8, "target_modules": "all-linear"},
              "train": {"max_steps": 12, "batch_size": 16, "lr": 0.01, "log_every": 6}}
    (root / "config.yaml").write_text(yaml.safe_dump(config))
    assert invoke("train", root / "config.yaml").exit_code == 0
    merged = invoke("merge", root / "base.safetensors", root / "run" / "adapter", "-o", root / "merged.safetensors")
    assert merged.exit_code == 0, merged.output
    return root


def json_lines(output: str) -> list[dict]:
    return [json.loads(line) for line in output.splitlines() if line.strip()]


@pytest.mark.slow
def test_adapter_and_its_merged_checkpoint_generate_the_same_tokens(gpt_run: Path):
    adapter = gpt_run / "run" / "adapter"
    a = invoke("generate", adapter, "--prompts", gpt_run / "eval.jsonl", "--max-new-tokens", "20", "--json")
    m = invoke("generate", adapter, "--merged", gpt_run / "merged.safetensors", "--prompts",
               gpt_run / "eval.jsonl", "--max-new-tokens", "20", "--json")
    assert a.exit_code == 0 and m.exit_code == 0, a.output + m.output
    ours, merged = json_lines(a.stdout), json_lines(m.stdout)
    assert len(ours) == len(PAIRS[::9])
    assert [r["completion"] for r in ours] == [r["completion"] for r in merged]
    assert [r["tokens"] for r in ours] == [r["tokens"] for r in merged]
    assert all(r["answer"] == c for r, (_, c) in zip(ours, PAIRS[::9]))


@pytest.mark.slow
def test_compare_shows_the_base_beside_the_adapter_and_streaming_prints_the_completion(gpt_run: Path):
    adapter = gpt_run / "run" / "adapter"
    both = invoke("generate", adapter, "--prompt", "n=3 m=4\\n", "--compare", "--json", "--max-new-tokens", "12")
    assert both.exit_code == 0, both.output
    row = json_lines(both.stdout)[0]
    alone = json_lines(invoke("generate", adapter, "--prompt", "n=3 m=4\\n", "--json", "--max-new-tokens",
                              "12").stdout)[0]
    assert row["prompt"] == "n=3 m=4\n" and row["completion"] == alone["completion"]
    assert row["base"] != row["completion"]          # the adapter changed what the model says
    streamed = invoke("generate", adapter, "--prompt", "n=3 m=4\\n", "--max-new-tokens", "12")
    assert streamed.exit_code == 0 and alone["completion"] in streamed.stdout


@pytest.mark.slow
@pytest.mark.parametrize("args, message", [
    ([], "give one of --prompt"),
    (["--prompt", "x", "--prompts", "p.jsonl"], "give one of --prompt"),
    (["--prompt", "x", "--top-p", "0"], "--top-p must be > 0"),
    (["--prompt", "x", "--temperature", "-1", "--max-new-tokens", "0"], "--max-new-tokens must be >= 1"),
    (["--prompts", "missing.jsonl"], "missing.jsonl"),
    (["--prompt", "x" * 80], "leaves no room"),
])
def test_user_errors_exit_2_with_one_message(gpt_run: Path, args, message):
    result = invoke("generate", gpt_run / "run" / "adapter", *args)
    assert result.exit_code == 2, result.output
    assert message in result.output and "Traceback" not in result.output


def test_chat_uses_the_training_data_prompt_format(tmp_path: Path):
    from lora_cli.data.prompts import chat_prompt, data_format
    from lora_cli.models.tokenizers import ByteTokenizer
    (tmp_path / "inst.jsonl").write_text(json.dumps({"instruction": "add", "output": "3"}) + "\n")
    (tmp_path / "chat.jsonl").write_text(json.dumps({"messages": [{"role": "user", "content": "hi"},
                                                                  {"role": "assistant", "content": "yo"}]}) + "\n")
    tok = ByteTokenizer()
    assert chat_prompt("add 1 2", tok, data_format(tmp_path / "inst.jsonl")) == \
        "### Instruction:\nadd 1 2\n\n### Response:\n"
    assert chat_prompt("hi", tok, data_format(tmp_path / "chat.jsonl")) == "user: hi\nassistant: "


@pytest.mark.slow
def test_eval_generate_scores_base_and_adapted_and_json_has_them(gpt_run: Path):
    result = invoke("eval", gpt_run / "run" / "adapter", "--generate", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    gen = report["generation"]
    assert gen["base"]["n"] == gen["adapted"]["n"] == len(PAIRS[::9])
    assert 0 <= gen["adapted"]["exact_match"] <= gen["adapted"]["normalized_match"] <= 1
    misses = gen["adapted"]["n"] - gen["adapted"]["normalized"]
    assert len(gen["worst"]) == min(3, misses)
    # the completions scored are the ones lora-generate writes
    made = json_lines(invoke("generate", gpt_run / "run" / "adapter", "--prompts", gpt_run / "eval.jsonl",
                             "--json", "--max-new-tokens", str(gen["max_new_tokens"])).stdout)
    assert sum(r["completion"] == r["answer"] for r in made) == gen["adapted"]["exact"]
    table = invoke("eval", gpt_run / "run" / "adapter", "--generate")
    assert table.exit_code == 0 and "exact_match" in table.output


@pytest.mark.slow
def test_eval_plot_draws_overlaid_runs(gpt_run: Path, tmp_path: Path):
    pytest.importorskip("matplotlib")
    result = invoke("eval", tmp_path / "both.png", "--plot", gpt_run / "run", "--plot", gpt_run / "run")
    assert result.exit_code == 0, result.output
    assert (tmp_path / "both.png").read_bytes()[:4] == b"\x89PNG"
    bad = invoke("eval", tmp_path / "x.png", "--plot", tmp_path)
    assert bad.exit_code == 2 and "no metrics.jsonl" in bad.output
