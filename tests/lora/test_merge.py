"""Tests for lora_cli.lora.merge: folding adapters into a model or a state dict.

Invariants: merged equals adapted; merging is float32 math cast once; what no adapter
touches passes through as the same object; the input state dict is never modified; a
merged model is the plain base architecture again, with the base's keys; non-finite
results are refused.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from conftest import Conv1D, DIM, N_LAYER, ids, perturb_lora, state_copy, tiny_gpt2, tiny_lm
from lora_cli import apply_lora, load_adapter, merge_adapter, merge_state_dict, read_adapter, save_adapter
from lora_cli.lora.adapter import Adapter
from lora_cli.errors import AdapterError, UserError
from lora_cli.lora.inject import get_spec, lora_layers
from lora_cli.lora.layers import LoraLayer
from lora_cli.lora.merge import Merger

LM_TARGETS = ["embed_tokens", "q_proj", "v_proj", "down_proj"]


def adapted_lm(seed=0, targets=LM_TARGETS, lora_seed=3, **kw) -> nn.Module:
    model = tiny_lm(seed)
    kw.setdefault("bias", "lora_only")
    kw.setdefault("modules_to_save", ["lm_head"])
    apply_lora(model, rank=4, alpha=8, target_modules=targets, **kw)
    return perturb_lora(model, seed=lora_seed).eval()


def adapted_gpt2(lora_seed=3) -> nn.Module:
    model = tiny_gpt2()
    apply_lora(model, rank=2, alpha=4, target_modules=["wte", "c_attn", "c_fc", "c_proj"], bias="lora_only")
    return perturb_lora(model, seed=lora_seed).eval()


def saved_adapter(model, tmp_path, name="a") -> Adapter:
    save_adapter(model, tmp_path / name)
    return read_adapter(tmp_path / name)


def deltas(model) -> dict[str, torch.Tensor]:
    """``<path>.weight`` -> s * B @ A in the weight's layout, from the live LoRA layers."""
    return {f"{p}.weight": layer.delta_weight() for p, layer in lora_layers(model).items()}


# --- merge_adapter --------------------------------------------------------------------

@pytest.mark.parametrize("make", [adapted_lm, adapted_gpt2], ids=["lm", "gpt2"])
def test_merged_model_computes_what_the_adapted_model_did(make):
    model = make()
    x = ids()
    adapted = model(x)
    merge_adapter(model)
    torch.testing.assert_close(model(x), adapted, rtol=0, atol=1e-5)


@pytest.mark.parametrize("make", [adapted_lm, adapted_gpt2], ids=["lm", "gpt2"])
def test_merge_restores_the_plain_architecture_and_the_base_keys(make):
    model = make()
    base = tiny_lm() if make is adapted_lm else tiny_gpt2()
    types = {name: type(m) for name, m in base.named_modules()}
    merge_adapter(model)
    assert not any(isinstance(m, LoraLayer) for m in model.modules())
    assert get_spec(model) is None
    assert {name: type(m) for name, m in model.named_modules()} == types
    assert list(model.state_dict()) == list(base.state_dict())
    if make is adapted_gpt2:
        assert type(model.h[0].attn.c_attn) is Conv1D and type(model.wte) is nn.Embedding
    else:
        assert type(model.layers[0].self_attn.q_proj) is nn.Linear and type(model.embed_tokens) is nn.Embedding
        assert model.layers[0].self_attn.q_proj.weight.requires_grad is False


def test_merged_weights_are_base_plus_delta_and_the_rest_is_untouched():
    model = adapted_lm()
    before, expected = state_copy(model), deltas(model)
    merge_adapter(model)
    after = model.state_dict()
    for key, t in after.items():
        if key in expected:
            torch.testing.assert_close(t, before[key] + expected[key], rtol=0, atol=1e-6)
            assert not torch.equal(t, before[key])
        else:
            assert torch.equal(t, before[key]), key


def test_merging_twice_is_merging_once():
    model = adapted_lm()
    lora_layers(model)["layers.0.self_attn.q_proj"].merge()     # one layer already merged by hand
    reference = adapted_lm()
    merge_adapter(reference)
    merge_adapter(model)
    once = state_copy(model)
    merge_adapter(model)
    after = model.state_dict()
    assert all(torch.equal(after[k], once[k]) for k in once)
    assert all(torch.equal(once[k], v) for k, v in reference.state_dict().items())


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_merge_with_non_finite_lora_weights_raises(bad):
    model = adapted_lm()
    with torch.no_grad():
        lora_layers(model)["layers.0.self_attn.v_proj"].lora_A[0, 0] = bad
    with pytest.raises((FloatingPointError, UserError), match="non-finite"):
        merge_adapter(model)
    assert torch.isfinite(model.layers[0].self_attn.v_proj.weight).all()


def test_a_failed_merge_leaves_the_model_as_it_was(tmp_path):
    model = adapted_lm()
    before = state_copy(model)
    with torch.no_grad():
        lora_layers(model)["layers.1.mlp.down_proj"].lora_B[0, 0] = float("inf")   # the last adapted layer
    with pytest.raises((FloatingPointError, UserError)):
        merge_adapter(model)
    assert set(lora_layers(model)) == set(get_spec(model).targets)
    after = model.state_dict()
    assert all(torch.equal(after[k], before[k]) for k in before if "down_proj.lora_B" not in k)


# --- merge_state_dict -----------------------------------------------------------------

@pytest.mark.parametrize("make, fresh", [(adapted_lm, tiny_lm), (adapted_gpt2, tiny_gpt2)], ids=["lm", "gpt2"])
def test_merge_state_dict_equals_merging_the_model(tmp_path, make, fresh):
    model = make()
    adapter = saved_adapter(model, tmp_path)
    base = fresh().state_dict()
    merged = merge_state_dict(base, adapter)
    merge_adapter(model)
    reference = model.state_dict()
    assert list(merged) == list(reference)
    for key in reference:
        torch.testing.assert_close(merged[key], reference[key], rtol=0, atol=1e-6)


def test_merge_state_dict_passes_untouched_tensors_through_and_leaves_its_input_alone(tmp_path):
    adapter = saved_adapter(adapted_lm(), tmp_path)
    base = tiny_lm().state_dict()
    snapshot = {k: v.clone() for k, v in base.items()}
    objects = dict(base)
    merged = merge_state_dict(base, adapter)
    assert merged is not base and list(base) == list(snapshot)
    assert all(base[k] is objects[k] and torch.equal(base[k], snapshot[k]) for k in base)
    touched = {f"{p}.weight" for p in adapter.updates} | set(adapter.replacements)
    assert "lm_head.weight" in touched and "layers.0.self_attn.q_proj.bias" in touched
    for key, t in merged.items():
        if key in touched:
            assert t is not base[key] and not torch.equal(t, base[key]), key
        else:
            assert t is base[key], key
    assert torch.equal(merged["lm_head.weight"], adapter.replacements["lm_head.weight"])


def test_merge_state_dict_refuses_a_base_that_does_not_fit(tmp_path):
    adapter = saved_adapter(adapted_lm(), tmp_path)
    base = tiny_lm().state_dict()
    wrong = dict(base, **{"layers.0.self_attn.q_proj.weight": torch.zeros(DIM + 1, DIM)})
    with pytest.raises(AdapterError, match=r"'layers.0.self_attn.q_proj.weight' is \(17, 16\) in the base"):
        merge_state_dict(wrong, adapter)
    missing = {k: v for k, v in base.items() if k != "lm_head.weight"}
    with pytest.raises(AdapterError, match="'lm_head.weight' is not in the base"):
        merge_state_dict(missing, adapter)
    wrong_bias = dict(base, **{"layers.1.mlp.down_proj.bias": torch.zeros(3)})
    with pytest.raises(AdapterError, match="does not fit"):
        merge_state_dict(wrong_bias, adapter)


def test_two_adapters_merge_as_the_weighted_sum_of_their_deltas(tmp_path):
    first = adapted_lm(targets=["q_proj", "v_proj"], lora_seed=1, bias="none", modules_to_save=[])
    second = adapted_lm(targets=["q_proj", "down_proj"], lora_seed=2, bias="none", modules_to_save=[])
    a1, a2 = saved_adapter(first, tmp_path, "one"), saved_adapter(second, tmp_path, "two")
    base = tiny_lm().state_dict()
    merged = merge_state_dict(base, [a1, a2], weights=[0.7, 0.3])
    d1, d2 = deltas(first), deltas(second)
    for key, t in base.items():
        expected = t + 0.7 * d1.get(key, torch.zeros_like(t)) + 0.3 * d2.get(key, torch.zeros_like(t))
        torch.testing.assert_close(merged[key], expected, rtol=0, atol=1e-6)
    assert not torch.equal(merged["layers.0.self_attn.q_proj.weight"], base["layers.0.self_attn.q_proj.weight"])
    assert merged["layers.0.self_attn.k_proj.weight"] is base["layers.0.self_attn.k_proj.weight"]


def test_adapter_weights_must_match_and_replacements_must_not_clash(tmp_path):
    one = saved_adapter(adapted_lm(lora_seed=1), tmp_path, "one")
    two = saved_adapter(adapted_lm(lora_seed=2), tmp_path, "two")
    with pytest.raises(AdapterError, match="2 weights given for 1 adapters"):
        merge_state_dict(tiny_lm().state_dict(), one, weights=[0.5, 0.5])
    with pytest.raises(AdapterError, match="both replace 'lm_head.weight'|both replace"):
        merge_state_dict(tiny_lm().state_dict(), [one, two])
    with pytest.raises(ValueError):
        Merger([])


def test_bf16_base_merges_in_float32_and_casts_once(tmp_path):
    model = adapted_lm()
    adapter = saved_adapter(model, tmp_path)
    expected = deltas(model)
    base = {k: v.to(torch.bfloat16) for k, v in tiny_lm().state_dict().items()}
    merged = merge_state_dict(base, adapter)
    for key, t in merged.items():
        assert t.dtype == torch.bfloat16, key
        if key in expected:
            assert torch.equal(t, (base[key].float() + expected[key]).to(torch.bfloat16)), key
        elif key in adapter.replacements:
            assert torch.equal(t, adapter.replacements[key].to(torch.bfloat16)), key
        else:
            assert t is base[key], key


def test_float64_base_keeps_float64_precision(tmp_path):
    model = adapted_lm()
    adapter = saved_adapter(model, tmp_path)
    g = torch.Generator().manual_seed(0)
    base = {k: torch.randn(v.shape, generator=g, dtype=torch.float64) for k, v in tiny_lm().state_dict().items()}
    merged = merge_state_dict(base, adapter)
    key = "layers.0.self_attn.q_proj.weight"
    expected = base[key] + deltas(model)[key].double()
    torch.testing.assert_close(merged[key], expected, rtol=0, atol=1e-12)


def test_merge_state_dict_refuses_non_finite_results(tmp_path):
    model = adapted_lm()
    with torch.no_grad():
        lora_layers(model)["embed_tokens"].lora_embedding_B[0, 0] = float("nan")
    adapter = saved_adapter(model, tmp_path)
    with pytest.raises(AdapterError, match="'embed_tokens.weight' gave non-finite"):
        merge_state_dict(tiny_lm().state_dict(), adapter)


def test_merger_checks_and_touches(tmp_path):
    adapter = saved_adapter(adapted_lm(), tmp_path)
    merger = Merger([adapter])
    shapes = {k: tuple(v.shape) for k, v in tiny_lm().state_dict().items()}
    merger.check(shapes)
    assert merger.touches("layers.0.self_attn.q_proj.weight") and merger.touches("lm_head.weight")
    assert not merger.touches("layers.0.self_attn.k_proj.weight") and not merger.touches("norm.weight")
    t = torch.ones(3)
    assert merger("norm.weight", t) is t


def test_a_merged_state_dict_loads_into_the_plain_base(tmp_path):
    model = adapted_lm()
    adapter = saved_adapter(model, tmp_path)
    plain = tiny_lm()
    plain.load_state_dict(merge_state_dict(tiny_lm().state_dict(), adapter), strict=True)
    torch.testing.assert_close(plain(ids()), model(ids()), rtol=0, atol=1e-5)


# --- PEFT -----------------------------------------------------------------------------

def test_merge_state_dict_of_a_peft_adapter_equals_peft_merge_and_unload(tmp_path):
    peft = pytest.importorskip("peft")
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj", "embed_tokens"],
                             bias="lora_only", modules_to_save=["lm_head"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.get_peft_model(tiny_lm(), config)
        perturb_lora(pm).eval()
        pm.save_pretrained(tmp_path / "peft")
        reference = pm.merge_and_unload().state_dict()
    base = tiny_lm().state_dict()
    merged = merge_state_dict(base, read_adapter(tmp_path / "peft"))
    assert list(merged) == list(reference) == list(base)
    for key in reference:
        torch.testing.assert_close(merged[key], reference[key], rtol=0, atol=1e-6)
    changed = [k for k in base if not torch.equal(merged[k], base[k])]
    assert "lm_head.weight" in changed and "embed_tokens.weight" in changed
    assert len(changed) == 1 + 1 + N_LAYER * 3 * 2        # head, embedding, 3 linear targets (weight + bias) x 2
    # and lora-cli's own merge of the same adapter agrees
    model = load_adapter(tiny_lm(), tmp_path / "peft", check_base=False)
    merge_adapter(model)
    for key, t in model.state_dict().items():
        torch.testing.assert_close(t, reference[key], rtol=0, atol=1e-6)
