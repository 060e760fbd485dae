"""DoRA (lora_cli.lora.dora): the fast row norms equal the built ones, a fresh adapter
changes nothing, forward and gradients match PEFT's on tiny Llama and GPT-2, adapters go
both ways between PEFT and lora-cli, merged equals unmerged, what is unsupported is refused."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

from hf_tiny import MODELS, TARGETS, logits, token_ids
from lora_cli import apply_lora, load_adapter, read_adapter, save_adapter
from lora_cli.errors import AdapterError, TargetError
from lora_cli.lora.dora import MAGNITUDE, DoraLinear, dora_norms, weight_sq_norms
from lora_cli.lora.inject import lora_layers
from lora_cli.lora.merge import Merger, merge_adapter, merge_state_dict

peft = pytest.importorskip("peft")


def _randomize_adapter(model, seed=3):
    """Non-zero A, B and a moved magnitude, as training leaves them."""
    g = torch.Generator().manual_seed(seed)
    values = {}
    with torch.no_grad():
        for path, layer in lora_layers(model).items():
            for name in layer.lora_names:
                p = getattr(layer, name)
                noise = torch.randn(p.shape, generator=g)
                p.copy_(p * (1 + 0.1 * noise) if name == MAGNITUDE else 0.1 * noise)
                values[(path, name)] = p.detach().clone()
    return values


def _peft_dora(kind, base, dropout=0.0):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(
            r=4, lora_alpha=8, target_modules=TARGETS[kind], use_dora=True, lora_dropout=dropout))


def _copy_into_peft(values, pm):
    with torch.no_grad():
        for (path, name), v in values.items():
            module = pm.base_model.model.get_submodule(path)
            target = getattr(module, name)["default"]
            target.weight.copy_(v)


def _peft_param(pm, path, name):
    return getattr(pm.base_model.model.get_submodule(path), name)["default"].weight


@pytest.mark.parametrize("fan_in_fan_out", [False, True])
def test_row_norms_from_the_low_rank_identity_equal_the_built_ones(fan_in_fan_out):
    g = torch.Generator().manual_seed(0)
    W = torch.randn(24, 40, generator=g)                      # (out, in)
    A, B = torch.randn(5, 40, generator=g), torch.randn(24, 5, generator=g)
    stored = W.t().contiguous() if fan_in_fan_out else W      # Conv1D keeps (in, out)
    layout = "conv1d" if fan_in_fan_out else "linear"
    w_sq = weight_sq_norms(stored, layout)
    view = stored.t() if fan_in_fan_out else stored
    got = dora_norms(view, w_sq, A, B, 0.7)
    torch.testing.assert_close(got, torch.linalg.vector_norm(W + 0.7 * B @ A, dim=1), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_a_fresh_dora_adapter_changes_nothing(kind):
    base = MODELS[kind](0)
    x = token_ids()
    before = logits(base, x)
    model = apply_lora(base, rank=4, alpha=8, target_modules=TARGETS[kind], use_dora=True)
    assert all(isinstance(m, DoraLinear) for m in lora_layers(model).values())
    torch.testing.assert_close(logits(model, x), before, rtol=1e-5, atol=1e-6)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.rsplit(".", 1)[-1] in ("lora_A", "lora_B", MAGNITUDE) for n in trainable)
    assert sum(n.endswith(MAGNITUDE) for n in trainable) == len(lora_layers(model))


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_forward_and_gradients_match_peft(kind):
    base = MODELS[kind](0)
    pm = _peft_dora(kind, base)
    ours = apply_lora(copy.deepcopy(base), rank=4, alpha=8, target_modules=TARGETS[kind], use_dora=True)
    for path, layer in lora_layers(ours).items():   # the same initial magnitude: ||W||_row
        torch.testing.assert_close(layer.lora_magnitude_vector, _peft_param(pm, path, MAGNITUDE), rtol=1e-6, atol=0)
    values = _randomize_adapter(ours)
    _copy_into_peft(values, pm)
    ours.train(), pm.train()
    x = token_ids()
    y_ours, y_peft = ours(x).logits, pm(x).logits
    torch.testing.assert_close(y_ours, y_peft, rtol=1e-5, atol=1e-5)
    (y_ours.square().mean()).backward()
    (y_peft.square().mean()).backward()
    for (path, name) in values:
        got, want = getattr(lora_layers(ours)[path], name).grad, _peft_param(pm, path, name).grad
        assert float((got - want).norm() / want.norm()) < 1e-5, (path, name)


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_adapters_go_both_ways_between_peft_and_lora_cli(tmp_path, kind):
    base = MODELS[kind](0)
    x = token_ids()
    ours = apply_lora(copy.deepcopy(base), rank=4, alpha=8, target_modules=TARGETS[kind], use_dora=True)
    _randomize_adapter(ours)
    want = logits(ours, x)
    save_adapter(ours, tmp_path / "ours")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from_ours = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours")
    torch.testing.assert_close(logits(from_ours, x), want, rtol=1e-5, atol=1e-5)

    pm = _peft_dora(kind, base)
    _copy_into_peft(_randomize_adapter(copy.deepcopy(ours), seed=9), pm)
    pm.eval()
    want = logits(pm, x)
    pm.save_pretrained(tmp_path / "peft")
    loaded = load_adapter(copy.deepcopy(base), tmp_path / "peft", check_base=False)
    torch.testing.assert_close(logits(loaded, x), want, rtol=1e-5, atol=1e-5)
    # merged on the state dict (what lora-merge does) equals PEFT's own merge
    merged = merge_state_dict(base.state_dict(), read_adapter(tmp_path / "peft"))
    peft_merged = pm.merge_and_unload().state_dict()
    for key, t in merged.items():
        torch.testing.assert_close(t, peft_merged[key], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_merged_equals_unmerged_and_unmerge_restores(kind):
    base = MODELS[kind](0)
    model = apply_lora(base, rank=4, alpha=8, target_modules=TARGETS[kind], use_dora=True)
    _randomize_adapter(model)
    x = token_ids()
    unmerged = logits(model, x)
    weights = {p: m.weight.detach().clone() for p, m in lora_layers(model).items()}
    for layer in lora_layers(model).values():
        layer.merge()
        layer.merge()                    # idempotent
    torch.testing.assert_close(logits(model, x), unmerged, rtol=1e-5, atol=1e-5)
    for path, layer in lora_layers(model).items():
        layer.unmerge()
        torch.testing.assert_close(layer.weight, weights[path], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(logits(model, x), unmerged, rtol=1e-5, atol=1e-5)
    plain = merge_adapter(model)
    assert not lora_layers(plain)
    torch.testing.assert_close(logits(plain, x), unmerged, rtol=1e-5, atol=1e-5)


def test_the_norm_follows_base_weights_loaded_after_injection():
    layer = DoraLinear(nn.Linear(6, 4), rank=2, alpha=2)
    first = layer.weight_norm().clone()
    with torch.no_grad():
        layer.weight.mul_(3)             # an in-place load of other base weights
    torch.testing.assert_close(layer.weight_norm(), first * 3)


def test_embeddings_are_refused_and_nothing_changes():
    base = MODELS["llama"](0)
    with pytest.raises(TargetError, match="DoRA is not available for 'model.embed_tokens'"):
        apply_lora(base, rank=4, alpha=8, target_modules=["q_proj", "embed_tokens"], use_dora=True)
    assert not lora_layers(base)


def test_malformed_dora_adapters_are_refused(tmp_path):
    from safetensors.torch import load_file, save_file
    base = MODELS["llama"](0)
    model = apply_lora(copy.deepcopy(base), rank=4, alpha=8, target_modules=["q_proj"], use_dora=True)
    save_adapter(model, tmp_path / "a")
    weights = tmp_path / "a" / "adapter_model.safetensors"
    tensors = load_file(weights)
    key = next(k for k in tensors if k.endswith(MAGNITUDE))
    save_file({k: v for k, v in tensors.items() if k != key}, weights)
    with pytest.raises(AdapterError, match=f"no {MAGNITUDE}"):
        read_adapter(tmp_path / "a")
    save_file({**tensors, key: tensors[key][:-1]}, weights)
    with pytest.raises(AdapterError, match="not \\("):
        read_adapter(tmp_path / "a")
    save_file(tensors, weights)
    adapter = read_adapter(tmp_path / "a")
    with pytest.raises(AdapterError, match="merged alone"):
        Merger([adapter, adapter])
    with pytest.raises(AdapterError, match="merged alone"):
        Merger([adapter], weights=[0.5])
    plain = apply_lora(copy.deepcopy(base), rank=4, alpha=8, target_modules=["q_proj"])
    from lora_cli.lora.adapter import load_adapter_weights
    with pytest.raises(AdapterError, match="use_dora"):
        load_adapter_weights(plain, adapter)
