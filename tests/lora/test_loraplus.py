"""LoRA+ (lora_cli.lora.loraplus): B factors in their own group at lr x R, found by
module type; with every optimizer lora-train offers, the first step moves B by exactly R
times what plain LoRA moves it, and everything else the same."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch

from conftest import ids, perturb_lora, tiny_lm
from lora_cli import apply_lora, loraplus_param_groups
from lora_cli.lora.inject import lora_layers
from lora_cli.run.loop import make_optimizer

TARGETS = ["q_proj", "v_proj", "embed_tokens"]


def adapted(**kw):
    return perturb_lora(apply_lora(tiny_lm(0), rank=4, alpha=8, target_modules=TARGETS, bias="lora_only", **kw))


def test_groups_hold_every_trainable_parameter_once_with_b_factors_fast():
    model = adapted()
    rest, fast = loraplus_param_groups(model, lr=0.1, ratio=16)
    assert rest["lr"] == 0.1 and fast["lr"] == pytest.approx(1.6)
    layers = lora_layers(model)
    want_fast = {id(layer.factors[1]) for layer in layers.values()}
    assert {id(p) for p in fast["params"]} == want_fast
    assert any(layer.layout == "embedding" for layer in layers.values())      # lora_embedding_B is in it
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert sorted(map(id, rest["params"] + fast["params"])) == sorted(map(id, trainable))
    assert all(id(layer.factors[0]) in {id(p) for p in rest["params"]} for layer in layers.values())


def test_dora_magnitudes_learn_at_the_base_lr():
    model = apply_lora(tiny_lm(0), rank=4, alpha=8, target_modules=["q_proj"], use_dora=True)
    rest, fast = loraplus_param_groups(model, lr=0.1, ratio=4)
    mags = {id(layer.lora_magnitude_vector) for layer in lora_layers(model).values()}
    assert mags <= {id(p) for p in rest["params"]} and not mags & {id(p) for p in fast["params"]}


@pytest.mark.parametrize("optimizer", ["sgd", "adam", "adamw"])
def test_first_step_moves_b_by_ratio_times_plain_lora(optimizer):
    cfg = SimpleNamespace(train=SimpleNamespace(optimizer=optimizer, lr=0.01, weight_decay=0.0))
    ratio = 8.0
    moved = {}
    for name, r in (("plain", None), ("plus", ratio)):
        model = adapted()
        before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        params = [p for p in model.parameters() if p.requires_grad]
        opt = make_optimizer(cfg, params if r is None else loraplus_param_groups(model, cfg.train.lr, r))
        model(ids()).square().mean().backward()
        opt.step()
        moved[name] = {n: p.detach() - before[n] for n, p in model.named_parameters() if n in before}
    for n, step in moved["plain"].items():
        factor = ratio if n.endswith(("lora_B", "lora_embedding_B")) else 1.0
        torch.testing.assert_close(moved["plus"][n], factor * step, rtol=1e-4, atol=1e-6)


def test_the_ratio_must_be_positive():
    with pytest.raises(ValueError, match="> 0"):
        loraplus_param_groups(adapted(), lr=0.1, ratio=0)
