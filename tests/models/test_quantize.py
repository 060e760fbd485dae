"""A quantized frozen base (model.quantize): smaller, close to the float model, trainable
through, and its adapter merges into the original float base (lora-merge --verify)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

pytest.importorskip("torchao")

from lora_cli.cli import app  # noqa: E402
from lora_cli.errors import ConfigError  # noqa: E402
from lora_cli.lora.inject import apply_lora  # noqa: E402
from lora_cli.models.gpt import GPT  # noqa: E402
from lora_cli.models.quantize import is_quantized, quantize_model, stored_bytes  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]


def _model() -> GPT:
    torch.manual_seed(0)
    model = GPT(vocab_size=64, max_seq_len=32, n_layer=2, n_head=2, d_model=64)
    apply_lora(model, rank=4, alpha=8, target_modules="all-linear")
    with torch.no_grad():                       # a non-zero update, so the LoRA path shows in the output
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02)
    return model


@pytest.mark.parametrize("kind, most_bytes, most_error", [("nf4", 0.2, 0.2), ("int8", 0.35, 0.02)])
def test_quantized_base_is_smaller_close_and_trains_through(kind, most_bytes, most_error):
    model = _model()
    ids = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(1))
    ref = model(ids).detach()
    linear = [p for n, p in model.named_parameters() if not p.requires_grad and p.dim() == 2
              and "embed" not in n]
    before = sum(stored_bytes(p) for p in linear)
    assert quantize_model(model, kind, torch.float32) == []
    frozen = [p for n, p in model.named_parameters() if not p.requires_grad and p.dim() == 2 and "embed" not in n]
    assert all(is_quantized(p) for p in frozen)
    assert sum(stored_bytes(p) for p in frozen) <= most_bytes * before
    out = model(ids)
    assert float((out.detach() - ref).norm() / ref.norm()) <= most_error
    out.float().pow(2).mean().backward()
    lora = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert lora and all(p.dtype == torch.float32 and p.grad is not None and p.grad.abs().sum() > 0
                        for p in lora.values())
    assert not is_quantized(model.embed_tokens.weight)


def test_missing_torchao_is_a_config_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "torchao.quantization", None)
    with pytest.raises(ConfigError, match="torchao"):
        quantize_model(_model(), "nf4", torch.float32)


def test_unknown_quantization_and_foreign_keys_are_refused():
    from lora_cli.run.config import load_config
    with pytest.raises(ConfigError, match="nf4, int8"):
        load_config(ROOT / "configs/quickstart.yaml", ["model.quantize=fp4"], check_files=False)
    with pytest.raises(ConfigError, match="model.quantize: nf4"):
        load_config(ROOT / "configs/quickstart.yaml", ["model.load_in_4bit=true"], check_files=False)


@pytest.mark.slow
def test_an_nf4_base_trains_and_its_adapter_merges_into_the_float_base(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    runner = CliRunner()
    (tmp_path / "ev.jsonl").write_text("".join((ROOT / "data/quickstart/eval.jsonl").read_text()
                                               .splitlines(keepends=True)[:8]))
    train = runner.invoke(app, ["train", "configs/quickstart.yaml", "device=cpu", "model.quantize=nf4",
                                "train.max_steps=4", "train.batch_size=4", "data.eval=null", "eval.samples=0", "eval.exact_match=false",
                                "data.max_seq_len=64", f"output_dir={tmp_path / 'run'}"])
    assert train.exit_code == 0, train.output
    adapter = tmp_path / "run" / "adapter"
    import json
    assert json.loads((adapter / "adapter_config.json").read_text())["lora_cli"]["config"]["model"]["quantize"] \
        == "nf4"
    # --verify compares the merged float model with the FLOAT base + adapter; its tolerance is
    # 1e-4 x the outputs' largest |value| (float32 merge), not the ~9 % NF4 error
    merged = tmp_path / "merged.safetensors"
    merge = runner.invoke(app, ["merge", "data/quickstart/base.safetensors", str(adapter), "-o", str(merged),
                                "--verify", "--data", str(tmp_path / "ev.jsonl")])
    assert merge.exit_code == 0, merge.output
    assert "original float weights" in merge.output and ": ok" in merge.output
    from safetensors.torch import load_file
    base, out = load_file(ROOT / "data/quickstart/base.safetensors"), load_file(merged)
    assert base.keys() == out.keys() and all(out[k].dtype == base[k].dtype for k in base)
    evaluated = runner.invoke(app, ["eval", str(adapter), "--data", str(tmp_path / "ev.jsonl")])
    assert evaluated.exit_code == 0, evaluated.output
    assert "nf4 base" in evaluated.output
