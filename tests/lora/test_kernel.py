"""The hot path of the LoRA Linear: the written-out backward and the cheap shared dropout."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from lora_cli.lora.kernel import keep_mask, sharing_dropout
from lora_cli.lora.layers import wrap


@pytest.mark.parametrize("p", [0.01, 0.05, 0.1, 0.3, 0.5])
def test_dropout_probability_is_exact_to_1e4(p):
    torch.manual_seed(0)
    x = torch.empty(2048, 2048)
    keep, p_eff = keep_mask(x, p)
    assert keep.shape == x.shape and keep.dtype == torch.bool
    assert abs(p_eff - p) <= 1e-4
    observed = 1 - keep.float().mean().item()
    sigma = math.sqrt(p_eff * (1 - p_eff) / x.numel())
    assert abs(observed - p_eff) < 5 * sigma                    # 5 sigma: about 4e-4 at p = 0.5


def test_mask_bits_are_uniform_in_every_lane():
    torch.manual_seed(1)
    keep, _ = keep_mask(torch.empty(4096, 1024), 0.5)
    by_lane = keep.reshape(-1, 4).float().mean(0)              # the four 16-bit lanes of one draw
    assert torch.all((by_lane - 0.5).abs() < 5 * math.sqrt(0.25 / (keep.numel() / 4)))


def _textbook(layer, x, keep, p_eff):
    """x W^T + b + s / (1 - p) * (keep * x) A^T B^T in autograd, for comparison."""
    s = layer.scaling / (1 - p_eff)
    return x @ layer.weight.T + layer.bias + s * ((x * keep) @ layer.lora_A.T) @ layer.lora_B.T


def test_dropout_forward_and_gradients_match_the_textbook_with_the_same_mask():
    torch.manual_seed(2)
    layer = wrap(nn.Linear(24, 40).double(), rank=4, alpha=8, dropout=0.2)
    layer.lora_A.data = layer.lora_A.data.double()
    layer.lora_B.data = torch.randn(40, 4, dtype=torch.float64)
    layer.train()
    x = torch.randn(3, 5, 24, dtype=torch.float64, requires_grad=True)
    with sharing_dropout() as share:                           # to see the mask the layer drew
        out = layer(x)
        _, keep, p_eff = share._value
    grads = torch.autograd.grad(out.square().sum(), (x, layer.lora_A, layer.lora_B))
    ref = _textbook(layer, x, keep.view(x.shape), p_eff)
    ref_grads = torch.autograd.grad(ref.square().sum(), (x, layer.lora_A, layer.lora_B))
    torch.testing.assert_close(out, ref)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want)


def test_layers_reading_the_same_input_share_one_mask():
    torch.manual_seed(3)
    q, k = (wrap(nn.Linear(16, 16), rank=2, alpha=4, dropout=0.5).train() for _ in range(2))
    x = torch.randn(8, 16)
    with sharing_dropout() as shared_dropout:
        q(x)
        first = shared_dropout._value
        k(x)
        assert shared_dropout._value is first                      # same tensor: the mask is reused
        x.add_(1.0)                                                 # changed in place: a new mask
        k(x)
        assert shared_dropout._value is not first
        other = torch.randn(8, 16)
        q(other)
        assert not torch.equal(shared_dropout._value[1], first[1])
    assert shared_dropout._value is None                           # nothing is kept after the block


def test_dropout_is_unbiased_on_average():
    torch.manual_seed(4)
    layer = wrap(nn.Linear(32, 8), rank=4, alpha=8, dropout=0.3)
    layer.lora_B.data.normal_()
    x = torch.randn(4, 32)
    with torch.no_grad():
        expected = layer.eval()(x)
        layer.train()
        mean = sum(layer(x.clone()) for _ in range(4000)) / 4000
    assert torch.allclose(mean, expected, atol=0.05 * expected.abs().max().item())


def test_eval_mode_and_zero_dropout_draw_no_mask():
    layer = wrap(nn.Linear(8, 8), rank=2, alpha=2, dropout=0.1)
    with sharing_dropout() as shared_dropout:
        layer.eval()(torch.randn(2, 8))
        wrap(nn.Linear(8, 8), rank=2, alpha=2).train()(torch.randn(2, 8))
        assert shared_dropout._value is None


def test_without_sharing_each_layer_draws_its_own_mask_as_peft_does():
    """The default outside lora-train: q and k reading one input get independent masks."""
    torch.manual_seed(5)
    q, k = (wrap(nn.Linear(64, 64), rank=2, alpha=4, dropout=0.5).train() for _ in range(2))
    for layer in (q, k):
        layer.lora_B.data.normal_()
    x = torch.randn(16, 64)
    masks = []
    real = torch.where

    def spy(cond, *rest):
        if cond.dtype == torch.bool and cond.shape == (16, 64):
            masks.append(cond.clone())
        return real(cond, *rest)

    torch.where = spy
    try:
        q(x), k(x)
    finally:
        torch.where = real
    assert len(masks) == 2 and not torch.equal(masks[0], masks[1])
