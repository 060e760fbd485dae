"""Per-layer ranks and scales (rank_pattern, alpha_pattern) and layer selection
(layers_to_transform, layers_pattern): the same modules, ranks and scales as PEFT picks
from the same options, on tiny Llama and GPT-2, and adapter files that go both ways."""

from __future__ import annotations

import copy
import json
import warnings

import pytest
import torch

from hf_tiny import MODELS, TARGETS, logits, token_ids
from lora_cli import apply_lora, load_adapter, save_adapter
from lora_cli.errors import TargetError
from lora_cli.lora.inject import lora_layers, summarize
from lora_cli.lora.targets import in_layers, layer_index, pattern_value

peft = pytest.importorskip("peft")

OPTIONS = {  # kind -> (rank_pattern, alpha_pattern, layers_to_transform, layers_pattern)
    "llama": ({"v_proj": 2, "model.layers.1.mlp.up_proj": 6}, {"o_proj": 32, r"mlp\..*_proj": 4}, [1], "layers"),
    "gpt2": ({"c_fc": 2}, {"attn.c_proj": 16}, [0], None),
}


def test_pattern_value_is_first_match_of_the_path_or_a_dotted_end():
    patterns = {"v_proj": 2, "layers.0.self_attn.v_proj": 5, r"mlp\..*": 3}
    assert pattern_value(patterns, "layers.0.self_attn.v_proj", 8) == 2          # first matching key wins
    assert pattern_value(patterns, "layers.1.mlp.up_proj", 8) == 3
    assert pattern_value(patterns, "layers.1.self_attn.xv_proj", 8) == 8         # a dotted end, not a suffix
    assert pattern_value({}, "a.b", 8) == 8


def test_layer_index_as_peft_finds_it():
    assert layer_index("model.layers.3.mlp.up_proj", "layers") == 3
    assert layer_index("transformer.h.1.attn.c_attn", None) == 1
    assert layer_index("model.layers.3.mlp.up_proj", "h") is None
    assert layer_index("layers.2.mlp.up_proj", None) == 2                        # a model whose layers sit at its root
    assert layer_index("layers.2.mlp.up_proj", None, peft=True) is None           # ... which PEFT does not see
    assert in_layers("model.layers.3.x.y", [1, 3]) and not in_layers("model.layers.2.x.y", 3)
    assert in_layers("anything", None)


def _peft(kind, base, options):
    rp, ap, layers, pattern = options
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(
            r=4, lora_alpha=8, target_modules=TARGETS[kind], rank_pattern=rp, alpha_pattern=ap,
            layers_to_transform=layers, layers_pattern=pattern))


def _ours(kind, base, options):
    rp, ap, layers, pattern = options
    return apply_lora(copy.deepcopy(base), rank=4, alpha=8, target_modules=TARGETS[kind], rank_pattern=rp,
                      alpha_pattern=ap, layers_to_transform=layers, layers_pattern=pattern)


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_the_same_modules_ranks_and_scales_as_peft(kind):
    base = MODELS[kind](0)
    pm, ours = _peft(kind, base, OPTIONS[kind]), _ours(kind, base, OPTIONS[kind])
    from peft.tuners.lora import LoraLayer
    theirs = {p.removeprefix("base_model.model."): (m.r["default"], m.scaling["default"])
              for p, m in pm.named_modules() if isinstance(m, LoraLayer)}
    mine = {p: (m.rank, m.scaling) for p, m in lora_layers(ours).items()}
    assert mine == theirs
    assert len({r for r, _ in mine.values()}) > 1 and len({s for _, s in mine.values()}) > 1
    rows = {m.name: (m.rank, m.scale) for m in summarize(ours).modules}   # the dry run's table
    assert rows == mine


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_pattern_adapters_go_both_ways(tmp_path, kind):
    base = MODELS[kind](0)
    x = token_ids()
    ours = _ours(kind, base, OPTIONS[kind])
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for p in ours.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    want = logits(ours, x)
    save_adapter(ours, tmp_path / "ours")
    config = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    if kind == "llama":   # PEFT's own rule finds these layers: the fields are written as given
        assert config["layers_to_transform"] == [1] and config["layers_pattern"] == "layers"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from_ours = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours")
    torch.testing.assert_close(logits(from_ours, x), want, rtol=1e-5, atol=1e-5)
    again = load_adapter(copy.deepcopy(base), tmp_path / "ours", check_base=False)
    torch.testing.assert_close(logits(again, x), want, rtol=1e-5, atol=1e-5)

    pm = _peft(kind, base, OPTIONS[kind])
    with torch.no_grad():
        for p in pm.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    pm.eval()
    want = logits(pm, x)
    pm.save_pretrained(tmp_path / "peft")
    loaded = load_adapter(copy.deepcopy(base), tmp_path / "peft", check_base=False)
    torch.testing.assert_close(logits(loaded, x), want, rtol=1e-5, atol=1e-5)


def test_layers_that_select_nothing_are_refused():
    base = MODELS["llama"](0)
    with pytest.raises(TargetError, match="keeps none"):
        apply_lora(base, rank=4, alpha=8, target_modules=["q_proj"], layers_to_transform=[7])
    assert not lora_layers(base)


def test_config_checks_the_patterns():
    from lora_cli.errors import ConfigError
    from lora_cli.run.config import config_from_dict
    cfg = {"task": "regression", "model": {"arch": "linear"}, "data": {"train": "t.csv"},
           "lora": {"rank_pattern": {"a(": 2, "b": 0}, "alpha_pattern": {"c": "x"}, "layers_to_transform": [-1]}}
    with pytest.raises(ConfigError) as err:
        config_from_dict(cfg, check_files=False)
    text = str(err.value)
    for part in ("lora.rank_pattern: key 'a(' is not a valid regular expression", "lora.rank_pattern.b: must be an "
                 "integer >= 1", "lora.alpha_pattern.c: must be a number > 0", "lora.layers_to_transform"):
        assert part in text, text
