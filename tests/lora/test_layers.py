"""Tests for lora_cli.lora.layers: the LoRA math, fresh-adapter identity, merge and unmerge.

The reference everywhere is the textbook formula (float64 where exactness matters):

    Linear     y = x W^T + b + s * x A^T B^T          A: (r, in), B: (out, r)
    Conv1D     y = x W   + b + s * x A^T B^T          W: (in, out)
    Embedding  y = E[x]      + s * A^T[x] B^T         A: (r, num), B: (dim, r)
    s = alpha / r, or alpha / sqrt(r) with rsLoRA
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.func import functional_call

from conftest import Conv1D
from lora_cli.lora.layers import (LoraEmbedding, LoraLinear, is_adaptable, is_conv1d, is_linear,
                             lora_scaling, wrap)

needs_conv1d = pytest.mark.skipif(Conv1D is None, reason="transformers (Conv1D) is not installed")


def linear(in_f=16, out_f=8, bias=True, dtype=torch.float32, seed=0) -> nn.Linear:
    torch.manual_seed(seed)
    layer = nn.Linear(in_f, out_f, bias=bias).to(dtype)
    if bias:
        with torch.no_grad():
            layer.bias.normal_()
    return layer


def conv1d(in_f=16, out_f=8, dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    layer = Conv1D(out_f, in_f).to(dtype)          # Conv1D(nf=out, nx=in): weight (in, out)
    with torch.no_grad():
        layer.weight.normal_()
        layer.bias.normal_()
    return layer


def embedding(num=20, dim=8, dtype=torch.float32, seed=0, padding_idx=None) -> nn.Embedding:
    torch.manual_seed(seed)
    return nn.Embedding(num, dim, padding_idx=padding_idx).to(dtype)


def randomize_lora(layer, seed=1, std=0.3):
    """Non-zero A and B (a fresh layer has one factor zero, which hides mistakes)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in layer.named_parameters():
            if "lora" in name:
                p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.dtype) * std)
    return layer


# --- scaling --------------------------------------------------------------------------

@pytest.mark.parametrize("rank, alpha", [(1, 1.0), (4, 8.0), (8, 16.0), (16, 4.0)])
def test_scaling_is_alpha_over_r_or_over_sqrt_r(rank, alpha):
    assert lora_scaling(rank, alpha) == alpha / rank
    assert lora_scaling(rank, alpha, use_rslora=True) == pytest.approx(alpha / math.sqrt(rank), rel=1e-15)
    layer = wrap(linear(in_f=16, out_f=16), rank=rank, alpha=alpha, use_rslora=True)
    assert layer.scaling == lora_scaling(rank, alpha, use_rslora=True)


def test_rank_below_one_is_refused():
    with pytest.raises(ValueError, match="rank"):
        wrap(linear(), rank=0, alpha=1.0)


def test_only_linear_conv1d_and_embedding_are_adaptable():
    assert is_adaptable(nn.Linear(2, 2)) and is_linear(nn.Linear(2, 2))
    assert is_adaptable(nn.Embedding(3, 2)) and not is_linear(nn.Embedding(3, 2))
    for module in (nn.LayerNorm(4), nn.Conv2d(1, 1, 1), nn.Sequential(nn.Linear(2, 2))):
        assert not is_adaptable(module)
        with pytest.raises(TypeError):
            wrap(module, rank=1, alpha=1.0)


@needs_conv1d
def test_conv1d_is_detected_as_a_transposed_linear():
    layer = wrap(conv1d(), rank=2, alpha=2.0)
    assert is_conv1d(conv1d()) and isinstance(layer, LoraLinear) and layer.fan_in_fan_out
    assert (layer.in_features, layer.out_features) == (16, 8)
    assert layer.lora_A.shape == (2, 16) and layer.lora_B.shape == (8, 2)


# --- the wrapped module shares its tensors --------------------------------------------

def test_wrapping_shares_the_base_parameters_and_adds_only_two_factors():
    base = linear()
    layer = wrap(base, rank=4, alpha=8.0)
    assert layer.weight is base.weight and layer.bias is base.bias
    names = dict(layer.named_parameters())
    assert set(names) == {"weight", "bias", "lora_A", "lora_B"}
    assert layer.lora_A.shape == (4, 16) and layer.lora_B.shape == (8, 4)    # (r, in), (out, r)
    assert torch.count_nonzero(layer.lora_B) == 0 and torch.count_nonzero(layer.lora_A) > 0
    plain = layer.unload()            # rebuilt from the shared parameters: the layer keeps no reference to base
    assert type(plain) is type(base) and plain.weight is base.weight and plain.bias is base.bias
    assert (plain.in_features, plain.out_features) == (base.in_features, base.out_features)
    assert not any(v is base for v in vars(layer).values())


def test_a_linear_without_bias_has_no_bias_key():
    layer = wrap(linear(bias=False), rank=2, alpha=2.0)
    assert set(layer.state_dict()) == {"weight", "lora_A", "lora_B"}


def test_embedding_factors_follow_peft_layout():
    base = embedding(num=20, dim=8, padding_idx=0)
    layer = wrap(base, rank=4, alpha=8.0)
    assert isinstance(layer, LoraEmbedding) and layer.weight is base.weight
    assert layer.lora_embedding_A.shape == (4, 20) and layer.lora_embedding_B.shape == (8, 4)
    assert torch.count_nonzero(layer.lora_embedding_A) == 0
    assert torch.count_nonzero(layer.lora_embedding_B) > 0
    assert layer.padding_idx == 0


# --- a fresh adapter computes exactly what the base does ------------------------------

@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", [(16,), (5, 16), (2, 3, 16)])
def test_fresh_linear_is_bitwise_the_base(bias, shape):
    base = linear(bias=bias)
    layer = wrap(base, rank=4, alpha=32.0, dropout=0.5).eval()
    x = torch.randn(*shape)
    assert torch.equal(layer(x), base(x))


def test_fresh_linear_in_training_mode_with_dropout_is_still_the_base():
    base = linear()
    layer = wrap(base, rank=4, alpha=8.0, dropout=0.9).train()
    x = torch.randn(6, 16)
    assert torch.equal(layer(x), base(x))


@needs_conv1d
@pytest.mark.parametrize("shape", [(5, 16), (2, 3, 16)])
def test_fresh_conv1d_is_bitwise_the_base(shape):
    base = conv1d()
    layer = wrap(base, rank=4, alpha=8.0, dropout=0.3).eval()
    x = torch.randn(*shape)
    assert torch.equal(layer(x), base(x))


def test_fresh_embedding_is_bitwise_the_base():
    base = embedding(padding_idx=1)
    layer = wrap(base, rank=4, alpha=8.0).eval()
    ids = torch.randint(0, 20, (3, 7))
    assert torch.equal(layer(ids), base(ids))


# --- the forward is the textbook formula ----------------------------------------------

@pytest.mark.parametrize("use_rslora", [False, True])
@pytest.mark.parametrize("bias", [True, False])
def test_linear_forward_is_the_formula_in_float64(use_rslora, bias):
    base = linear(bias=bias, dtype=torch.float64)
    layer = randomize_lora(wrap(base, rank=4, alpha=6.0, dropout=0.5, use_rslora=use_rslora).double()).eval()
    assert layer.lora_A.dtype == torch.float64 and layer.weight is base.weight
    s = 6.0 / math.sqrt(4) if use_rslora else 6.0 / 4
    assert layer.scaling == pytest.approx(s, rel=1e-15)
    x = torch.randn(3, 5, 16, dtype=torch.float64)
    W, A, B = base.weight, layer.lora_A, layer.lora_B
    expected = x @ W.T + s * (x @ A.T @ B.T)
    if bias:
        expected = expected + base.bias
    torch.testing.assert_close(layer(x), expected, rtol=0, atol=1e-12)


@needs_conv1d
@pytest.mark.parametrize("use_rslora", [False, True])
def test_conv1d_forward_is_the_formula_in_float64(use_rslora):
    base = conv1d(dtype=torch.float64)
    layer = randomize_lora(wrap(base, rank=3, alpha=5.0, use_rslora=use_rslora).double()).eval()
    s = 5.0 / math.sqrt(3) if use_rslora else 5.0 / 3
    x = torch.randn(4, 16, dtype=torch.float64)
    expected = x @ base.weight + base.bias + s * (x @ layer.lora_A.T @ layer.lora_B.T)   # W: (in, out)
    torch.testing.assert_close(layer(x), expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize("use_rslora", [False, True])
def test_embedding_forward_is_the_formula_in_float64(use_rslora):
    base = embedding(dtype=torch.float64)
    layer = randomize_lora(wrap(base, rank=4, alpha=8.0, use_rslora=use_rslora).double())
    s = 8.0 / math.sqrt(4) if use_rslora else 8.0 / 4
    ids = torch.randint(0, 20, (3, 6))
    A, B = layer.lora_embedding_A, layer.lora_embedding_B
    expected = base.weight[ids] + s * (A.T[ids] @ B.T)
    torch.testing.assert_close(layer(ids), expected, rtol=0, atol=1e-12)


def test_dropout_applies_to_the_lora_branch_only():
    base = linear()
    layer = randomize_lora(wrap(base, rank=4, alpha=8.0, dropout=1.0))
    x = torch.randn(4, 16)
    assert torch.equal(layer.train()(x), base(x))          # dropout p=1 zeroes the LoRA input only
    assert not torch.allclose(layer.eval()(x), base(x))     # eval: no dropout, the update is there


def test_low_precision_input_keeps_its_dtype_and_matches_float32():
    base = linear().to(torch.bfloat16)
    layer = randomize_lora(wrap(base, rank=4, alpha=8.0)).eval()
    assert layer.lora_A.dtype == torch.float32                # factors are kept in float32
    x = torch.randn(5, 16)
    out = layer(x.to(torch.bfloat16))
    assert out.dtype == torch.bfloat16
    ref = x @ base.weight.float().T + base.bias.float() + layer.scaling * (x @ layer.lora_A.T @ layer.lora_B.T)
    torch.testing.assert_close(out.float(), ref, rtol=0.05, atol=0.05)


# --- gradients ------------------------------------------------------------------------

@pytest.mark.parametrize("fan_in_fan_out", [False, True])
def test_linear_gradcheck_wrt_input_and_both_factors(fan_in_fan_out):
    if fan_in_fan_out:
        if Conv1D is None:
            pytest.skip("transformers (Conv1D) is not installed")
        base = conv1d(in_f=6, out_f=5, dtype=torch.float64)
    else:
        base = linear(in_f=6, out_f=5, dtype=torch.float64)
    layer = wrap(base, rank=3, alpha=4.0, use_rslora=True).double().eval()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 6, dtype=torch.float64, generator=g, requires_grad=True)
    A = torch.randn(3, 6, dtype=torch.float64, generator=g, requires_grad=True)
    B = torch.randn(5, 3, dtype=torch.float64, generator=g, requires_grad=True)

    def f(x, A, B):
        return functional_call(layer, {"lora_A": A, "lora_B": B}, (x,))

    assert torch.autograd.gradcheck(f, (x, A, B))


def test_embedding_gradcheck_wrt_both_factors():
    layer = wrap(embedding(num=7, dim=5, dtype=torch.float64), rank=2, alpha=3.0).double()
    g = torch.Generator().manual_seed(0)
    ids = torch.tensor([[0, 3, 3, 6], [1, 2, 5, 0]])
    A = torch.randn(2, 7, dtype=torch.float64, generator=g, requires_grad=True)
    B = torch.randn(5, 2, dtype=torch.float64, generator=g, requires_grad=True)

    def f(A, B):
        return functional_call(layer, {"lora_embedding_A": A, "lora_embedding_B": B}, (ids,))

    assert torch.autograd.gradcheck(f, (A, B))


def test_backward_reaches_only_the_factors_when_the_base_is_frozen():
    base = linear()
    base.requires_grad_(False)
    layer = wrap(base, rank=4, alpha=8.0)
    layer(torch.randn(5, 16)).pow(2).sum().backward()
    assert base.weight.grad is None and base.bias.grad is None
    assert layer.lora_B.grad is not None and torch.count_nonzero(layer.lora_B.grad) > 0
    assert layer.lora_A.grad is not None      # zero at start (B = 0), but it is in the graph


# --- delta, merge, unmerge ------------------------------------------------------------

def _layers():
    out = [("linear", lambda: wrap(linear(), rank=4, alpha=8.0), lambda: torch.randn(3, 5, 16)),
           ("embedding", lambda: wrap(embedding(), rank=4, alpha=8.0), lambda: torch.randint(0, 20, (3, 5)))]
    if Conv1D is not None:
        out.append(("conv1d", lambda: wrap(conv1d(), rank=4, alpha=8.0, use_rslora=True),
                    lambda: torch.randn(3, 5, 16)))
    return out


LAYERS = _layers()


@pytest.mark.parametrize("kind, make, inputs", LAYERS, ids=[k for k, _, _ in LAYERS])
def test_delta_weight_has_the_layout_of_the_weight(kind, make, inputs):
    layer = randomize_lora(make())
    delta = layer.delta_weight()
    assert delta.shape == layer.weight.shape and delta.dtype == torch.float32
    if kind == "embedding":
        expected = (layer.lora_embedding_B @ layer.lora_embedding_A).T * layer.scaling   # (num, dim)
    else:
        expected = (layer.lora_B @ layer.lora_A) * layer.scaling                        # (out, in)
        expected = expected.T if kind == "conv1d" else expected
    torch.testing.assert_close(delta, expected)


@pytest.mark.parametrize("kind, make, inputs", LAYERS, ids=[k for k, _, _ in LAYERS])
def test_merged_equals_unmerged_and_merge_is_idempotent(kind, make, inputs):
    layer = randomize_lora(make()).eval()
    x = inputs()
    original = layer.weight.detach().clone()
    adapted = layer(x)
    layer.merge()
    assert layer.merged
    once = layer.weight.detach().clone()
    torch.testing.assert_close(layer(x), adapted, rtol=0, atol=1e-5)
    torch.testing.assert_close(once, original + layer.delta_weight(), rtol=0, atol=1e-6)
    layer.merge()
    assert torch.equal(layer.weight, once)                    # merging twice == merging once
    layer.unmerge()
    assert not layer.merged
    torch.testing.assert_close(layer.weight.detach(), original, rtol=0, atol=1e-6)
    torch.testing.assert_close(layer(x), adapted, rtol=0, atol=1e-5)
    before = layer.weight.detach().clone()
    layer.unmerge()                                           # unmerging twice is a no-op
    assert torch.equal(layer.weight, before)


def test_merge_keeps_the_parameter_object_and_its_dtype():
    base = linear()
    layer = randomize_lora(wrap(base, rank=4, alpha=8.0))
    weight = layer.weight
    layer.merge()
    assert layer.weight is weight and base.weight is weight and weight.dtype == torch.float32


def test_bf16_merge_is_float32_math_cast_once():
    base = linear().to(torch.bfloat16)
    layer = randomize_lora(wrap(base, rank=4, alpha=8.0))
    W = base.weight.detach().clone()
    expected = (W.float() + (layer.lora_B @ layer.lora_A) * layer.scaling).to(torch.bfloat16)
    layer.merge()
    assert layer.weight.dtype == torch.bfloat16
    assert torch.equal(layer.weight, expected)


def test_merging_a_zero_update_into_a_float64_weight_changes_nothing():
    base = linear(dtype=torch.float64)
    with torch.no_grad():
        base.weight.copy_(torch.randn(8, 16, dtype=torch.float64))    # not representable in float32
    layer = wrap(base, rank=4, alpha=8.0).double()                   # fresh: B = 0, the update is zero
    before = base.weight.detach().clone()
    layer.merge()
    assert torch.equal(base.weight, before)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("kind, make, inputs", LAYERS, ids=[k for k, _, _ in LAYERS])
def test_merge_of_non_finite_factors_raises_and_leaves_the_weight(bad, kind, make, inputs):
    layer = randomize_lora(make())
    factor = layer.lora_embedding_B if kind == "embedding" else layer.lora_B
    with torch.no_grad():
        factor[0, 0] = bad
    before = layer.weight.detach().clone()
    with pytest.raises(FloatingPointError, match="non-finite"):
        layer.merge()
    assert not layer.merged and torch.equal(layer.weight, before)


@settings(max_examples=25, deadline=None)
@given(in_f=st.integers(1, 12), out_f=st.integers(1, 12), rank=st.integers(1, 12),
       alpha=st.floats(0.5, 64.0), rslora=st.booleans(), batch=st.integers(1, 4))
def test_property_merge_round_trip_for_any_shape(in_f, out_f, rank, alpha, rslora, batch):
    rank = min(rank, in_f, out_f)
    base = linear(in_f, out_f)
    layer = randomize_lora(wrap(base, rank=rank, alpha=alpha, use_rslora=rslora)).eval()
    x = torch.randn(batch, in_f)
    W = base.weight.detach().clone()
    expected = x @ W.T + base.bias + layer.scaling * (x @ layer.lora_A.T @ layer.lora_B.T)
    adapted = layer(x)
    torch.testing.assert_close(adapted, expected, rtol=1e-5, atol=1e-4)
    layer.merge()
    torch.testing.assert_close(layer(x), adapted, rtol=1e-5, atol=1e-4)
    layer.unmerge()
    torch.testing.assert_close(base.weight.detach(), W, rtol=0, atol=1e-4)
