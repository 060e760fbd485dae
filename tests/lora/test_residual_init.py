"""PEFT adapters initialised with PiSSA/OLoRA (which rewrite the base weight to a
residual) are refused unless converted; converted ones load and give PEFT's model from
the untouched base."""

from __future__ import annotations

import json
import warnings

import pytest
import torch

from hf_tiny import MODELS, TARGETS, logits, token_ids
from lora_cli import load_adapter, read_adapter
from lora_cli.errors import AdapterError
from lora_cli.lora.adapter import CONFIG_NAME
from lora_cli.lora.adapter_config import residual_init

peft = pytest.importorskip("peft")


def _train_like(pm, seed=5):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in pm.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.05)


def _peft_model(kind: str, init):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return peft.get_peft_model(MODELS[kind](0), peft.LoraConfig(
            r=4, lora_alpha=8, target_modules=TARGETS[kind], init_lora_weights=init))


@pytest.mark.parametrize("value, init", [("pissa", "pissa"), ("pissa_niter_4", "pissa"), ("olora", "olora"),
                                         ("corda", "corda"), ("loftq", "loftq"), (True, None),
                                         ("gaussian", None), (False, None), ("PiSSA", "pissa")])
def test_residual_inits_are_recognised(value, init):
    assert residual_init(value) == init


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_an_unconverted_residual_adapter_is_refused_everywhere(tmp_path, init):
    pm = _peft_model("llama", init)
    _train_like(pm)
    pm.save_pretrained(tmp_path / "raw")
    assert json.loads((tmp_path / "raw" / CONFIG_NAME).read_text())["init_lora_weights"] == init
    with pytest.raises(AdapterError, match="path_initial_model_for_weight_conversion") as err:
        read_adapter(tmp_path / "raw")
    assert "residual base" in str(err.value)
    with pytest.raises(AdapterError, match="residual base"):
        load_adapter(MODELS["llama"](0), tmp_path / "raw", check_base=False)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["llama", "gpt2"])
@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_a_converted_residual_adapter_gives_peft_model_from_the_original_base(tmp_path, kind, init):
    if (kind, init) == ("gpt2", "olora"):
        pytest.skip("PEFT's OLoRA init does not handle Conv1D (fan_in_fan_out): its forward fails")
    pm = _peft_model(kind, init)
    pm.peft_config["default"].init_lora_weights = True      # PEFT's recipe: save the initial adapter first
    pm.save_pretrained(tmp_path / "initial")
    pm.peft_config["default"].init_lora_weights = init
    _train_like(pm)
    x = token_ids()
    trained = logits(pm, x)
    pm.save_pretrained(tmp_path / "converted", path_initial_model_for_weight_conversion=str(tmp_path / "initial"))
    model = load_adapter(MODELS[kind](0), tmp_path / "converted", check_base=False)
    torch.testing.assert_close(logits(model, x), trained, rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_lora_merge_and_lora_eval_refuse_it_with_exit_2(tmp_path):
    from typer.testing import CliRunner

    from lora_cli.cli import app
    pm = _peft_model("llama", "pissa")
    _train_like(pm)
    pm.save_pretrained(tmp_path / "raw")
    MODELS["llama"](0).save_pretrained(tmp_path / "base")
    runner = CliRunner()
    for args in (["merge", str(tmp_path / "base"), str(tmp_path / "raw"), "-o", str(tmp_path / "merged")],
                 ["eval", str(tmp_path / "raw")]):
        result = runner.invoke(app, args)
        assert result.exit_code == 2, result.output
        assert "residual base" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "merged").exists()
